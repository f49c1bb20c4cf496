"""`recipes/glue.py` under bad input and secrets (issue 12): nothing of the token on disk, and an error before
training leaves `--output_dir` unclaimed so that the corrected rerun may use it."""

import os

import pytest
from conftest import tiny_tokenizer
from test_recipe import fixture_words, recipe, recipe_args, save_teacher

SECRET = "hf_SECRETtoken0123456789abcdef"


def test_hub_token_is_in_no_file_the_recipe_writes(tmp_path):
    teacher = save_teacher(str(tmp_path / "teacher_in"), 2)
    output_dir = str(tmp_path / "run")
    recipe.main([
        *recipe_args("sst2", teacher, output_dir, "--baseline", "false", "--max_train_samples", "32",
                     "--finetune_teacher", "yes"),
        "--save_strategy", "steps", "--save_steps", "1", "--hub_token", SECRET,
    ])
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names]
    assert sum(path.endswith("training_args.bin") for path in files) >= 4  # teacher and student checkpoints, student
    for path in files:
        with open(path, "rb") as file:
            assert SECRET.encode() not in file.read(), path


@pytest.mark.parametrize("length, message", [("0", "must be >= 1, got 0"), ("-5", "must be >= 1, got -5"),
                                             ("100", "exceeds the teacher's 64 position embeddings")])
def test_bad_max_seq_length(tmp_path, length, message):
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    with pytest.raises(ValueError, match=f"--max_seq_length.*{message}"):
        recipe.main(recipe_args("sst2", teacher, str(tmp_path / "run")) + ["--max_seq_length", length])
    assert not os.path.exists(tmp_path / "run")


def test_tokenizer_larger_than_the_teacher_vocabulary(tmp_path):
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    tiny_tokenizer(teacher, fixture_words(120))  # 125 tokens for the teacher's 99 embeddings
    with pytest.raises(ValueError, match="has 125 tokens but the models' vocabulary has 99"):
        recipe.main(recipe_args("sst2", teacher, str(tmp_path / "run")))
    assert not os.path.exists(tmp_path / "run")


def test_an_early_error_leaves_the_output_dir_unclaimed(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("text\tlabel\nfine\t1\n")
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    output_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="'sentence'"):
        recipe.main(recipe_args("sst2", teacher, output_dir) + ["--train_file", str(bad)])
    assert not os.path.exists(output_dir)
    # The corrected rerun (other arguments, so another run record) may use the folder.
    recipe.main(recipe_args("sst2", teacher, output_dir, "--baseline", "false", "--max_train_samples", "32"))
    assert os.path.isdir(os.path.join(output_dir, "student"))
