import numpy as np
import pytest
from transformers import EvalPrediction

from hf_distill.metrics import compute_glue_metrics, make_compute_metrics

# Confusion counts of the binary example below: TP=3 (rows 0, 3, 5), FP=1 (row 2), FN=1 (row 4), TN=1 (row 1).
BINARY_PREDICTIONS = [1, 0, 1, 1, 0, 1]
BINARY_REFERENCES = [1, 0, 0, 1, 1, 1]


def test_binary_metrics_by_hand():
    mrpc = compute_glue_metrics("mrpc", BINARY_PREDICTIONS, BINARY_REFERENCES)
    assert mrpc == pytest.approx({"accuracy": 4 / 6, "f1": 2 * 3 / (2 * 3 + 1 + 1)})
    cola = compute_glue_metrics("cola", BINARY_PREDICTIONS, BINARY_REFERENCES)
    mcc = (3 * 1 - 1 * 1) / np.sqrt((3 + 1) * (3 + 1) * (1 + 1) * (1 + 1))
    assert cola == pytest.approx({"matthews_correlation": mcc})
    assert compute_glue_metrics("mnli", [0, 1, 2, 2], [0, 2, 2, 1]) == {"accuracy": 0.5}


def test_regression_metrics_by_formula():
    predictions = np.array([0.1, 1.9, 2.5, 4.0, 3.2])
    references = np.array([0.0, 2.0, 3.5, 4.8, 2.9])

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return (x @ y) / np.sqrt((x @ x) * (y @ y))

    def ranks(x):
        return np.argsort(np.argsort(x)).astype(float)

    metrics = compute_glue_metrics("stsb", predictions, references)
    assert metrics == pytest.approx(
        {"pearson": pearson(predictions, references), "spearmanr": pearson(ranks(predictions), ranks(references))}
    )
    assert all(isinstance(value, float) for value in metrics.values())


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        compute_glue_metrics("sst2", [0, 1], [0, 1, 1])


def test_compute_metrics_ignores_unlabelled_examples():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [1.0, 0.0], [0.0, 5.0], [3.0, 0.0]])
    labels = np.array([0, 1, -100, 0, -1])  # kept rows: predictions 0, 1, 1 vs labels 0, 1, 0
    compute_metrics = make_compute_metrics("mrpc")
    metrics = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics == pytest.approx({"accuracy": 2 / 3, "f1": 2 / 3})
    tupled = compute_metrics(EvalPrediction(predictions=(logits, np.zeros((5, 3, 4))), label_ids=labels))
    assert tupled == pytest.approx(metrics)


def test_compute_metrics_regression_and_unlabelled():
    scores = np.array([[0.5], [1.5], [2.5], [9.0]])
    labels = np.array([1.0, 2.0, 4.0, -1.0])
    metrics = make_compute_metrics("stsb")(EvalPrediction(predictions=scores, label_ids=labels))
    assert metrics["pearson"] == pytest.approx(np.corrcoef([0.5, 1.5, 2.5], [1.0, 2.0, 4.0])[0, 1])
    assert metrics["spearmanr"] == pytest.approx(1.0)
    unlabelled = EvalPrediction(predictions=np.zeros((2, 2)), label_ids=np.array([-1, -1]))
    assert make_compute_metrics("sst2")(unlabelled) == {}
