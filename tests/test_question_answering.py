"""Extractive QA: the SQuAD metric, windowed features and span post-processing against hand-computed cases, and
`recipes/question_answering.py` end to end on tiny random BERTs and the made-up QA fixtures, with its bad-input
errors."""

import json
import os

import evaluate
import numpy as np
import pytest
import torch
from conftest import QA_FIXTURES, qa_recipe, qa_recipe_args, save_qa_teacher, tiny_tokenizer
from datasets import Dataset
from huggingface_hub import ModelCard
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from hf_distill.recipe_support.metrics import SQUAD_METRIC_PATH, SquadMetric
from hf_distill.recipe_support.tasks.question_answering import (
    load_question_answering_data,
    postprocess_qa_predictions,
    prepare_train_features,
    prepare_validation_features,
)


def squad(pairs, config="squad"):
    """Scores of `[(prediction, [references])]`, one question each."""
    return SquadMetric(config).compute(
        predictions=[{"id": str(i), "prediction_text": prediction} for i, (prediction, _) in enumerate(pairs)],
        references=[{"id": str(i), "answers": {"text": golds, "answer_start": [0] * len(golds)}}
                    for i, (_, golds) in enumerate(pairs)],
    )


# ---- exact match and F1 (official SQuAD definitions), computed by hand ----


@pytest.mark.parametrize("prediction, golds, exact, f1", [
    # The Hub `squad` metric's docstring example: 100.0 / 100.0 there, fractions here.
    ("1976", ["1976"], 1.0, 1.0),
    # Case, punctuation and articles go; whitespace collapses.
    ("The  Old Mill!", ["old mill"], 1.0, 1.0),
    # Punctuation is removed, not replaced by a space: "redbarn" shares no word with "red barn".
    ("red-barn", ["red barn"], 0.0, 0.0),
    # Only whole-word articles go: "another" and "anthem" stay.
    ("another anthem", ["anthem"], 0.0, 2 * (1 / 2) * 1 / (1 / 2 + 1)),
    # pred {red, barn, near, mill}, gold {old, red, barn}: 2 shared, P 2/4, R 2/3, F1 4/7.
    ("the red barn near the mill", ["the old red barn"], 0.0, 4 / 7),
    # The best reference counts, for each metric separately.
    ("old mill", ["the mill", "mill by the river", "old mill"], 1.0, 1.0),
    ("mill by the sea", ["the mill", "mill by the river"], 0.0, max(2 * 1 / 3 * 1 / (1 / 3 + 1), 2 / 3)),
    # Repeated words count as many times as both have them: pred {a:... } -> "mill mill old" vs "mill old": 2 shared.
    ("mill mill old", ["mill old"], 0.0, 2 * (2 / 3) * 1 / (2 / 3 + 1)),
])
def test_squad_scores_by_hand(prediction, golds, exact, f1):
    assert squad([(prediction, golds)]) == pytest.approx({"exact_match": exact, "f1": f1})


def test_squad_averages_questions_and_loads_with_evaluate():
    pairs = [("old mill", ["the old mill"]), ("barn", ["red barn"]), ("river", ["the sea"])]
    expected = {"exact_match": 1 / 3, "f1": (1 + 2 / 3 + 0) / 3}
    assert squad(pairs) == pytest.approx(expected)
    metric = evaluate.load(SQUAD_METRIC_PATH, "squad")
    for i, (prediction, golds) in enumerate(pairs):
        metric.add(prediction={"id": str(i), "prediction_text": prediction},
                   reference={"id": str(i), "answers": {"text": golds, "answer_start": [0] * len(golds)}})
    assert metric.compute() == pytest.approx(expected)


def test_squad_v2_unanswerable_questions():
    # An empty prediction is right only on an unanswerable question; references empty after normalisation ("the")
    # make the question unanswerable.
    scores = squad([("", []), ("mill", []), ("", ["old mill"]), ("old mill", ["the old mill"]), ("", ["the"])],
                   "squad_v2")
    assert scores == pytest.approx({
        "exact_match": 3 / 5, "f1": 3 / 5, "has_answer_total": 2, "has_answer_exact_match": 1 / 2,
        "has_answer_f1": 1 / 2, "no_answer_total": 3, "no_answer_exact_match": 2 / 3, "no_answer_f1": 2 / 3,
    })


def test_squad_refuses_questions_it_cannot_score():
    with pytest.raises(ValueError, match="has no reference answer.*'squad_v2'"):
        squad([("mill", [])])
    with pytest.raises(ValueError, match="No prediction for question 'b'"):
        SquadMetric().compute(
            predictions=[{"id": "a", "prediction_text": "x"}, {"id": "c", "prediction_text": "y"}], references=[
                {"id": "a", "answers": {"text": ["x"], "answer_start": [0]}},
                {"id": "b", "answers": {"text": ["y"], "answer_start": [0]}},
            ])


