import json
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Value

from hf_distill.recipe_support import glue
from hf_distill.recipe_support.glue import GLUE_TASKS, get_task, load_glue_data, tokenize_glue

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def fixture_files(task):
    folder = FIXTURES / task
    return {"train_file": str(folder / "train.tsv"), "validation_file": str(folder / "validation.tsv")}


def write_tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header), *("\t".join(map(str, row)) for row in rows)]) + "\n")
    return str(path)


def test_registry_covers_glue():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("qnli").text_columns == ("question", "sentence")
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert {name: task.main_metric for name, task in GLUE_TASKS.items() if task.main_metric != "accuracy"} == {
        "cola": "matthews_correlation",
        "stsb": "pearson",
        "mrpc": "f1",
        "qqp": "f1",
    }
    for task in GLUE_TASKS.values():
        assert task.main_metric in task.metric_names


def test_unknown_task():
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst3'.*sst2.*mnli"):
        get_task("sst3")


@pytest.mark.parametrize("task_name", ["sst2", "mrpc", "stsb"])
def test_load_fixtures(task_name):
    task = get_task(task_name)
    data = load_glue_data(task_name, **fixture_files(task_name))
    assert {split: len(dataset) for split, dataset in data.items()} == {"train": 200, "validation": 64}
    assert set(data["train"].column_names) == {*task.text_columns, "label", "idx"}
    label_feature = data["validation"].features["label"]
    if task.is_regression:
        assert label_feature == Value("float32")
    else:
        assert isinstance(label_feature, ClassLabel) and tuple(label_feature.names) == task.label_names


def test_tsv_uses_standard_quoting():
    data = load_glue_data("mrpc", validation_file=str(FIXTURES / "mrpc" / "validation.tsv"))
    assert list(data) == ["validation"]
    assert data["validation"][0]["sentence2"].startswith('" The foodservice pie business')


def test_null_text_stays_text(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [["null", 0], ["NA", 1]])
    data = load_glue_data("sst2", train_file=path)
    assert data["train"]["sentence"][:] == ["null", "NA"]


def test_missing_column(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["text", "label"], [["good", 1]])
    with pytest.raises(ValueError, match=r"no column 'sentence'.*Columns present: \['text', 'label'\]"):
        load_glue_data("sst2", train_file=path)


def test_out_of_range_label(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [["good", 1], ["odd", 2]])
    with pytest.raises(ValueError, match=r"label 2 at row 1.*0 = negative, 1 = positive"):
        load_glue_data("sst2", train_file=path)


def test_non_integer_label(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [["good", "positive"]])
    with pytest.raises(ValueError, match=r"non-integer labels.*'positive' at row 0"):
        load_glue_data("sst2", train_file=path)


def test_partly_unlabelled_split_is_rejected(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [["good", 1], ["?", -1]])
    with pytest.raises(ValueError, match="every label of the split is -1"):
        load_glue_data("sst2", train_file=path)


def test_unlabelled_splits_are_allowed(tmp_path):
    no_label = write_tsv(tmp_path / "test.tsv", ["sentence1", "sentence2"], [["a", "b"]])
    all_minus_one = write_tsv(tmp_path / "dev.tsv", ["sentence1", "sentence2", "label"], [["a", "b", -1]])
    data = load_glue_data("rte", validation_file=all_minus_one, extra_eval_files={"test": no_label})
    assert data["validation"]["label"][:] == [-1]
    assert "label" not in data["test"].column_names


def test_empty_file(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [])
    with pytest.raises(ValueError, match="has no examples"):
        load_glue_data("sst2", train_file=path)


def test_jsonl_and_mnli_split_names(tmp_path):
    rows = [{"premise": "p", "hypothesis": "h", "label": 2}, {"premise": "q", "hypothesis": "i", "label": 0}]
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    data = load_glue_data("mnli", validation_file=str(path), extra_eval_files={"validation_mismatched": str(path)})
    assert set(data) == {"validation_matched", "validation_mismatched"}
    assert data["validation_matched"].features["label"].names == ["entailment", "neutral", "contradiction"]


def test_hub_loading_is_validated(monkeypatch):
    calls = []
    label = ClassLabel(names=["negative", "positive"])
    hub_data = DatasetDict(
        train=Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]}).cast_column("label", label),
        test=Dataset.from_dict({"sentence": ["c"], "label": [-1]}).cast_column("label", label),
    )

    def fake_load_dataset(*args, **kwargs):
        calls.append(args)
        return hub_data

    monkeypatch.setattr(glue, "load_dataset", fake_load_dataset)
    assert load_glue_data("sst2") is hub_data
    load_glue_data("sst2", dataset_name="nyu-mll/glue")
    assert calls == [("glue", "sst2"), ("nyu-mll/glue", "sst2")]


def test_tokenize_pairs(tokenizer):
    data = load_glue_data("mrpc", **fixture_files("mrpc"))
    tokenized = tokenize_glue(data, tokenizer, "mrpc", max_length=16)
    assert set(tokenized["train"].column_names) == {"label", "idx", "input_ids", "token_type_ids", "attention_mask"}
    lengths = [len(ids) for ids in tokenized["validation"]["input_ids"]]
    assert max(lengths) == 16  # truncated, and not padded to one length
    first = tokenized["validation"][0]
    assert first["input_ids"][0] == tokenizer.cls_token_id and 1 in first["token_type_ids"]
    assert tokenized["validation"]["label"][:] == data["validation"]["label"][:]


def test_tokenize_single_sentence(tokenizer):
    data = load_glue_data("sst2", **fixture_files("sst2"))
    tokenized = tokenize_glue(data, tokenizer, "sst2", max_length=128)
    assert "sentence" not in tokenized["train"].column_names
    assert len({len(ids) for ids in tokenized["train"]["input_ids"]}) > 1
    assert all(set(types) == {0} for types in tokenized["train"]["token_type_ids"])
