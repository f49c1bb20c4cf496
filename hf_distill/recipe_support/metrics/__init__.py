"""
Task metrics as `evaluate` modules shipped in the package, so they work offline.

Each metric is one self-contained `evaluate.Metric` script in this folder (`glue.py`), usable in two ways:

    import evaluate
    from hf_distill.recipe_support.metrics import GLUE_METRIC_PATH, GlueMetric

    glue = evaluate.load(GLUE_METRIC_PATH, "mrpc")  # how `evaluate` loads any local module
    glue = GlueMetric("mrpc")                        # the same metric, imported
    glue.compute(predictions=[1, 0, 1], references=[1, 1, 1])

`make_compute_metrics(task)` wraps one for `Trainer`. Entity-level F1 for token classification is `seqeval.py`
(`SeqevalMetric`, `SEQEVAL_METRIC_PATH`, `make_token_classification_compute_metrics(label_names)`); exact match and F1
of extractive QA are `squad.py` (`SquadMetric("squad" | "squad_v2")`, `SQUAD_METRIC_PATH`,
`make_question_answering_compute_metrics(examples, features)`).
"""

import os

from .compute_metrics import (
    IGNORED_LABELS,
    make_compute_metrics,
    make_question_answering_compute_metrics,
    make_token_classification_compute_metrics,
)
from .glue import GlueMetric
from .seqeval import SeqevalMetric
from .squad import SquadMetric

GLUE_METRIC_PATH = os.path.join(os.path.dirname(__file__), "glue.py")
"""Path of the GLUE metric script, for `evaluate.load(GLUE_METRIC_PATH, task_name)`."""
SEQEVAL_METRIC_PATH = os.path.join(os.path.dirname(__file__), "seqeval.py")
"""Path of the entity-level metric script, for `evaluate.load(SEQEVAL_METRIC_PATH)`."""
SQUAD_METRIC_PATH = os.path.join(os.path.dirname(__file__), "squad.py")
"""Path of the extractive-QA metric script, for `evaluate.load(SQUAD_METRIC_PATH, "squad")` (or `"squad_v2"`)."""

__all__ = [
    "GLUE_METRIC_PATH",
    "IGNORED_LABELS",
    "SEQEVAL_METRIC_PATH",
    "SQUAD_METRIC_PATH",
    "GlueMetric",
    "SeqevalMetric",
    "SquadMetric",
    "make_compute_metrics",
    "make_question_answering_compute_metrics",
    "make_token_classification_compute_metrics",
]