# ---- features: windows over long contexts, answer positions ----

CONTEXT = "the red barn stood near the old mill by the river ."
#          0   4   8    13    19   24  28  32   37 40  44    50


@pytest.fixture
def qa_tokenizer(tmp_path):
    words = ["where", "is", "it", "?", "the", "red", "barn", "stood", "near", "old", "mill", "by", "river", "."]
    return tiny_tokenizer(str(tmp_path / "tokenizer"), words)


def test_windows_and_answer_positions_by_hand(qa_tokenizer):
    questions = Dataset.from_dict({
        "id": ["q"], "context": [CONTEXT], "question": ["  where is it ?"],  # leading spaces are dropped
        "answers": [{"text": ["the old mill"], "answer_start": [24]}],
    })
    # [CLS] where is it ? [SEP] = 6 tokens, then 5 context tokens and [SEP]: windows over context tokens 0-4, 3-7,
    # 6-10, 9-11 (2 shared with the previous one).
    features = prepare_train_features(questions, qa_tokenizer, max_seq_length=12, doc_stride=2)
    windows = [qa_tokenizer.convert_ids_to_tokens(ids)[6:-1] for ids in features["input_ids"]]
    assert windows == [["the", "red", "barn", "stood", "near"], ["stood", "near", "the", "old", "mill"],
                       ["old", "mill", "by", "the", "river"], ["the", "river", "."]]
    # The answer (context tokens 5-7) is whole in the second window only, at 6 + 2 .. 6 + 4; the third cuts it and
    # the first and fourth miss it: [CLS] (index 0), "no answer in this window".
    assert features["start_positions"] == [0, 8, 0, 0]
    assert features["end_positions"] == [0, 10, 0, 0]
    unlabelled = prepare_train_features(questions, qa_tokenizer, 12, 2, labelled=False)
    assert unlabelled["start_positions"] == unlabelled["end_positions"] == [-100] * 4

    validation = prepare_validation_features(questions, qa_tokenizer, max_seq_length=12, doc_stride=2)
    assert validation["example_id"] == ["q"] * 4
    second = validation["offset_mapping"][1]
    assert second[:6] == [None] * 6 and second[-1] is None  # question and special tokens: no offsets
    assert [CONTEXT[start:end] for start, end in second[6:-1]] == ["stood", "near", "the", "old", "mill"]


def test_answer_inside_a_word_and_unanswerable_question(qa_tokenizer):
    questions = Dataset.from_dict({
        "id": ["a", "b"], "context": [CONTEXT, CONTEXT], "question": ["where is it ?"] * 2,
        "answers": [{"text": ["arn stood"], "answer_start": [9]}, {"text": [], "answer_start": []}],
    })
    features = prepare_train_features(questions, qa_tokenizer, max_seq_length=32, doc_stride=8)
    # One window each; "arn" is inside "barn" (token 6 + 2): the span covers the whole word's token.
    assert features["start_positions"] == [8, 0] and features["end_positions"] == [9, 0]


# ---- post-processing: logits of every window to one answer per question, computed by hand ----


def qa_features(rows):
    return Dataset.from_dict({"example_id": [row[0] for row in rows], "offset_mapping": [row[1] for row in rows]})


MILL = "the red barn stood near the old mill"
FEATURES = qa_features([
    ("q1", [None, (0, 3), (4, 7), (8, 12), None]),
    ("q1", [None, (19, 23), (24, 27), (28, 31), (32, 36)]),
])
# Window 0: the best start and end are at [SEP] (no offsets): skipped; best valid pair "red barn" = 3 + 4 = 7.
# Window 1: "old mill" = 6 + 2.5 = 8.5 beats it; "old" alone = 6 + 0.
START = np.array([[5, 1, 3, 0, 9], [0, 2, 0, 6, 0]], dtype=np.float32)
END = np.array([[5, 0, 1, 4, 9], [0, 0, 0, 0, 2.5]], dtype=np.float32)


@pytest.mark.parametrize("settings, answer", [
    ({}, "old mill"),
    ({"max_answer_length": 1}, "old"),  # one-token spans: "old" (6) beats "red" (4), "barn" (4)
    ({"n_best_size": 1}, "old mill"),  # window 0 keeps only [SEP]'s start: no candidate there
    ({"n_best_size": 1, "max_answer_length": 1}, "empty"),  # no valid span anywhere: utils_qa.py's "empty"
])
def test_postprocess_merges_windows(settings, answer):
    examples = Dataset.from_dict({"id": ["q1"], "context": [MILL]})
    assert postprocess_qa_predictions(examples, FEATURES, START, END, **settings) == {"q1": answer}


