"""
GLUE task metrics, computed offline.

Decision: the metrics are computed with scikit-learn and scipy behind `compute_glue_metrics`, because
`evaluate.load("glue", ...)` fetches its script from the Hugging Face Hub and fails offline. The definitions are the
ones of `evaluate`'s `glue` metric: accuracy; binary F1 with class 1 as the positive class (mrpc, qqp); Matthews
correlation (cola); Pearson and Spearman correlation (stsb). Values are plain Python floats under the same names.
"""

from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .glue import UNLABELLED, GlueTask, get_task

IGNORED_LABELS = (-100, UNLABELLED)
"""Label values of examples left out of the metrics: -100 (the loss's ignore index) and -1 (unlabelled)."""


def compute_glue_metrics(task: "str | GlueTask", predictions, references) -> dict[str, float]:
    """
    Compute the task's metrics (`task.metric_names`).

    Args:
        task: a `GlueTask` or its name.
        predictions: class ids `(num_examples,)` for classification, scores `(num_examples,)` for stsb.
        references: gold labels, same shape.

    Returns:
        `{metric name: value}`, e.g. `{"accuracy": 0.85, "f1": 0.89}` for mrpc.
    """
    task = get_task(task)
    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(
            f"predictions and references must have the same shape; got {predictions.shape} and {references.shape}. "
            "Pass class ids (after argmax) or regression scores, one per example."
        )
    if predictions.size == 0:
        raise ValueError(f"No examples to score for {task.name}: predictions and references are empty.")
    metric_functions = {
        "accuracy": lambda: accuracy_score(references, predictions),
        "f1": lambda: f1_score(references, predictions, pos_label=1, average="binary"),
        "matthews_correlation": lambda: matthews_corrcoef(references, predictions),
        "pearson": lambda: pearsonr(predictions, references)[0],
        "spearmanr": lambda: spearmanr(predictions, references)[0],
    }
    return {name: float(metric_functions[name]()) for name in task.metric_names}


def make_compute_metrics(task: "str | GlueTask") -> Callable[..., dict[str, float]]:
    """
    Build a `compute_metrics` function for `Trainer`.

    The returned function takes an `EvalPrediction` whose `predictions` are logits `(N, num_labels)` (argmax is
    taken) or regression scores `(N,)` / `(N, 1)`; a tuple of outputs uses its first element. Examples labelled
    -100 or -1 are left out; when none is labelled, it returns `{}`.
    """
    task = get_task(task)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = np.asarray(logits)
        if task.is_regression:
            predictions = logits.reshape(len(logits), -1)[:, 0]
        else:
            predictions = logits.argmax(axis=-1)
        references = np.asarray(eval_prediction.label_ids).reshape(-1)
        labelled = ~np.isin(references, IGNORED_LABELS)
        if not labelled.any():
            return {}
        return compute_glue_metrics(task, predictions[labelled], references[labelled])

    return compute_metrics
