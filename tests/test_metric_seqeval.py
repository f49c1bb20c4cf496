"""The entity-level metric against hand-counted cases (seqeval's default-mode rules), and its compute_metrics."""

import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction

from hf_distill.recipe_support.metrics import (
    SEQEVAL_METRIC_PATH,
    SeqevalMetric,
    make_token_classification_compute_metrics,
)
from hf_distill.recipe_support.metrics.seqeval import extract_entities


def test_entities_follow_seqeval_rules():
    assert extract_entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    # I- after O, or after another type, starts an entity (IOB1 files read the same way).
    assert extract_entities(["O", "I-ORG", "I-ORG", "I-LOC"]) == {("ORG", 1, 2), ("LOC", 3, 3)}
    # B- right after an entity of the same type starts a new one.
    assert extract_entities(["B-PER", "B-PER", "I-PER"]) == {("PER", 0, 0), ("PER", 1, 2)}
    assert extract_entities(["B-MISC"]) == {("MISC", 0, 0)}
    assert extract_entities(["O", "O"]) == set()


def test_scores_by_hand():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG", "B-LOC"]]
    # Gold: PER(0-1), LOC(3), ORG(0), PER(2) -> 4. Predicted: PER(0-1), ORG(0-1), LOC(2) -> 3. Correct: PER(0-1).
    precision, recall = 1 / 3, 1 / 4
    expected = {
        "precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall),
        "accuracy": 4 / 7,  # tokens right: 0, 1, 2 of the first sentence, 0 of the second
        "PER_precision": 1.0, "PER_recall": 0.5, "PER_f1": 2 / 3, "PER_number": 2,
        "ORG_precision": 0.0, "ORG_recall": 0.0, "ORG_f1": 0.0, "ORG_number": 1,
        "LOC_precision": 0.0, "LOC_recall": 0.0, "LOC_f1": 0.0, "LOC_number": 1,
    }
    for metric in (SeqevalMetric(), evaluate.load(SEQEVAL_METRIC_PATH)):
        assert metric.compute(predictions=predictions, references=references) == pytest.approx(expected)


def test_batches_equal_one_call():
    references = [["B-PER", "O"], ["B-LOC", "I-LOC"], ["O", "B-ORG"]]
    predictions = [["B-PER", "O"], ["B-LOC", "O"], ["O", "B-ORG"]]
    metric = SeqevalMetric()
    for prediction, reference in zip(predictions, references):
        metric.add_batch(predictions=[prediction], references=[reference])
    assert metric.compute() == SeqevalMetric().compute(predictions=predictions, references=references)


def test_bad_tags_and_lengths_by_message():
    with pytest.raises(ValueError, match="'S-PER' is not an IOB tag"):
        SeqevalMetric().compute(predictions=[["S-PER"]], references=[["B-PER"]])
    with pytest.raises(ValueError, match="Sentence 0 has 1 predicted tags but 2 gold tags"):
        SeqevalMetric().compute(predictions=[["O"]], references=[["O", "O"]])


def test_compute_metrics_scores_labelled_positions_only():
    names = ["O", "B-PER", "I-PER"]
    # Two sentences, padded with -100; position 0 is [CLS], -100 marks continuation sub-tokens and padding.
    labels = np.array([[-100, 1, -100, 2, 0, -100], [-100, 0, 1, -100, -100, -100]])
    predicted_ids = np.array([[0, 1, 0, 2, 0, 0], [2, 0, 0, 1, 1, 1]])  # wrong where labels are -100 only, + one
    logits = np.eye(3)[predicted_ids] * 5.0
    metrics = make_token_classification_compute_metrics(names)(EvalPrediction(predictions=logits, label_ids=labels))
    # Scored: [B-PER, I-PER, O] vs the same, and [O, O] vs [O, B-PER]: 1 of 2 gold entities found, 1 predicted.
    assert metrics["precision"] == 1.0 and metrics["recall"] == 0.5 and metrics["accuracy"] == pytest.approx(4 / 5)