def test_postprocess_end_before_start_and_padding():
    examples = Dataset.from_dict({"id": ["q"], "context": [MILL]})
    features = qa_features([("q", [None, (0, 3), (4, 7), (8, 12)])])
    # The best pair is reversed (start "barn", end "the"); padding beyond the offsets has the highest logits.
    start = np.array([[0, 1, 0, 5, 50, 50]], dtype=np.float32)
    end = np.array([[0, 4, 2, 0, 50, 50]], dtype=np.float32)
    # Valid: (1,1) 5, (1,2) 3, (2,2) 2, (3,3) 5 ... "the" (1,1) = 1 + 4 = 5 and "barn" (3,3) = 5 + 0 = 5 tie:
    # the first in utils_qa.py's order (best start first) wins: start 3 ("barn").
    assert postprocess_qa_predictions(examples, features, start, end) == {"q": "barn"}


def test_postprocess_v2_null_answer():
    examples = Dataset.from_dict({"id": ["q2"], "context": ["the red"]})
    features = qa_features([("q2", [None, (0, 3), (4, 7)])])
    start, end = np.array([[4, 1, 2]], dtype=np.float32), np.array([[3, 0, 1]], dtype=np.float32)
    # Null score 4 + 3 = 7; best span "red" 2 + 1 = 3: 7 - 3 = 4 beats the threshold 0, not 5.
    assert postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=True) == {"q2": ""}
    assert postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=True,
                                      null_score_diff_threshold=5.0) == {"q2": "red"}


def test_postprocess_refuses_misaligned_predictions():
    examples = Dataset.from_dict({"id": ["q1"], "context": [MILL]})
    with pytest.raises(ValueError, match="logits for 1/1 features but there are 2"):
        postprocess_qa_predictions(examples, FEATURES, START[:1], END[:1])


# ---- the recipe end to end ----


def student_scores(model, tokenizer, validation_file, version_2=False):
    """EM/F1 of `model` on the validation file: each feature alone, unpadded, through the post-processing."""
    examples = load_question_answering_data(data_files={"validation": validation_file},
                                            version_2_with_negative=version_2)["validation"]
    features = prepare_validation_features(examples, tokenizer, 40, 12)
    model.eval()
    starts, ends = np.full((len(features), 40), -1e4), np.full((len(features), 40), -1e4)
    with torch.no_grad():
        for index, ids in enumerate(features["input_ids"]):
            output = model(input_ids=torch.tensor([ids]),
                           token_type_ids=torch.tensor([features[index]["token_type_ids"]]))
            starts[index, : len(ids)], ends[index, : len(ids)] = output.start_logits[0], output.end_logits[0]
    answers = postprocess_qa_predictions(examples, features, starts, ends, version_2, max_answer_length=12)
    return SquadMetric("squad_v2" if version_2 else "squad").compute(
        predictions=[{"id": key, "prediction_text": text} for key, text in answers.items()],
        references=[{"id": row["id"], "answers": row["answers"]} for row in examples],
    )


def test_recipe_end_to_end(tmp_path, capsys):
    teacher = save_qa_teacher(str(tmp_path / "base"))  # no QA head: fine-tuned first
    output_dir = str(tmp_path / "run")
    qa_recipe.main(qa_recipe_args(
        teacher, output_dir, "--max_train_samples", "15", "--transfer_train_samples", "10",
        "--teacher_hub_id", "someone/tiny-base",
    ))
    assert sorted(os.listdir(output_dir)) == [
        "baseline", "hf_distill_run.json", "report.md", "report.png", "results.json", "student", "teacher",
    ]
    with open(os.path.join(output_dir, "results.json")) as file:
        report = json.load(file)
    assert report["main_metric"] == "f1"
    assert [row["name"] for row in report["rows"]] == ["teacher", "baseline", "student"]
    teacher_row, _, student_row = report["rows"]
    assert student_row["num_parameters"] < teacher_row["num_parameters"]
    assert all(0 <= row["metric_value"] <= 1 and row["metric_value"] == row["all_metrics"]["f1"]
               for row in report["rows"])

    # The reported scores are the saved student's, recomputed from each validation feature alone.
    student_dir = os.path.join(output_dir, "student")
    student = AutoModelForQuestionAnswering.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2 and student.config.hf_distill_init_layers == [0, 3]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(output_dir, "teacher"))
    expected = student_scores(student, tokenizer, os.path.join(QA_FIXTURES, "validation.jsonl"))
    assert {name: student_row["all_metrics"][name] for name in expected} == pytest.approx(expected, abs=1e-6)

    card = ModelCard.load(os.path.join(student_dir, "README.md"))
    assert card.data.pipeline_tag == "question-answering"
    assert card.data.teacher_model == card.data.base_model == "someone/tiny-base"
    assert {result.metric_type: result.metric_value for result in card.data.eval_results} == pytest.approx(expected)
    settings = card.data.distillation
    assert (settings["labelled_questions"], settings["transfer_questions"]) == (15, 10)
    assert settings["transfer_features"] > 10 and settings["teacher_finetune"]["epochs"] == 1.0
    assert "AutoModelForQuestionAnswering" in card.text
    assert "| student |" in capsys.readouterr().out


