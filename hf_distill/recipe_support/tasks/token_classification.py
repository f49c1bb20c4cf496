"""Token classification (NER, chunking) data: loading from the Hub or local files, label names, and sub-token
alignment of word labels.

Local files: JSON lines (`{"tokens": [...], "ner_tags": [...]}`, tags as strings or ints) or CoNLL columns (one
token a line, its tag in the last column, a blank line between sentences, `-DOCSTART-` lines skipped). Tags are
IOB (`O`, `B-X`, `I-X`); integer tags take their names from the dataset's `ClassLabel`, from `label_names`, or
from a `labels.json` beside the train file (`{"ner_tags": [names]}`, the layout of the shared CoNLL-2003 copy).
"""

import json
import os

from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value, load_dataset

from ..metrics.seqeval import split_iob_tag
from .columns import pick_column

IGNORE_INDEX = -100
"""Label of positions without a target (special tokens, continuation sub-tokens, unlabelled sentences)."""
TOKEN_COLUMNS = ("tokens", "words")
LABEL_COLUMNS = ("ner_tags", "tags", "ner", "labels")
CONLL_SUFFIXES = (".txt", ".conll", ".tsv", ".iob")


def read_conll(path: str) -> dict[str, list]:
    """`{"tokens": [[...]], "ner_tags": [[...]]}` from a CoNLL-columns file (tag = last column)."""
    sentences, tags, tokens, labels = [], [], [], []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    sentences.append(tokens)
                    tags.append(labels)
                tokens, labels = [], []
                continue
            if len(fields) < 2:
                raise ValueError(
                    f"{path}, line {number}: {line.strip()!r} has one column. A CoNLL file has the token first and "
                    "its tag in the last column, separated by whitespace, and a blank line between sentences."
                )
            tokens.append(fields[0])
            labels.append(fields[-1])
    if tokens:
        sentences.append(tokens)
        tags.append(labels)
    return {"tokens": sentences, "ner_tags": tags}


def _read_file(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No file at {path!r}: pass an existing JSON lines or CoNLL file.")
    if path.endswith(CONLL_SUFFIXES):
        return Dataset.from_dict(read_conll(path))
    if path.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=path, split="train")
    raise ValueError(
        f"Cannot tell the format of {path!r}: use .json/.jsonl (JSON lines with tokens and ner_tags) or "
        f"{'/'.join(CONLL_SUFFIXES)} (CoNLL columns)."
    )


def _label_names(dataset: Dataset, label_column: str, label_names, labels_file: str | None) -> list[str]:
    feature = dataset.features[label_column]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    if label_names:
        return list(label_names)
    if inner is not None and inner.dtype == "string":
        # Sorted as run_ner.py does, with "O" first so that class 0 is "outside" as in conll2003.
        names = sorted({tag for row in dataset[label_column] for tag in row})
        return sorted(names, key=lambda name: name != "O")
    if labels_file and os.path.isfile(labels_file):
        with open(labels_file, encoding="utf-8") as file:
            stored = json.load(file)
        names = stored.get(label_column) if isinstance(stored, dict) else stored
        if names:
            return list(names)
    raise ValueError(
        f"The tags in column {label_column!r} are integers without names. Give the names in order with "
        f"--tag_names, or put them in {labels_file or 'a labels.json beside the train file'} as "
        f'{{"{label_column}": ["O", "B-PER", ...]}}.'
    )


def _validate(dataset: Dataset, split: str, token_column: str, label_column: str, names: list[str]) -> None:
    if len(dataset) == 0:
        raise ValueError(f"The {split} split has no sentences.")
    for index, (tokens, tags) in enumerate(zip(dataset[token_column], dataset[label_column])):
        if len(tokens) != len(tags):
            raise ValueError(
                f"Sentence {index} of the {split} split has {len(tokens)} tokens but {len(tags)} tags: every token "
                "needs exactly one tag."
            )
        bad = [tag for tag in tags if not (0 <= tag < len(names))]
        if bad:
            raise ValueError(
                f"Sentence {index} of the {split} split has tag id {bad[0]}, outside the {len(names)} label names "
                f"{names}. Fix the data or the label names."
            )


