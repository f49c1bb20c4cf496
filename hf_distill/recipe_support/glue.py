"""GLUE task registry, data loading (Hub or local files) with validation, and tokenization.

Local files use the Hugging Face `glue` column layout (`sentence` / `sentence1, sentence2` / ..., `label`, `idx`).
TSV files are read with standard CSV quoting and `keep_default_na=False`, so a sentence such as "null" stays text.
"""

import os
from dataclasses import dataclass

import numpy as np
from datasets import ClassLabel, DatasetDict, Value, load_dataset

UNLABELLED = -1
"""Label value of an unlabelled example (the Hub's GLUE test splits use it for every row)."""


@dataclass(frozen=True)
class GlueTask:
    """
    One GLUE task: its columns, labels and metrics.

    Attributes:
        name: the Hugging Face `glue` config name (`"sst2"`, `"mnli"`, ...).
        text_columns: the one or two text columns fed to the tokenizer, in order.
        label_names: class names indexed by label id; `()` for the regression task (stsb).
        is_regression: whether the label is a float score (stsb) rather than a class id.
        metric_names: the metrics reported for the task, as returned by `hf_distill.recipe_support.metrics.GlueMetric`.
        main_metric: the single "task metric" used to compare models.
        eval_splits: the evaluation split names (`("validation",)`; mnli has matched and mismatched).
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    is_regression: bool
    metric_names: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def num_labels(self) -> int:
        """Size of the classifier head: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        """`{label id: name}` for the model config; `{}` for regression."""
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        """`{name: label id}` for the model config; `{}` for regression."""
        return {name: i for i, name in enumerate(self.label_names)}


def _classification(name, text_columns, label_names, metric_names=("accuracy",), main_metric="accuracy", **kwargs):
    return GlueTask(name, text_columns, label_names, False, metric_names, main_metric, **kwargs)


