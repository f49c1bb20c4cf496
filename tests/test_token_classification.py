"""`recipes/token_classification.py` end to end on tiny random BERTs and the made-up NER fixtures, the data
loading and sub-token alignment it relies on, and its bad-input errors."""

import json
import os

import pytest
import torch
from conftest import NER_FIXTURES, ner_recipe, ner_recipe_args, save_ner_teacher
from huggingface_hub import ModelCard
from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

from hf_distill.recipe_support.metrics import SeqevalMetric
from hf_distill.recipe_support.tasks.token_classification import (
    load_token_classification_data,
    tokenize_and_align_labels,
)

NER_TAGS = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]  # sorted, "O" first


def word_level_f1(model, tokenizer, split) -> float:
    """Entity F1 of `model` on a tokenized split, from one padded forward, predictions at first sub-tokens."""
    batch = DataCollatorForTokenClassification(tokenizer)([dict(row) for row in split])
    labels = batch.pop("labels")
    model.eval()
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    kept = [row != -100 for row in labels]
    return SeqevalMetric().compute(
        predictions=[[NER_TAGS[i] for i in p[k]] for p, k in zip(predicted, kept)],
        references=[[NER_TAGS[i] for i in g[k]] for g, k in zip(labels, kept)],
    )["f1"]


def test_recipe_end_to_end(tmp_path, capsys):
    teacher = save_ner_teacher(str(tmp_path / "base"))  # no head: fine-tuned first
    output_dir = str(tmp_path / "run")
    transfer = tmp_path / "transfer.txt"
    transfer.write_text("Ada Brenn flew to Vesk .\nthe Harbour Council met on friday .\n")
    ner_recipe.main(ner_recipe_args(
        teacher, output_dir, "--max_train_samples", "160", "--transfer_train_samples", "40",
        "--transfer_file", str(transfer), "--test_file", os.path.join(NER_FIXTURES, "validation.jsonl"),
        "--max_predict_samples", "30", "--teacher_hub_id", "someone/tiny-base", "--teacher_num_train_epochs", "4",
        "--teacher_learning_rate", "3e-3",
    ))
    assert sorted(os.listdir(output_dir)) == [
        "baseline", "hf_distill_run.json", "report.md", "report.png", "results.json", "student", "teacher",
    ]
    student_dir = os.path.join(output_dir, "student")
    student = AutoModelForTokenClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2 and student.config.hf_distill_init_layers == [0, 3]
    assert [student.config.id2label[i] for i in range(9)] == NER_TAGS

    with open(os.path.join(output_dir, "results.json")) as file:
        report = json.load(file)
    assert report["main_metric"] == "f1"
    assert [row["name"] for row in report["rows"]] == ["teacher", "baseline", "student"]
    teacher_row, baseline_row, student_row = report["rows"]
    assert student_row["retention"] == pytest.approx(student_row["metric_value"] / teacher_row["metric_value"])
    assert student_row["num_parameters"] < teacher_row["num_parameters"]
    assert set(report["test"]) == {"teacher", "baseline", "student"}

    # The reported F1 is the saved student's, recomputed here from one forward over the validation file.
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(output_dir, "teacher"))
    raw, _ = load_token_classification_data(data_files={"validation": os.path.join(NER_FIXTURES, "validation.jsonl")})
    validation = tokenize_and_align_labels(raw["validation"], tokenizer, NER_TAGS, 48)
    assert student_row["metric_value"] == pytest.approx(word_level_f1(student, tokenizer, validation), abs=1e-6)
    assert report["test"]["student"]["f1"] == pytest.approx(
        word_level_f1(student, tokenizer, validation.select(range(30))), abs=1e-6
    )

    card = ModelCard.load(os.path.join(student_dir, "README.md"))
    assert card.data.pipeline_tag == "token-classification" and "ner" in card.data.tags
    assert card.data.teacher_model == card.data.base_model == "someone/tiny-base"
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results == pytest.approx({name: student_row["all_metrics"][name] for name in
                                     ("f1", "precision", "recall", "accuracy")})
    assert card.data.distillation["transfer_sentences"] == 42 and card.data.distillation["labelled_sentences"] == 160
    assert card.data.distillation["teacher_finetune"]["epochs"] == 4.0
    assert "AutoModelForTokenClassification" in card.text and "`B-PER`" in card.text
    assert "| student |" in capsys.readouterr().out
    assert not [name for name in os.listdir(student_dir) if "teacher" in name or name.startswith("_")]


