"""
Entity-level precision, recall and F1 for sequence labelling (NER, chunking), as an `evaluate` module that works
offline, with the definitions of `seqeval` (Ramshaw & Marcus chunks, the CoNLL-2000 `conlleval` counts) in its
default mode, plus token accuracy.

Tags are IOB strings: `O`, `B-TYPE`, `I-TYPE` (IOB2, as Hugging Face's `conll2003`; IOB1 files read the same way).
An entity is a maximal run that starts at `B-X`, or at `I-X` after `O` or after a tag of another type, and goes on
through `I-X`. An entity counts as correct when the prediction has one of the same type over exactly the same
tokens. Precision = correct / predicted entities, recall = correct / gold entities, F1 their harmonic mean (0 when
either is 0); `accuracy` = tokens whose tag is right / tokens. Per-type scores are returned as `<TYPE>_f1` etc.

`evaluate.load` copies this file alone into its modules cache, so it imports nothing from this package.
"""

import datasets
import evaluate

_DESCRIPTION = "Entity-level precision, recall and F1 (seqeval's default mode, IOB tags) and token accuracy."

_CITATION = """\
@inproceedings{tjong-kim-sang-de-meulder-2003-introduction,
  title={Introduction to the {C}o{NLL}-2003 Shared Task: Language-Independent Named Entity Recognition},
  author={Tjong Kim Sang, Erik F. and De Meulder, Fien},
  booktitle={Proceedings of CoNLL-2003},
  pages={142--147},
  year={2003}
}
"""

_INPUTS_DESCRIPTION = """
Args:
    predictions: one list of tags per sentence, e.g. `[["B-PER", "I-PER", "O"]]`.
    references: the gold tags, same lengths.
Returns:
    `precision`, `recall`, `f1` (over all entities), `accuracy` (over tokens), and per entity type
    `<TYPE>_precision`, `<TYPE>_recall`, `<TYPE>_f1`, `<TYPE>_number` (gold entities of the type).
Examples:
    >>> SeqevalMetric().compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "B-LOC"]])
    ... # precision 1.0, recall 0.5, f1 2/3, accuracy 2/3, PER_f1 1.0, LOC_f1 0.0
"""


def split_iob_tag(tag: str) -> tuple[str, str]:
    """`("B", "PER")` for `"B-PER"`, `("O", "")` for `"O"`."""
    if tag == "O":
        return "O", ""
    prefix, _, entity_type = tag.partition("-")
    if prefix not in ("B", "I") or not entity_type:
        raise ValueError(
            f"Tag {tag!r} is not an IOB tag: use 'O', 'B-<type>' or 'I-<type>' (IOB2, as in Hugging Face's "
            "conll2003). Map other schemes (IOBES, BILOU) to IOB first."
        )
    return prefix, entity_type


def extract_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence as `(type, first token, last token)`, by seqeval's default rules."""
    entities, start, current = set(), None, ""
    for index, tag in enumerate([*tags, "O"]):  # a final "O" closes the last entity
        prefix, entity_type = split_iob_tag(tag)
        continues = prefix == "I" and entity_type == current and start is not None
        if start is not None and not continues:
            entities.add((current, start, index - 1))
            start, current = None, ""
        if prefix != "O" and not continues:
            start, current = index, entity_type
    return entities


def _scores(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


class SeqevalMetric(evaluate.Metric):
    """Entity P/R/F1 and token accuracy over sentences of IOB tags."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("No sentences to score: predictions and references are empty.")
        counts: dict[str, list[int]] = {}  # type -> [correct, predicted, gold]
        right_tokens = total_tokens = 0
        for index, (predicted_tags, gold_tags) in enumerate(zip(predictions, references)):
            if len(predicted_tags) != len(gold_tags):
                raise ValueError(
                    f"Sentence {index} has {len(predicted_tags)} predicted tags but {len(gold_tags)} gold tags: "
                    "give one prediction per gold token."
                )
            right_tokens += sum(p == g for p, g in zip(predicted_tags, gold_tags))
            total_tokens += len(gold_tags)
            predicted, gold = extract_entities(predicted_tags), extract_entities(gold_tags)
            for entity_type, *_ in predicted | gold:
                counts.setdefault(entity_type, [0, 0, 0])
            for entity in predicted & gold:
                counts[entity[0]][0] += 1
            for entity in predicted:
                counts[entity[0]][1] += 1
            for entity in gold:
                counts[entity[0]][2] += 1
        totals = [sum(values[i] for values in counts.values()) for i in range(3)]
        precision, recall, f1 = _scores(*totals)
        results = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "accuracy": right_tokens / total_tokens if total_tokens else 0.0,
        }
        for entity_type in sorted(counts):
            type_precision, type_recall, type_f1 = _scores(*counts[entity_type])
            results.update({
                f"{entity_type}_precision": type_precision,
                f"{entity_type}_recall": type_recall,
                f"{entity_type}_f1": type_f1,
                f"{entity_type}_number": counts[entity_type][2],
            })
        return results
