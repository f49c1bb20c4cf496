"""Perturbed copies of training text, for the teacher to label: data augmentation for distillation.

On small tasks with no unlabelled text, TinyBERT (Jiao et al. 2020) gives the student more inputs labelled by the
teacher by replacing words with BERT-MLM or GloVe neighbours. Here no model is needed: each copy edits a fraction of
its words, each edit replacing the word by one drawn from the corpus' own word frequencies, deleting it, or swapping
it with its right-hand neighbour. The copies carry no label: the teacher's soft labels are their only target, so an
edit that changes the meaning (or, for CoLA, the grammaticality) is what the teacher is asked to judge. Measured
(benchmarks/README.md): it helped CoLA and hurt the pair tasks MRPC and RTE, where both sentences are edited
independently.
"""

import numpy as np
from datasets import Dataset

EDIT_PROBABILITIES = {"replace": 0.6, "delete": 0.2, "swap": 0.2}


def _edit_words(words: list[str], word_prob: float, corpus_words: list[str], rng) -> list[str]:
    """One perturbed copy of `words`: `max(1, Binomial(len(words), word_prob))` edits at distinct positions.
    A replacement is a uniform draw from `corpus_words` (every word occurrence), i.e. by word frequency."""
    words = list(words)
    num_edits = max(1, rng.binomial(len(words), word_prob))
    positions = sorted(rng.choice(len(words), size=min(num_edits, len(words)), replace=False), reverse=True)
    edits = rng.choice(list(EDIT_PROBABILITIES), size=len(positions), p=list(EDIT_PROBABILITIES.values()))
    for position, edit in zip(positions, edits):
        if edit == "delete" and len(words) > 1:
            del words[position]
        elif edit == "swap" and position + 1 < len(words):
            words[position], words[position + 1] = words[position + 1], words[position]
        else:  # replace; also a delete that would empty the text, or a swap at the last word
            words[position] = corpus_words[rng.integers(len(corpus_words))]
    return words


def augment_dataset(dataset: Dataset, text_columns: "tuple[str, ...] | list[str]", copies: int, word_prob: float = 0.15,
                    seed: int = 0) -> Dataset:
    """
    `copies` perturbed copies of every row of `dataset`, each text column edited independently.

    Words are whitespace-separated tokens. Each column draws its replacement words from its own words across
    `dataset`, by frequency. Deterministic for a given `seed`.

    Returns:
        `Dataset` with only `text_columns`, `copies * len(dataset)` rows: row `i * copies + c` is copy `c` of row `i`.
    """
    if copies < 1:
        raise ValueError(f"copies must be at least 1 to augment, got {copies}.")
    if not 0 < word_prob <= 1:
        raise ValueError(f"word_prob is the fraction of words edited per copy and must be in (0, 1], got {word_prob}.")
    rng = np.random.default_rng(seed)
    augmented = {}
    for column in text_columns:
        texts = [text.split() or [text] for text in dataset[column]]
        corpus_words = [word for words in texts for word in words]
        augmented[column] = [
            " ".join(_edit_words(words, word_prob, corpus_words, rng)) for words in texts for _ in range(copies)
        ]
    return Dataset.from_dict(augmented, features=dataset.select_columns(list(text_columns)).features)
