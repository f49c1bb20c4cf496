"""
Exact match and F1 of extractive question answering, as an `evaluate` module that works offline, with the
definitions of the official SQuAD evaluation scripts (those of the Hub `squad` and `squad_v2` metrics).

An answer is normalised before comparison: lower-cased, punctuation removed, the articles `a`, `an`, `the` removed,
whitespace collapsed. Exact match of a question is 1 when the normalised prediction equals one normalised reference;
F1 is the harmonic mean of precision and recall over the bag of normalised words shared with a reference. Both take
the maximum over the question's references and are averaged over questions.

Configurations: `"squad"` (v1.1, every question has answers) and `"squad_v2"` (v2.0: a question whose references
are all empty after normalisation is unanswerable, its only reference is `""`; an empty prediction or reference
scores 1 on both metrics when the other is empty too, else 0).

Unlike the Hub metrics, which return percentages, the scores are fractions in [0, 1], as every metric of this
package returns them: multiply by 100 for the Hub's figures.

`evaluate.load` copies this file alone into its modules cache, so it imports nothing from this package.
"""

import collections
import re
import string

import datasets
import evaluate

_DESCRIPTION = "Exact match and F1 of extractive QA answers (official SQuAD v1.1 / v2.0 definitions), as fractions."

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
  title={{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={Proceedings of EMNLP 2016},
  pages={2383--2392},
  year={2016}
}
"""

_INPUTS_DESCRIPTION = """
Args:
    predictions: one `{"id": str, "prediction_text": str}` per question (`""`: no answer, for squad_v2).
    references: one `{"id": str, "answers": {"text": [str, ...], "answer_start": [int, ...]}}` per question, the
        Hub `squad` columns; matched to the predictions by `id`.
Returns:
    `exact_match` and `f1`, fractions in [0, 1] averaged over the questions; for `squad_v2` also `has_answer_f1`,
    `no_answer_f1` (and `_exact_match`) over the answerable and unanswerable questions, and their counts
    `has_answer_total`, `no_answer_total`.
Examples:
    >>> SquadMetric().compute(
    ...     predictions=[{"id": "q1", "prediction_text": "The red barn"}],
    ...     references=[{"id": "q1", "answers": {"text": ["red barn", "a barn"], "answer_start": [4, 2]}}])
    {'exact_match': 1.0, 'f1': 1.0}
"""

CONFIGS = ("squad", "squad_v2", "default")  # "default": no configuration given, v1.1
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, then articles, then collapse whitespace (the official order)."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str, empty_matches_empty: bool = False) -> float:
    """Word-bag F1 of the normalised texts. v1.1 scores 0 when nothing is shared; v2.0 (`empty_matches_empty`)
    scores 1 when both are empty."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if empty_matches_empty and (not predicted or not gold):
        return float(predicted == gold)
    shared = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


class SquadMetric(evaluate.Metric):
    """Exact match and F1 over questions, `"squad"` (v1.1) or `"squad_v2"` (unanswerable questions)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIGS:
            raise KeyError(f"Unknown configuration {self.config_name!r}: use one of {list(CONFIGS)}.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if len(references) == 0:
            raise ValueError("No questions to score: predictions and references are empty.")
        version_2 = self.config_name == "squad_v2"
        predicted = {row["id"]: row["prediction_text"] for row in predictions}
        scores = {True: [], False: []}  # has an answer -> [(exact match, f1)]
        for reference in references:
            if reference["id"] not in predicted:
                raise ValueError(
                    f"No prediction for question {reference['id']!r}: give one prediction (possibly '') per "
                    "reference id."
                )
            golds = list(reference["answers"]["text"])
            if version_2:
                golds = [gold for gold in golds if normalize_answer(gold)] or [""]
            elif not golds:
                raise ValueError(
                    f"Question {reference['id']!r} has no reference answer: SQuAD v1.1 scores answerable questions "
                    "only. Use the 'squad_v2' configuration for unanswerable questions."
                )
            prediction = predicted[reference["id"]]
            exact = max(exact_match_score(prediction, gold) for gold in golds)
            f1 = max(f1_score(prediction, gold, empty_matches_empty=version_2) for gold in golds)
            scores[golds != [""]].append((exact, f1))
        every = scores[True] + scores[False]
        results = {
            "exact_match": sum(exact for exact, _ in every) / len(every),
            "f1": sum(f1 for _, f1 in every) / len(every),
        }
        if version_2:
            for has_answer, prefix in ((True, "has_answer"), (False, "no_answer")):
                group = scores[has_answer]
                results[f"{prefix}_total"] = len(group)
                if group:
                    results[f"{prefix}_exact_match"] = sum(exact for exact, _ in group) / len(group)
                    results[f"{prefix}_f1"] = sum(f1 for _, f1 in group) / len(group)
        return results