def test_recipe_squad_v2(tmp_path):
    teacher = save_qa_teacher(str(tmp_path / "teacher"), with_head=True)  # a QA head: used as given
    output_dir = str(tmp_path / "run")
    qa_recipe.main(qa_recipe_args(teacher, output_dir, "--version_2_with_negative", "true", "--baseline", "false",
                                  validation_file="validation_v2.jsonl"))
    with open(os.path.join(output_dir, "results.json")) as file:
        report = json.load(file)
    assert [row["name"] for row in report["rows"]] == ["teacher", "student"]
    student_metrics = report["rows"][1]["all_metrics"]
    assert (student_metrics["has_answer_total"], student_metrics["no_answer_total"]) == (8, 2)
    student = AutoModelForQuestionAnswering.from_pretrained(os.path.join(output_dir, "student"))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    expected = student_scores(student, tokenizer, os.path.join(QA_FIXTURES, "validation_v2.jsonl"), version_2=True)
    assert student_metrics["f1"] == pytest.approx(expected["f1"], abs=1e-6)
    assert "teacher_finetune" not in ModelCard.load(os.path.join(output_dir, "student", "README.md")).data.distillation


def test_recipe_baseline_alone(tmp_path):
    teacher = save_qa_teacher(str(tmp_path / "teacher"), with_head=True)
    output_dir = tmp_path / "run"
    qa_recipe.main(qa_recipe_args(teacher, str(output_dir), "--distill", "false"))
    with open(output_dir / "results.json") as file:
        rows = json.load(file)["rows"]
    assert [row["name"] for row in rows] == ["teacher", "baseline"]
    assert not (output_dir / "student").exists()
    baseline = AutoModelForQuestionAnswering.from_pretrained(output_dir / "baseline")
    expected = student_scores(baseline, AutoTokenizer.from_pretrained(teacher),
                              os.path.join(QA_FIXTURES, "validation.jsonl"))
    assert rows[1]["all_metrics"]["f1"] == pytest.approx(expected["f1"], abs=1e-6)


# ---- bad input: a clear error before any work, no output folder ----


def bad_train_file(tmp_path, edit):
    with open(os.path.join(QA_FIXTURES, "train.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    edit(rows)
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def drop_answers(rows):
    for row in rows:
        del row["answers"]


def shift_an_answer(rows):
    rows[3]["answers"]["answer_start"][0] += 2


def drop_one_answer(rows):
    rows[1]["answers"] = {"text": [], "answer_start": []}


@pytest.mark.parametrize("edit, message", [
    (drop_answers, r"train split lacks the column\(s\) \['answers'\]"),
    (shift_an_answer, r"Question 't003' of the train split: its answer 'a lantern festival' is not at "
                      r"answer_start=\d+ of the context"),
    (drop_one_answer, "Question 't001' of the train split has no answer.*--version_2_with_negative"),
])
def test_bad_train_file(tmp_path, edit, message):
    teacher = save_qa_teacher(str(tmp_path / "teacher"))
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        qa_recipe.main(qa_recipe_args(teacher, str(output_dir)) + ["--train_file", bad_train_file(tmp_path, edit)])
    assert not output_dir.exists()


def test_unanswerable_validation_without_v2(tmp_path):
    teacher = save_qa_teacher(str(tmp_path / "teacher"))
    with pytest.raises(ValueError, match="Question 'n000' of the validation split has no answer"):
        qa_recipe.main(qa_recipe_args(teacher, str(tmp_path / "run"), validation_file="validation_v2.jsonl"))
    assert not (tmp_path / "run").exists()


def test_nothing_to_train(tmp_path):
    teacher = save_qa_teacher(str(tmp_path / "teacher"))
    with pytest.raises(ValueError, match="--distill false and --baseline false leave nothing to train"):
        qa_recipe.main(qa_recipe_args(teacher, str(tmp_path / "run"), "--distill", "false", "--baseline", "false"))
    assert not (tmp_path / "run").exists()


def test_stride_not_below_length():
    with pytest.raises(ValueError, match=r"--doc_stride \(384\) must be below --max_seq_length \(384\)"):
        qa_recipe.DataArguments(train_file="t.jsonl", validation_file="v.jsonl", doc_stride=384)