def test_conll_file_and_label_all_tokens(tmp_path):
    teacher = save_ner_teacher(str(tmp_path / "teacher"), with_head=True, id2label=dict(enumerate(NER_TAGS)))
    output_dir = str(tmp_path / "run")
    ner_recipe.main(ner_recipe_args(
        teacher, output_dir, "--train_file", os.path.join(NER_FIXTURES, "train.conll"), "--label_all_tokens",
        "true", "--baseline", "false", "--finetune_teacher", "no",
    ))
    with open(os.path.join(output_dir, "results.json")) as file:
        assert [row["name"] for row in json.load(file)["rows"]] == ["teacher", "student"]
    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    assert card.data.distillation["label_all_tokens"] is True and "teacher_finetune" not in card.data.distillation


def test_sub_token_alignment(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(save_ner_teacher(str(tmp_path / "t")))
    raw, names = load_token_classification_data(data_files={"train": os.path.join(NER_FIXTURES, "train.jsonl")})
    row = raw["train"].select([0])  # Rain delayed the match between Ostrander Press and Norvex in Drumlow .
    assert row[0]["tokens"][5:7] == ["Ostrander", "Press"]
    first = tokenize_and_align_labels(row, tokenizer, names, 48)[0]
    every = tokenize_and_align_labels(row, tokenizer, names, 48, label_all_tokens=True)[0]
    pieces = tokenizer.convert_ids_to_tokens(first["input_ids"])
    b_org, i_org, o = names.index("B-ORG"), names.index("I-ORG"), names.index("O")
    # [CLS] rain del ##ayed the match bet ##ween ost ##rander press and nor ##vex ...
    assert pieces[:11] == [
        "[CLS]", "rain", "del", "##ayed", "the", "match", "bet", "##ween", "ost", "##rander", "press",
    ]
    assert first["labels"][:11] == [-100, o, o, -100, o, o, o, -100, b_org, -100, i_org]
    assert every["labels"][:11] == [-100, o, o, o, o, o, o, o, b_org, i_org, i_org]  # B- continues as I-
    assert first["labels"][-1] == every["labels"][-1] == -100  # [SEP]


# ---- bad input: a clear error before any training, no output folder ----


@pytest.fixture
def base_teacher(tmp_path):
    return save_ner_teacher(str(tmp_path / "teacher"))


def bad_file(tmp_path, rows):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("rows, message", [
    ([{"tokens": ["a", "b"], "ner_tags": ["O"]}], "Sentence 0 of the train split has 2 tokens but 1 tags"),
    ([{"tokens": ["a"], "ner_tags": ["S-PER"]}], "'S-PER' is not an IOB tag"),
    ([{"tokens": ["a"], "ner_tags": [0]}], "integers without names.*--tag_names"),
    ([{"words": ["a"], "ner_tags": ["O"]}, {"words": ["b"], "ner_tags": ["B-PER"]}], "validation split lacks"),
])
def test_bad_train_file(tmp_path, base_teacher, rows, message):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        ner_recipe.main(ner_recipe_args(base_teacher, str(output_dir)) + ["--train_file", bad_file(tmp_path, rows)])
    assert not output_dir.exists()


def test_validation_tag_missing_from_train(tmp_path, base_teacher):
    validation = bad_file(tmp_path, [{"tokens": ["a"], "ner_tags": ["B-DATE"]}])
    with pytest.raises(ValueError, match=r"validation split has the tags \['B-DATE'\]"):
        ner_recipe.main(ner_recipe_args(base_teacher, str(tmp_path / "run")) + ["--validation_file", validation])


def test_teacher_trained_on_other_tags(tmp_path):
    other = dict(enumerate(["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]))
    teacher = save_ner_teacher(str(tmp_path / "teacher"), with_head=True, id2label=other)
    with pytest.raises(ValueError, match="predicts the tags .* but the data has"):
        ner_recipe.main(ner_recipe_args(teacher, str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_teacher_head_of_another_size(tmp_path):
    teacher = save_ner_teacher(str(tmp_path / "teacher"), with_head=True, num_labels=5)
    with pytest.raises(ValueError, match="head of another shape than the data's tags needs \\(9 labels\\)"):
        ner_recipe.main(ner_recipe_args(teacher, str(tmp_path / "run")))


def test_no_data_given():
    with pytest.raises(ValueError, match="Give --dataset_name .* or --train_file"):
        ner_recipe.DataArguments()
