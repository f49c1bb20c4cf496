"""`recipes/glue.py` end to end on tiny random models and the GLUE fixtures shipped in tests/fixtures."""

import json
import os

import numpy as np
import pytest
from conftest import FIXTURES, fixture_words, recipe, recipe_args, save_teacher, tiny_bert, tiny_tokenizer
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification


@pytest.mark.parametrize(
    "task, num_labels, metric", [("sst2", 2, "accuracy"), ("mrpc", 2, "f1"), ("stsb", 1, "pearson")]
)
def test_recipe_end_to_end(tmp_path, task, num_labels, metric, capsys):
    teacher = save_teacher(str(tmp_path / "teacher_in"), num_labels)
    output_dir = str(tmp_path / "run")
    recipe.main(recipe_args(
        task, teacher, output_dir, "--finetune_teacher", "yes", "--transfer_train_samples", "40",
        "--max_train_samples", "120",
        "--augment_copies", "1",
    ))

    student_dir = os.path.join(output_dir, "student")
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == num_labels
    assert student.config.hf_distill_init_layers == [0, 3]

    with open(os.path.join(output_dir, "results.json")) as file:
        report = json.load(file)
    assert [row["name"] for row in report["rows"]] == ["teacher", "baseline", "student"]
    assert report["main_metric"] == metric
    teacher_row, _, student_row = report["rows"]
    assert teacher_row["retention"] == 1.0
    assert student_row["retention"] == pytest.approx(student_row["metric_value"] / teacher_row["metric_value"])
    assert student_row["num_parameters"] < teacher_row["num_parameters"]

    card = ModelCard.load(os.path.join(student_dir, "README.md"))
    assert card.data.teacher_model == teacher and card.data.base_model is None  # a local folder is no Hub id
    assert card.data.distillation["teacher_finetune"]["epochs"] == 1.0
    assert "distillation" in card.data.tags
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert len(results) == len(student_row["all_metrics"])
    assert results[{"pearson": "pearsonr"}.get(metric, metric)] == pytest.approx(student_row["metric_value"])
    assert card.data.distillation["transfer_examples"] == 40 + 120
    assert card.data.distillation["augmentation"] == {"copies": 1, "word_prob": 0.15}
    assert os.path.exists(os.path.join(student_dir, "report.png"))
    assert "| student |" in capsys.readouterr().out
    assert not [name for name in os.listdir(student_dir) if "teacher" in name or name.startswith("_")]


def test_teacher_is_fine_tuned_when_it_has_no_head(tmp_path):
    base = str(tmp_path / "base")
    tiny_tokenizer(base, fixture_words())
    tiny_bert(hidden_size=32, num_layers=4, num_labels=2, seed=1).bert.save_pretrained(base)
    output_dir = str(tmp_path / "run")
    recipe.main(recipe_args(
        "sst2", base, output_dir, "--baseline", "false", "--max_train_samples", "64",
        "--teacher_hub_id", "someone/tiny-base",
    ))
    with open(os.path.join(output_dir, "results.json")) as file:
        assert [row["name"] for row in json.load(file)["rows"]] == ["teacher", "student"]
    fine_tuned = AutoModelForSequenceClassification.from_pretrained(os.path.join(output_dir, "teacher"))
    assert fine_tuned.config.id2label == {0: "negative", 1: "positive"}
    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    assert card.data.base_model == card.data.teacher_model == "someone/tiny-base"
    assert card.data.distillation["teacher_finetune"] == {"epochs": 1.0, "learning_rate": 1e-4}


def test_transfer_file_examples_have_no_label(tmp_path):
    transfer = tmp_path / "transfer.tsv"
    transfer.write_text("sentence\nthe film is good\na bad , dull movie\n")
    data_args = recipe.DataArguments(
        task_name="sst2", train_file=os.path.join(FIXTURES, "sst2", "train.tsv"), transfer_file=str(transfer),
        max_train_samples=10, transfer_train_samples=5,
    )
    raw = recipe.load_glue_data("sst2", train_file=data_args.train_file)
    labelled, distill = recipe.with_transfer_data(raw, data_args, recipe.get_task("sst2"))
    assert len(labelled) == 10 and len(distill) == 17
    assert distill["label"][:10] == labelled["label"]
    assert distill["label"][10:] == [-1] * 7
    assert distill["sentence"][-2:] == ["the film is good", "a bad , dull movie"]


