"""Checks of a distillation run's inputs, made before any teacher pass, cache or checkpoint is written.

Each check raises `ValueError` with what is wrong and what to do. Dataset checks read whole columns through Arrow
(no row decoding), so they cost a small fraction of one teacher pass.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .heads import TOPK, DistillationHead
from .teacher import check_teacher_has_logits

# Columns Trainer's collators turn into the labels of the batch.
LABEL_COLUMNS = ("label", "labels", "label_ids")


def check_distillation_inputs(
    student, teacher, head: DistillationHead, args, train_dataset, eval_dataset, tokenizer
) -> None:
    """Every check of `DistillationTrainer`'s inputs that needs no teacher pass: run before any is made.

    The eval datasets are checked with the train one, so a bad eval set fails before the train cache is built.
    Teacher columns are checked against the head by the trainer (`check_teacher_columns`).
    """
    if teacher is not None:
        check_teacher_has_logits(teacher)
    if args.online_top_k and head.cache_layout != TOPK:
        raise ValueError(
            f"online_top_k=True applies to vocabulary-sized outputs (causal and seq2seq LMs); this student's "
            f"{head.name} head distils the teacher's full distribution: drop online_top_k."
        )
    config = getattr(student, "config", None)
    if config is None:
        return
    vocabulary_head = head.cache_layout == TOPK
    num_labels = None if vocabulary_head or head.name == "question_answering" else config.num_labels
    if num_labels is not None:
        check_distillation_loss(args.distillation_loss, num_labels)
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if not vocabulary_head:  # language models may pad their embedding rows beyond the tokenizer
        check_tokenizer_vocabulary(tokenizer, vocab_size)
    eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}
    named = {"train": train_dataset}
    named.update({f"eval '{key}'" if key else "eval": value for key, value in eval_datasets.items()})
    for name, dataset in named.items():
        check_dataset(
            dataset,
            name,
            input_column=head.input_names[0],
            sample_weight_column=args.sample_weight_column,
            num_labels=num_labels,
            vocab_size=vocab_size,
            has_teacher=teacher is not None,
        )


def check_distillation_loss(distillation_loss: str, num_labels: int) -> None:
    """Refuse a divergence on a regression head, where a softmax over one logit is 1 and the loss is always 0."""
    if distillation_loss in ("kl", "reverse_kl", "jsd") and num_labels == 1:
        raise ValueError(
            f"distillation_loss={distillation_loss!r} on a regression head (num_labels=1) trains on nothing: a "
            "softmax over one logit "
            "is always 1, so the KL term and its gradient are 0. Use distillation_loss='mse' or 'auto' (MSE between "
            "the logits for num_labels=1)."
        )


def check_tokenizer_vocabulary(tokenizer, vocab_size: int | None) -> None:
    """Refuse a tokenizer that can produce ids the models' embeddings do not have."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or vocab_size is None:
        return
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has {len(tokenizer)} tokens but the models' vocabulary has "
            f"{vocab_size}: ids {vocab_size}.. would index past the embeddings. Use the tokenizer the teacher was "
            "trained with (or resize both models' embeddings with resize_token_embeddings)."
        )


def flat_column(dataset: Dataset, column: str) -> pa.Array:
    """The column `column` as one flat Arrow array (list columns flattened)."""
    values = dataset.with_format("arrow")[column]
    if isinstance(values, pa.Table):
        values = values.column(0)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(
        values.type
    ):
        values = pc.list_flatten(values)
    return values


def check_dataset(
    dataset,
    name: str,
    *,
    input_column: str,
    sample_weight_column: str,
    num_labels: int | None,
    vocab_size: int | None,
    has_teacher: bool,
) -> None:
    """Everything about one dataset that would otherwise fail during or after a teacher pass or at step 1.

    Checks that it is not empty, that a teacher has its inputs (`input_column`: `input_ids`, `pixel_values`), that
    token ids fit the vocabulary, that class labels are below `num_labels` (classification heads), and that
    sample weights are finite, >= 0 and not all 0.
    """
    if not isinstance(dataset, Dataset):
        return
    if len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: give it at least one example.")
    columns = dataset.column_names
    # A dataset with a transform (set_transform / with_transform) makes its inputs on access.
    if has_teacher and input_column not in columns and dataset.format["type"] != "custom":
        raise ValueError(
            f"The {name} dataset has no '{input_column}' column (columns: {columns}): "
            f"{'tokenize' if input_column == 'input_ids' else 'process'} it before training, so that the teacher "
            "can read it."
        )
    if "input_ids" in columns and vocab_size is not None:
        _check_token_ids(flat_column(dataset, "input_ids"), name, vocab_size)
    for column in LABEL_COLUMNS:
        if column in columns and num_labels is not None and num_labels > 1:
            _check_class_labels(flat_column(dataset, column), name, column, num_labels)
    if sample_weight_column in columns:
        _check_sample_weights(flat_column(dataset, sample_weight_column), name, sample_weight_column)


def _check_token_ids(token_ids: pa.Array, name: str, vocab_size: int) -> None:
    if len(token_ids) == 0:
        return
    low, high = pc.min_max(token_ids).values()
    if low.as_py() < 0 or high.as_py() >= vocab_size:
        raise ValueError(
            f"The {name} dataset's input_ids range over {low.as_py()}..{high.as_py()}, but the models' vocabulary "
            f"has ids 0..{vocab_size - 1}. The data was tokenized with another tokenizer: tokenize it with the "
            "teacher's."
        )


def _check_class_labels(labels: pa.Array, name: str, column: str, num_labels: int) -> None:
    values = labels.to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"The {name} dataset's '{column}' column holds {values.dtype} values, but a classification head "
            f"(num_labels={num_labels}) needs integer class ids: cast the column to int (-1 marks an unlabelled "
            "example)."
        )
    too_large = np.flatnonzero(values >= num_labels)
    if too_large.size:
        raise ValueError(
            f"The {name} dataset's '{column}' column holds label {values[too_large[0]]} (row {too_large[0]}) but the "
            f"models have num_labels={num_labels}, classes 0..{num_labels - 1}. Map the labels to 0..{num_labels - 1} "
            "(negative values mark unlabelled examples), or build both models with the right num_labels."
        )


def _check_sample_weights(weights: pa.Array, name: str, column: str) -> None:
    values = weights.to_numpy(zero_copy_only=False).astype(np.float64)
    where = f"The {name} dataset's '{column}' column"
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"{where} holds NaN or infinite weights in {bad.size} rows (first: row {bad[0]}). Give every example a "
            "finite weight >= 0."
        )
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise ValueError(
            f"{where} holds negative weights in {negative.size} rows (first: row {negative[0]}, "
            f"{values[negative[0]]}). A loss weight must be >= 0: use 0 to leave an example out."
        )
    if not values.any():
        raise ValueError(f"{where} is all 0: no example would count. Give at least one example a weight > 0.")
