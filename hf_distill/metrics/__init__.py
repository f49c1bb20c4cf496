"""
Task metrics as `evaluate` modules shipped in the package, so they work offline.

Each metric is one self-contained `evaluate.Metric` script in this folder (`glue.py`), usable in two ways:

    import evaluate
    from hf_distill.metrics import GLUE_METRIC_PATH, GlueMetric

    glue = evaluate.load(GLUE_METRIC_PATH, "mrpc")  # how `evaluate` loads any local module
    glue = GlueMetric("mrpc")                        # the same metric, imported
    glue.compute(predictions=[1, 0, 1], references=[1, 1, 1])

`make_compute_metrics(task)` wraps one for `Trainer`. A further metric (e.g. entity F1 for token classification)
is a new script beside `glue.py`, its class and path exported here, and its `compute_metrics` builder in
`compute_metrics.py`.
"""

import os

from .compute_metrics import IGNORED_LABELS, make_compute_metrics
from .glue import GlueMetric

GLUE_METRIC_PATH = os.path.join(os.path.dirname(__file__), "glue.py")
"""Path of the GLUE metric script, for `evaluate.load(GLUE_METRIC_PATH, task_name)`."""

__all__ = ["GLUE_METRIC_PATH", "IGNORED_LABELS", "GlueMetric", "make_compute_metrics"]