_PAIR = ("sentence1", "sentence2")
GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        _classification(
            "cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), "matthews_correlation"
        ),
        _classification("sst2", ("sentence",), ("negative", "positive")),
        _classification("mrpc", _PAIR, ("not_equivalent", "equivalent"), ("accuracy", "f1"), "f1"),
        GlueTask("stsb", _PAIR, (), True, ("pearson", "spearmanr"), "pearson"),
        _classification("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "f1"),
        _classification(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
        _classification("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        _classification("rte", _PAIR, ("entailment", "not_entailment")),
        _classification("wnli", _PAIR, ("not_entailment", "entailment")),
    )
}


def get_task(name: "str | GlueTask") -> GlueTask:
    """Return the `GlueTask` called `name` (case-insensitive); a `GlueTask` is returned as is."""
    if isinstance(name, GlueTask):
        return name
    task = GLUE_TASKS.get(str(name).lower())
    if task is None:
        raise ValueError(f"Unknown GLUE task {name!r}. Choose one of: {', '.join(GLUE_TASKS)}.")
    return task


def _read_local_files(data_files: dict[str, str]) -> DatasetDict:
    for split, path in data_files.items():
        file_format = _file_format(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The {split} file {path!r} does not exist. Check the path.")
        # An empty file otherwise fails inside `datasets` with "Instruction 'train' corresponds to no data".
        if not _has_examples(path, file_format):
            raise ValueError(f"The {split} file {path!r} has no examples. Give a file with at least one row.")
    # One `load_dataset` call per split: a single call needs the same columns in every file, but a test file
    # often has no `label` column.
    return DatasetDict({split: _read_local_file(path) for split, path in data_files.items()})


def _read_local_file(path: str):
    file_format = _file_format(path)
    if file_format == "tsv":
        return load_dataset("csv", data_files=path, delimiter="\t", keep_default_na=False, split="train")
    if file_format == "csv":
        return load_dataset("csv", data_files=path, keep_default_na=False, split="train")
    return load_dataset("json", data_files=path, split="train")


def _has_examples(path: str, file_format: str) -> bool:
    with open(path, encoding="utf-8") as file:
        if file_format == "json":
            return file.read(4096).strip() not in ("", "[]")
        lines = (line for line in file if line.strip())
        return next(lines, None) is not None and next(lines, None) is not None


def _file_format(path: str) -> str:
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    formats = {"tsv": "tsv", "csv": "csv", "json": "json", "jsonl": "json"}
    if extension not in formats:
        raise ValueError(f"Unsupported data file {path!r}: expected a .tsv, .csv, .json or .jsonl file.")
    return formats[extension]


def load_glue_data(
    task: "str | GlueTask",
    *,
    dataset_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    extra_eval_files: dict[str, str] | None = None,
) -> DatasetDict:
    """
    Load and validate a GLUE task, from the Hub or from local files.

    With no local file, loads `load_dataset(dataset_name or "glue", task.name)`. Otherwise loads only the local
    files (`.tsv`, `.csv`, `.json` or `.jsonl`): `train_file` becomes the `"train"` split,
    `validation_file` the task's first evaluation split (`"validation"`; `"validation_matched"` for mnli), and
    `extra_eval_files` maps further split names to files (e.g. `{"validation_mismatched": "dev_mm.tsv"}`).

    Every split must hold the task's text columns and be non-empty. A split without a `label` column, or whose
    labels are all -1, is unlabelled. Otherwise classification labels must be integers in `range(num_labels)`
    (local files are cast to a `ClassLabel` with the task's names) and regression labels numbers (cast to
    `float32`, which the regression loss expects).

    Returns:
        `datasets.DatasetDict` with one `Dataset` per split.
    """
    task = get_task(task)
    data_files = dict(extra_eval_files or {})
    if train_file is not None:
        data_files["train"] = train_file
    if validation_file is not None:
        data_files[task.eval_splits[0]] = validation_file
    if data_files:
        dataset_dict = _read_local_files(data_files)
    else:
        dataset_dict = load_dataset(dataset_name or "glue", task.name)

    for split, dataset in dataset_dict.items():
        _validate_split(dataset, split, task)
        if "label" in dataset.column_names:
            dataset_dict[split] = _cast_labels(dataset, task)
    return dataset_dict


def _validate_split(dataset, split: str, task: GlueTask) -> None:
    if len(dataset) == 0:
        raise ValueError(f"The {split!r} split of {task.name} is empty. Give a file with at least one example.")
    missing = [column for column in task.text_columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {split!r} split has no column {missing[0]!r}, which GLUE task {task.name!r} needs. Columns present: "
            f"{dataset.column_names}; expected the GLUE columns {list(task.text_columns)} plus 'label' (and "
            "optionally 'idx'). Rename the columns of your file to match."
        )
    if "label" not in dataset.column_names:
        return
    feature = dataset.features["label"]
    labels = dataset.select_columns(["label"]).with_format("numpy")[:]["label"]
    if labels.dtype.kind in "iuf" and np.all(labels == UNLABELLED):
        return
    if task.is_regression:
        _validate_regression_labels(labels, feature, split)
    else:
        _validate_class_labels(labels, feature, split, task)


def _plain(value):
    """A numpy scalar as the Python value, for readable error messages."""
    return value.item() if isinstance(value, np.generic) else value


def _validate_regression_labels(labels: np.ndarray, feature, split: str) -> None:
    if labels.dtype.kind not in "iuf":
        raise ValueError(
            f"The {split!r} split has non-numeric regression labels (type {feature}, first value "
            f"{_plain(labels[0])!r}). "
            "stsb labels must be similarity scores such as 3.8."
        )
    bad = np.flatnonzero(~np.isfinite(labels.astype(np.float64)))
    if bad.size:
        raise ValueError(
            f"The {split!r} split has a non-finite regression label {_plain(labels[bad[0]])!r} at row {bad[0]}. "
            "Remove or fix that row."
        )


def _validate_class_labels(labels: np.ndarray, feature, split: str, task: GlueTask) -> None:
    label_map = ", ".join(f"{i} = {name}" for i, name in task.id2label.items())
    if labels.dtype.kind not in "iu":
        fractional = np.flatnonzero(labels != np.round(labels)) if labels.dtype.kind == "f" else []
        row = int(fractional[0]) if len(fractional) else 0
        raise ValueError(
            f"The {split!r} split of {task.name} has non-integer labels (type {feature}); the first offending value "
            f"is {_plain(labels[row])!r} at row {row}. Labels must be integer class ids ({label_map}); map names to "
            "ids or cast the column with `dataset.cast_column('label', Value('int64'))`."
        )
    out_of_range = (labels < 0) | (labels >= task.num_labels)
    if np.any(out_of_range):
        row = int(np.flatnonzero(out_of_range)[0])
        hint = (
            " -1 marks an unlabelled example and is allowed only when every label of the split is -1."
            if labels[row] == UNLABELLED
            else ""
        )
        raise ValueError(
            f"The {split!r} split of {task.name} has label {labels[row]} at row {row}, outside range(0, "
            f"{task.num_labels}). Allowed labels: {label_map}.{hint} Fix the label or drop the row."
        )


def _cast_labels(dataset, task: GlueTask):
    feature = dataset.features["label"]
    if task.is_regression:
        target = Value("float32")
    elif isinstance(feature, ClassLabel):
        return dataset
    else:
        target = ClassLabel(names=list(task.label_names))
    return dataset if feature == target else dataset.cast_column("label", target)


def tokenize_glue(dataset_dict: DatasetDict, tokenizer, task: "str | GlueTask", max_length: int | None = None):
    """
    Tokenize the task's text columns (one text or a pair) with truncation and no padding.

    Padding is left to a dynamic-padding collator such as `DataCollatorWithPadding`. The text columns are dropped;
    `label`, `idx` and any other column are kept.

    Returns:
        `datasets.DatasetDict` with `input_ids`, `attention_mask` (and `token_type_ids` when the tokenizer makes
        them) added to each split.
    """
    task = get_task(task)

    def tokenize(batch):
        texts = [batch[column] for column in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return dataset_dict.map(
        tokenize,
        batched=True,
        remove_columns=list(task.text_columns),
        desc=f"Tokenizing {task.name}",
    )