def load_token_classification_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: dict[str, str] | None = None,
    token_column: str | None = None,
    label_column: str | None = None,
    label_names: list[str] | None = None,
) -> tuple[DatasetDict, list[str]]:
    """
    Load token-classification splits with `tokens` and integer `ner_tags` columns, checked.

    Args:
        dataset_name: Hub dataset (e.g. `"conll2003"`) when `data_files` is not given.
        data_files: `{split: path}` of local files (JSON lines or CoNLL columns); splits `train`, `validation`, ...
        token_column / label_column: column names; default the first of `tokens, words` / `ner_tags, tags, ner,
            labels` present.
        label_names: tag names by id, for integer tags without names.

    Returns:
        `(splits, label_names)`: every split with columns `tokens` (list of str) and `ner_tags` (list of
        `ClassLabel(names=label_names)`), and the tag names, which are IOB tags.
    """
    if data_files:
        raw = DatasetDict({split: _read_file(path) for split, path in data_files.items() if path})
        labels_file = os.path.join(os.path.dirname(os.path.abspath(data_files["train"])), "labels.json") if (
            "train" in data_files
        ) else None
    elif dataset_name:
        raw = load_dataset(dataset_name, dataset_config_name)
        labels_file = None
    else:
        raise ValueError("Give either --dataset_name (a Hub dataset) or --train_file and --validation_file.")
    first = next(iter(raw.values()))
    token_column = pick_column(first.column_names, token_column, TOKEN_COLUMNS, "token", "--text_column_name")
    label_column = pick_column(first.column_names, label_column, LABEL_COLUMNS, "tag", "--label_column_name")
    names = _label_names(first, label_column, label_names, labels_file)
    for name in names:
        split_iob_tag(name)  # IOB names only: entity-level scores need them
    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=names))})
    label2id = {name: index for index, name in enumerate(names)}
    splits = {}
    for split, dataset in raw.items():
        if token_column not in dataset.column_names or label_column not in dataset.column_names:
            raise ValueError(f"The {split} split lacks the {token_column!r} or {label_column!r} column.")
        dataset = dataset.select_columns([token_column, label_column])
        tags_feature = getattr(dataset.features[label_column], "feature", None)
        if tags_feature is not None and getattr(tags_feature, "dtype", None) == "string":
            unknown = sorted({tag for row in dataset[label_column] for tag in row} - set(names))
            if unknown:
                raise ValueError(
                    f"The {split} split has the tags {unknown}, which the train split does not have ({names}). "
                    "Give every tag with --tag_names, in order."
                )
            dataset = dataset.map(lambda row: {label_column: [label2id[tag] for tag in row[label_column]]})
        _validate(dataset, split, token_column, label_column, names)
        dataset = dataset.rename_columns({token_column: "tokens", label_column: "ner_tags"})
        splits[split] = dataset.cast(features)
    return DatasetDict(splits), names


def read_transfer_sentences(path: str) -> Dataset:
    """Unlabelled sentences for the distillation term: plain text (one sentence a line, words split on whitespace),
    JSON lines with `tokens`, or a CoNLL file (its tags are ignored). Returns a dataset with a `tokens` column."""
    if path.endswith((".json", ".jsonl") + CONLL_SUFFIXES[1:]):
        dataset = _read_file(path)
        column = pick_column(dataset.column_names, None, TOKEN_COLUMNS, "token", "--transfer_file")
        return dataset.select_columns([column]).rename_columns({column: "tokens"}) if column != "tokens" else (
            dataset.select_columns(["tokens"])
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No transfer file at {path!r}.")
    with open(path, encoding="utf-8") as file:
        sentences = [line.split() for line in file if line.strip()]
    if not sentences:
        raise ValueError(f"The transfer file {path} has no sentences.")
    return Dataset.from_dict({"tokens": sentences})


def b_to_i(label_names: list[str]) -> list[int]:
    """For each label id, the id of its `I-` form (`B-PER` -> `I-PER`); other labels map to themselves."""
    ids = {name: index for index, name in enumerate(label_names)}
    return [ids.get("I-" + name[2:], index) if name.startswith("B-") else index for index, name in
            enumerate(label_names)]


def tokenize_and_align_labels(
    dataset: Dataset, tokenizer, label_names: list[str], max_length: int, label_all_tokens: bool = False
) -> Dataset:
    """
    Tokenize pre-split words and align word tags with sub-tokens.

    The first sub-token of each word carries its tag; the other sub-tokens carry -100 or, with
    `label_all_tokens`, the word's tag (its `I-` form after a `B-`, as `run_ner.py` does). Special tokens are -100,
    and so is every position of a row without `ner_tags` (unlabelled transfer text: distillation term only).

    Returns:
        The dataset with `input_ids`, `attention_mask` (, `token_type_ids`) and `labels` `(seq_len,)` only.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: aligning word tags with sub-tokens needs word_ids(), "
            "which only fast tokenizers give. Use a checkpoint with a tokenizer.json (a fast tokenizer)."
        )
    inside = b_to_i(label_names)
    has_tags = "ner_tags" in dataset.column_names

    def align(batch):
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        all_labels = []
        for row in range(len(batch["tokens"])):
            tags = batch["ner_tags"][row] if has_tags else None
            labels, previous = [], None
            for word in encoded.word_ids(row):
                if word is None or tags is None:
                    labels.append(IGNORE_INDEX)
                elif word != previous:
                    labels.append(tags[word])
                else:
                    labels.append(inside[tags[word]] if label_all_tokens else IGNORE_INDEX)
                previous = word
            all_labels.append(labels)
        encoded["labels"] = all_labels
        return encoded

    return dataset.map(align, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