def test_transfer_files_of_other_pair_tasks_lose_their_labels(tmp_path):
    """STS-B's transfer pairs may come from other GLUE pair tasks: their 0/1 labels are not similarity scores."""
    paraphrases = tmp_path / "mrpc.tsv"
    paraphrases.write_text("sentence1\tsentence2\tlabel\nA cat sat .\tA cat was sitting .\t1\n")
    entailments = tmp_path / "rte.tsv"
    entailments.write_text("sentence1\tsentence2\tlabel\nIt rained .\tThe sun shone .\t0\nHe ran .\tHe moved .\t1\n")
    data_args = recipe.DataArguments(
        task_name="stsb", train_file=os.path.join(FIXTURES, "stsb", "train.tsv"),
        transfer_file=[str(paraphrases), str(entailments)], max_train_samples=4,
    )
    raw = recipe.load_glue_data("stsb", train_file=data_args.train_file)
    labelled, distill = recipe.with_transfer_data(raw, data_args, recipe.get_task("stsb"))
    assert len(distill) == 7 and distill["label"][:4] == labelled["label"]
    assert np.isnan(distill["label"][4:]).all()
    assert distill["sentence2"][4:] == ["A cat was sitting .", "The sun shone .", "He moved ."]


# ---- bad input: a clear error before any training ----


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst3'"):
        recipe.main(recipe_args("sst2", "unused", str(tmp_path / "run"))[2:] + ["--task_name", "sst3"])


def test_missing_text_column(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("text\tlabel\nfine\t1\n")
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    args = recipe_args("sst2", teacher, str(tmp_path / "run")) + ["--train_file", str(bad)]
    with pytest.raises(ValueError, match="'sentence'"):
        recipe.main(args)


def test_label_outside_the_label_map(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    with pytest.raises(ValueError, match="7"):
        recipe.main(recipe_args("sst2", teacher, str(tmp_path / "run")) + ["--train_file", str(bad)])


def test_teacher_with_another_label_space(tmp_path):
    teacher = save_teacher(str(tmp_path / "teacher"), 3)
    with pytest.raises(ValueError, match="head of another shape.*2 labels"):
        recipe.main(recipe_args("sst2", teacher, str(tmp_path / "run")))


def test_student_with_another_tokenizer(tmp_path):
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    student = str(tmp_path / "student")
    tiny_tokenizer(student)
    tiny_bert(num_labels=2).save_pretrained(student)
    with pytest.raises(ValueError, match="student's tokenizer .* differs from the teacher's"):
        recipe.main(recipe_args("sst2", teacher, str(tmp_path / "run"), "--student_model_name_or_path", student))
    assert not os.path.exists(tmp_path / "run" / "student")


def test_output_dir_of_another_run(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("someone else's")
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    with pytest.raises(ValueError, match="already holds files of something else.*--overwrite_output_dir"):
        recipe.main(recipe_args("sst2", teacher, str(output_dir)))
    assert os.listdir(output_dir) == ["notes.txt"]


def test_push_failure_keeps_the_local_output_and_hides_the_token(tmp_path, monkeypatch, capsys):
    class UnreachableHub:
        def __init__(self, token):
            self.token = token

        def create_repo(self, *args, **kwargs):
            raise ConnectionError(f"cannot reach huggingface.co with {self.token}")

    monkeypatch.setattr("hf_distill.recipe_support.stages.HfApi", UnreachableHub)
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    output_dir = str(tmp_path / "run")
    args = recipe_args("sst2", teacher, output_dir, "--baseline", "false", "--max_train_samples", "32")
    with pytest.raises(SystemExit, match="failed \\(ConnectionError\\).*complete in") as error:
        recipe.main([*args, "--push_to_hub", "true", "--hub_model_id", "me/student", "--hub_token", "hf_SECRET"])
    assert "hf_SECRET" not in str(error.value) and "hf_SECRET" not in capsys.readouterr().out
    student_dir = os.path.join(output_dir, "student")
    assert "hf_SECRET" not in open(os.path.join(student_dir, "README.md")).read()
    AutoModelForSequenceClassification.from_pretrained(student_dir)


def test_two_stage_tinybert_distillation(tmp_path):
    teacher = save_teacher(str(tmp_path / "teacher"), 2)
    output_dir = str(tmp_path / "run")
    recipe.main(recipe_args(
        "sst2", teacher, output_dir, "--baseline", "false", "--max_train_samples", "48", "--intermediate_epochs", "1",
        "--attention_relation_loss_weight", "2",
    ))
    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    stage = card.data.distillation["intermediate_stage"]
    assert stage["loss_weights"] == {"attention_relation_loss_weight": 2.0}  # logits_loss_weight is 0 in stage 1
    assert {int(k): v for k, v in stage["layer_map"].items()} == {1: 2, 2: 4}
    assert card.data.distillation["loss_weights"] == {"logits_loss_weight": 1.0}
    AutoModelForSequenceClassification.from_pretrained(os.path.join(output_dir, "student"))
