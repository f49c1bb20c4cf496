import os
import subprocess
import sys

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import EvalPrediction

from hf_distill.recipe_support.metrics import GLUE_METRIC_PATH, GlueMetric, make_compute_metrics

# Confusion counts of the binary example below: TP=3 (rows 0, 3, 5), FP=1 (row 2), FN=1 (row 4), TN=1 (row 1).
BINARY_PREDICTIONS = [1, 0, 1, 1, 0, 1]
BINARY_REFERENCES = [1, 0, 0, 1, 1, 1]
BINARY_MCC = (3 * 1 - 1 * 1) / np.sqrt((3 + 1) * (3 + 1) * (1 + 1) * (1 + 1))


@pytest.fixture(scope="module")
def loaded_glue():
    """`evaluate.load` of the shipped script, once per config: loading copies the script into evaluate's cache."""
    return {task: evaluate.load(GLUE_METRIC_PATH, task) for task in ("mrpc", "cola", "mnli", "stsb")}


def test_binary_metrics_by_hand(loaded_glue):
    for metric in (GlueMetric("mrpc"), loaded_glue["mrpc"]):
        mrpc = metric.compute(predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES)
        assert mrpc == pytest.approx({"accuracy": 4 / 6, "f1": 2 * 3 / (2 * 3 + 1 + 1)})
    cola = loaded_glue["cola"].compute(predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES)
    assert cola == pytest.approx({"matthews_correlation": BINARY_MCC})
    assert loaded_glue["mnli"].compute(predictions=[0, 1, 2, 2], references=[0, 2, 2, 1]) == {"accuracy": 0.5}


def test_regression_metrics_by_formula(loaded_glue):
    predictions = np.array([0.1, 1.9, 2.5, 4.0, 3.2])
    references = np.array([0.0, 2.0, 3.5, 4.8, 2.9])

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return (x @ y) / np.sqrt((x @ x) * (y @ y))

    def ranks(x):
        return np.argsort(np.argsort(x)).astype(float)

    metrics = loaded_glue["stsb"].compute(predictions=predictions, references=references)
    assert metrics == pytest.approx(
        {"pearson": pearson(predictions, references), "spearmanr": pearson(ranks(predictions), ranks(references))}
    )
    assert all(isinstance(value, float) for value in metrics.values())


def test_batches_and_combine_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 2, size=300), rng.integers(0, 2, size=300)
    mrpc = GlueMetric("mrpc")
    for start in range(0, 300, 64):
        mrpc.add_batch(predictions=predictions[start : start + 64], references=references[start : start + 64])
    assert mrpc.compute() == pytest.approx(
        {"accuracy": accuracy_score(references, predictions), "f1": f1_score(references, predictions)}
    )
    combined = evaluate.combine([GlueMetric("mrpc"), GlueMetric("cola")])
    assert combined.compute(predictions=predictions, references=references) == pytest.approx(
        {
            "accuracy": accuracy_score(references, predictions),
            "f1": f1_score(references, predictions),
            "matthews_correlation": matthews_corrcoef(references, predictions),
        }
    )
    # stsb scores are float32, as a model's logits: the result is scipy's on the same float32 values.
    scores, gold = rng.normal(size=300).astype(np.float32), rng.uniform(0, 5, size=300).astype(np.float32)
    stsb = GlueMetric("stsb")
    for score, label in zip(scores, gold):
        stsb.add(prediction=score, reference=label)
    expected = {"pearson": float(pearsonr(scores, gold)[0]), "spearmanr": float(spearmanr(scores, gold)[0])}
    assert stsb.compute() == expected


def test_bad_inputs():
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        GlueMetric("sst2").compute(predictions=[0, 1], references=[0, 1, 1])
    with pytest.raises(ValueError, match="No examples to score for sst2"):
        GlueMetric("sst2").compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="needs the task name as its config name"):
        GlueMetric()
    with pytest.raises(ValueError, match="Unknown GLUE task 'squad'"):
        GlueMetric("squad")


def test_loads_offline_from_an_empty_modules_cache(tmp_path):
    # A fresh interpreter, so evaluate reads the offline flags and the empty cache folders at import.
    script = (
        "import evaluate; from hf_distill.recipe_support.metrics import GLUE_METRIC_PATH; "
        "print(evaluate.load(GLUE_METRIC_PATH, 'sst2').compute(predictions=[1, 0, 1], references=[1, 1, 1]))"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_METRICS_CACHE": str(tmp_path / "metrics"),
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{{'accuracy': {2 / 3}}}"
    assert list((tmp_path / "modules").rglob("glue.py")), "evaluate.load did not go through its modules cache"


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
