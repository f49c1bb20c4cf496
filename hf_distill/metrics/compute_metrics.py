"""`compute_metrics` functions for `Trainer`: a model's outputs to predictions, scored by an `evaluate` metric."""

from collections.abc import Callable

import numpy as np

from ..glue import UNLABELLED, GlueTask, get_task
from .glue import GlueMetric

IGNORED_LABELS = (-100, UNLABELLED)
"""Label values of examples left out of the metrics: -100 (the loss's ignore index) and -1 (unlabelled)."""


def make_compute_metrics(task: "str | GlueTask") -> Callable[..., dict[str, float]]:
    """
    Build a `compute_metrics` function for `Trainer` that scores with `GlueMetric(task.name)`.

    The returned function takes an `EvalPrediction` whose `predictions` are logits `(N, num_labels)` (argmax is
    taken) or regression scores `(N,)` / `(N, 1)`; a tuple of outputs uses its first element. Examples labelled
    -100 or -1 are left out; when none is labelled, it returns `{}`.
    """
    task = get_task(task)
    # In memory: every process of a distributed evaluation scores the gathered predictions itself, and evaluate's
    # on-disk cache would have them contend for the same files.
    metric = GlueMetric(task.name, keep_in_memory=True)

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
        return metric.compute(predictions=predictions[labelled], references=references[labelled])

    return compute_metrics
