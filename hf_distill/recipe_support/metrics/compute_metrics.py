"""`compute_metrics` functions for `Trainer`: a model's outputs to predictions, scored by an `evaluate` metric."""

from collections.abc import Callable

import numpy as np

from ..glue import UNLABELLED, GlueTask, get_task
from ..tasks.question_answering import postprocess_qa_predictions
from .glue import GlueMetric
from .seqeval import SeqevalMetric
from .squad import SquadMetric

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


def make_token_classification_compute_metrics(label_names) -> Callable[..., dict[str, float]]:
    """
    Build a `compute_metrics` function for token classification that scores with `SeqevalMetric`.

    The returned function takes an `EvalPrediction` whose `predictions` are logits `(N, seq_len, num_labels)` and
    whose `label_ids` are `(N, seq_len)`; only positions labelled other than -100 are scored (the first sub-token
    of every word), so the scores are per word. `label_names[i]` is the IOB tag of class `i`.
    """
    label_names = list(label_names)
    metric = SeqevalMetric(keep_in_memory=True)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        references = np.asarray(eval_prediction.label_ids)
        predicted_tags, gold_tags = [], []
        for predicted_row, gold_row in zip(predictions, references):
            kept = gold_row != -100
            predicted_tags.append([label_names[i] for i in predicted_row[kept]])
            gold_tags.append([label_names[i] for i in gold_row[kept]])
        if not any(gold_tags):
            return {}
        return metric.compute(predictions=predicted_tags, references=gold_tags)

    return compute_metrics


def make_question_answering_compute_metrics(
    examples, features, version_2_with_negative: bool = False, n_best_size: int = 20, max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> Callable[..., dict[str, float]]:
    """
    Build a function that scores extractive-QA predictions with `SquadMetric` (`"squad"` or `"squad_v2"`).

    The returned function takes an `EvalPrediction` (or a tuple) whose `predictions` are `(start_logits,
    end_logits)`, each `(num_features, seq_len)`, in the order of `features` (`prepare_validation_features` of
    `examples`); `postprocess_qa_predictions` turns them into one answer per question of `examples`. Trainer only
    calls `compute_metrics` with labels, so call it on `Trainer.predict`'s predictions (in order: no length
    grouping).
    """
    metric = SquadMetric("squad_v2" if version_2_with_negative else "squad", keep_in_memory=True)
    references = [{"id": id_, "answers": answers} for id_, answers in zip(examples["id"], examples["answers"])]

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions = getattr(eval_prediction, "predictions", eval_prediction)
        start_logits, end_logits = predictions[:2]
        answers = postprocess_qa_predictions(
            examples, features, np.asarray(start_logits), np.asarray(end_logits), version_2_with_negative,
            n_best_size, max_answer_length, null_score_diff_threshold,
        )
        return metric.compute(
            predictions=[{"id": id_, "prediction_text": text} for id_, text in answers.items()], references=references
        )

    return compute_metrics
