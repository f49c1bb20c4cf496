"""`augment_dataset`: perturbed, unlabelled copies of training text, and the recipe's `--augment_copies`."""

import os

import pytest
from conftest import FIXTURES, recipe
from datasets import ClassLabel, Dataset, Features, Value

from hf_distill import augment_dataset


def sentences(num=40, length=12):
    return Dataset.from_dict({
        "sentence": [" ".join(f"s{row}w{word}" for word in range(length)) for row in range(num)],
        "label": [row % 2 for row in range(num)],
    })


def test_copies_follow_their_source_rows_and_edit_words_from_the_corpus():
    dataset = sentences()
    augmented = augment_dataset(dataset, ("sentence",), copies=3, word_prob=0.2, seed=0)
    assert augmented.column_names == ["sentence"] and len(augmented) == 3 * len(dataset)
    corpus = {word for text in dataset["sentence"] for word in text.split()}
    for index, text in enumerate(augmented["sentence"]):
        source = dataset[index // 3]["sentence"].split()
        words = text.split()
        assert set(words) <= corpus
        assert len(source) - 12 <= len(words) <= len(source)  # deletions only shorten
        # Most words of a copy are its source row's, in order: edits touch ~20 % of them.
        kept = sum(word in source for word in words)
        assert kept >= len(words) // 2
    changed = sum(text != dataset[i // 3]["sentence"] for i, text in enumerate(augmented["sentence"]))
    assert changed == len(augmented)  # every copy carries at least one edit, and row-unique words make it visible


def test_edit_rate_follows_word_prob():
    dataset = sentences(num=200, length=20)
    for word_prob in (0.1, 0.4):
        augmented = augment_dataset(dataset, ("sentence",), copies=1, word_prob=word_prob, seed=1)
        # Words of other rows can only come from a replacement: 60 % of edits, at distinct positions.
        foreign = sum(
            word not in set(dataset[i]["sentence"].split())
            for i, text in enumerate(augmented["sentence"])
            for word in text.split()
        )
        expected = 200 * 20 * word_prob * 0.6
        assert expected * 0.8 < foreign < expected * 1.2


def test_same_seed_same_copies_and_pairs_edited_independently():
    pairs = Dataset.from_dict({"sentence1": ["a b c d e f"] * 20, "sentence2": ["a b c d e f"] * 20})
    first = augment_dataset(pairs, ("sentence1", "sentence2"), copies=2, seed=3)
    assert first.to_dict() == augment_dataset(pairs, ("sentence1", "sentence2"), copies=2, seed=3).to_dict()
    assert first.to_dict() != augment_dataset(pairs, ("sentence1", "sentence2"), copies=2, seed=4).to_dict()
    assert any(row["sentence1"] != row["sentence2"] for row in first)


def test_keeps_the_text_features():
    dataset = Dataset.from_dict(
        {"sentence": ["one two three"], "label": [1]},
        features=Features({"sentence": Value("large_string"), "label": ClassLabel(names=["no", "yes"])}),
    )
    assert augment_dataset(dataset, ("sentence",), copies=1).features["sentence"] == Value("large_string")


@pytest.mark.parametrize("copies, word_prob, message", [(0, 0.1, "copies must be at least 1"), (1, 0.0, r"\(0, 1\]")])
def test_bad_arguments(copies, word_prob, message):
    with pytest.raises(ValueError, match=message):
        augment_dataset(sentences(), ("sentence",), copies=copies, word_prob=word_prob)


def test_recipe_adds_augmented_copies_without_labels():
    data_args = recipe.DataArguments(
        task_name="mrpc", train_file=os.path.join(FIXTURES, "mrpc", "train.tsv"), max_train_samples=10,
        augment_copies=2,
    )
    raw = recipe.load_glue_data("mrpc", train_file=data_args.train_file)
    labelled, distill = recipe.with_transfer_data(raw, data_args, recipe.get_task("mrpc"))
    assert len(distill) == 30 and distill["label"][:10] == labelled["label"] and distill["label"][10:] == [-1] * 20
    assert distill.features == labelled.select_columns(["sentence1", "sentence2", "label"]).features


@pytest.mark.parametrize("flag, value, message", [
    ("--augment_copies", "-1", "--augment_copies must be 0"), ("--augment_word_prob", "1.5", "must be in \\(0, 1\\]"),
])
def test_recipe_refuses_bad_augmentation_settings(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        recipe.main(["--task_name", "sst2", "--teacher_model_name_or_path", "unused", "--output_dir",
                     str(tmp_path / "run"), flag, value])
    assert not (tmp_path / "run").exists()
