"""Teacher cache: run the teacher once, store its outputs as memory-mapped columns of the dataset.

A cache is a folder holding the teacher's outputs as an Arrow file plus `hf_distill_cache.json`, the record of
what produced them (teacher config and weights digest, tokenizer digest, head, layout, k, temperature, max length,
dtype, the dataset's fingerprint). The folder name depends on the dataset, the column, the teacher's weights and the
build settings (`BUILD_SETTINGS`: dtype, k, temperature, bf16 autocast, sparse target): a retrained teacher, or a
build with other settings, gets a cache of its own beside the others, so switching a setting back finds its cache
again. A cache in that folder built from other inputs (another tokenizer or teacher config under the same weights) is
found and refused with a message that says what differs, rather than silently used or silently rebuilt.

Three layouts, chosen by the model's head (`hf_distill.heads`):
- `dense`: `(num_labels,)` logits per example (sequence and image classification), column `teacher_logits`;
- `per_token`: `(length, classes)` logits per example, flattened (token classification; QA start/end);
- `topk`: per token, the teacher's k most likely ids (int32), their log-probabilities at the cache temperature
  (float16) and the probability left outside them (float32): `teacher_topk_ids`, `teacher_topk_log_probs`,
  `teacher_topk_rest`, each flattened per example. ~6k + 4 bytes a token instead of 4·vocab.

Builds stream: the dataset is read in shards of `SHARD_EXAMPLES` consecutive examples; within a shard the
examples are length-sorted and batched, and the shard's outputs are written to a shard file before the next shard
starts, so memory holds one shard, never `(examples, length, vocab)`. Under `accelerate launch` every process runs
the teacher on its share of the shards, and a rerun after a kill reuses the complete ones (`hf_distill.cache_shards`).
The main process then merges the shards into the cache's Arrow file. Builds are atomic: the file is written to a
temporary folder that is renamed into place once complete. A file lock beside the cache, held by the main process,
serialises check -> build -> load across runs (two runs on one dataset: one teacher pass, the other waits and
reuses it) and lets each build remove the temporary folders of killed ones.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import PartialState
from datasets import Dataset, Features, List, Sequence, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter
from datasets.config import HF_DATASETS_CACHE
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .arguments import DEFAULT_TOP_K
from .cache_shards import (
    broadcast,
    gather,
    missing_shards,
    num_shards,
    read_shard,
    remove_shards,
    run_together,
    shard_file,
    shard_rows,
    write_shard,
)
from .heads import DENSE, PER_TOKEN, TOPK, DistillationHead, head_for
from .losses import SPARSE_TARGETS
from .losses import sparse_target as make_sparse_target
from .teacher import check_teacher_logits_finite
from .validation import flat_column

METADATA_FILE = "hf_distill_cache.json"
DATA_FILE = "teacher_outputs.arrow"
# Part of every cache's path: a new format (or digest definition) never reads, nor refuses, an older cache.
CACHE_FORMAT_VERSION = 3
# Record entries that a build chooses (rather than its inputs): part of the folder name.
BUILD_SETTINGS = ("dtype", "top_k", "temperature", "teacher_autocast", "sparse_target", "seed")
SHARD_EXAMPLES = 2048
# Top-k layouts: float32 logits of one teacher forward are tokens x vocabulary (a batch of 256 sequences of 256
# tokens over a 49,152 vocabulary is 12.9 GB), and _encode adds copies of that size. Without a token budget from the
# caller, one forward holds at most this many bytes of logits.
TOPK_LOGITS_BYTES_PER_FORWARD = 256 * 2**20
# A teacher batch closes before its padding exceeds this fraction of its real tokens: the teacher's cost grows with
# padded tokens, and CPU throughput per token is flat from ~128 tokens a forward (benchmarks/README.md).
MAX_PADDING_FRACTION = 0.05
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}
# Padding of model inputs in a teacher batch; other columns pad with 0.
_PAD_VALUES = {"labels": -100}


def _sha256(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes and bytes of every tensor in `model.state_dict()`."""

    def chunks():
        for name, tensor in model.state_dict().items():
            yield f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode()
            yield tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    return _sha256(chunks())


def tokenizer_digest(tokenizer) -> str | None:
    """SHA-256 of the tokenizer's full serialisation (fast tokenizers) or of its vocabulary."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Each call sets these (tokenizer(..., truncation=True)): they are not part of what the tokenizer is.
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return _sha256([type(tokenizer).__name__.encode(), text.encode()])


def teacher_columns(layout: str, column: str = "teacher_logits") -> dict[str, str]:
    """Dataset column of each stored field: `{"logits": column}`, or the three top-k columns."""
    if layout == TOPK:
        prefix = column.removesuffix("_logits")
        return {"ids": f"{prefix}_topk_ids", "log_probs": f"{prefix}_topk_log_probs", "rest": f"{prefix}_topk_rest"}
    return {"logits": column}


def _lengths(dataset: Dataset, column: str | None) -> np.ndarray | None:
    """Number of entries of `column` in every example, `(num_examples,)`, read from Arrow without decoding rows."""
    if column is None or column not in dataset.column_names:
        return None
    values = dataset.with_format("arrow")[column]
    if isinstance(values, pa.Table):
        values = values.column(0)
    return pc.list_value_length(values).to_numpy(zero_copy_only=False)


def _cache_record(teacher, teacher_digest, dataset, tokenizer, dtype, head, top_k, temperature, num_classes) -> dict:
    lengths = _lengths(dataset, head.length_column)
    record = {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher_name_or_path": getattr(teacher.config, "_name_or_path", None),
        "teacher_config_digest": _sha256([teacher.config.to_json_string(use_diff=False).encode()]),
        "teacher_weights_digest": teacher_digest,
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "head": head.cache_name or head.name,
        "layout": head.cache_layout,
        "max_length": None if lengths is None else int(lengths.max()),
        "dtype": dtype,
        "dataset_fingerprint": dataset._fingerprint,
        "num_examples": len(dataset),
        "num_classes": num_classes,
    }
    if head.cache_layout == TOPK:
        record.update(top_k=top_k, temperature=temperature)
    return record


def default_cache_path(dataset: Dataset, column: str, teacher_digest: str, record: dict,
                       cache_dir: str | None = None) -> str:
    """Where the cache of the teacher with `weights_digest` `teacher_digest` on `dataset`, built with the
    `BUILD_SETTINGS` of `record` (its `hf_distill_cache.json`), lives: beside the dataset's Arrow files when it has
    some, else under the datasets cache."""
    settings = {key: record[key] for key in BUILD_SETTINGS if key in record}
    settings_digest = _sha256([json.dumps(settings, sort_keys=True).encode()])[:8]
    if cache_dir is None:
        if dataset.cache_files:
            cache_dir = os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), "hf_distill")
        else:
            cache_dir = os.path.join(HF_DATASETS_CACHE, "hf_distill")
    return os.path.join(
        cache_dir, f"{column}-{dataset._fingerprint}-{teacher_digest[:16]}-{settings_digest}-v{CACHE_FORMAT_VERSION}"
    )


def cache_folder(cached: Dataset) -> str:
    """The cache folder whose teacher outputs `cached` (a result of `cache_teacher_logits`) reads."""
    return next(os.path.dirname(file["filename"]) for file in cached.cache_files
                if os.path.basename(file["filename"]) == DATA_FILE)


def check_teacher_logits(logits_dataset: Dataset, column: str, num_labels: int) -> None:
    """Raise if the dense column `column` is not `(num_examples, num_labels)` of finite numbers."""
    # Slicing converts the whole column at once; indexing the column by name decodes it row by row (~100x slower).
    values = logits_dataset.select_columns([column]).with_format("numpy")[:][column]
    _check_logit_values(np.asarray(values), column, num_labels)


def check_teacher_columns(dataset: Dataset, head: DistillationHead, column: str, num_classes: int,
                          top_k: int | None = None) -> None:
    """Raise if the teacher columns of `dataset` do not fit `head` and `num_classes` (shapes, finiteness, ids)."""
    names = teacher_columns(head.cache_layout, column)
    missing = [name for name in names.values() if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset lacks the teacher column(s) {missing} that a {head.name} head reads (layout "
            f"'{head.cache_layout}'). Build them with hf_distill.cache_teacher_logits(teacher, dataset)."
        )
    if head.cache_layout == DENSE:
        check_teacher_logits(dataset, names["logits"], num_classes)
        return
    lengths = _lengths(dataset, head.length_column)
    if lengths is None:
        raise ValueError(f"The dataset has no '{head.length_column}' column: a per-token teacher cache needs it.")
    if head.cache_layout == PER_TOKEN:
        widths = {"logits": num_classes}
    else:
        stored = _lengths(dataset, names["rest"])
        if not np.array_equal(stored, lengths):
            raise ValueError(
                f"Column '{names['rest']}' holds a different number of positions than '{head.length_column}' in "
                f"{int((stored != lengths).sum())} rows: the cache was built for other inputs. Rebuild it."
            )
        width = int(_lengths(dataset, names["ids"])[0] // max(int(lengths[0]), 1)) if top_k is None else top_k
        widths = {"ids": width, "log_probs": width}
    for key, width in widths.items():
        stored = _lengths(dataset, names[key])
        bad = np.flatnonzero(stored != lengths * width)
        if bad.size:
            raise ValueError(
                f"Column '{names[key]}' holds {stored[bad[0]]} values in row {bad[0]} where {lengths[bad[0]]} "
                f"positions x {width} were expected ({bad.size} rows differ): it was built by a teacher with another "
                f"output width or for other inputs. Rebuild it (hf_distill.cache_teacher_logits)."
            )
    flat = {key: flat_column(dataset, names[key]).to_numpy(zero_copy_only=False) for key in names}
    if "ids" in flat and flat["ids"].size and int(flat["ids"].max()) >= num_classes:
        raise ValueError(
            f"Column '{names['ids']}' holds token id {int(flat['ids'].max())} but the models compare "
            f"{num_classes} classes: the cache comes from a teacher with a larger vocabulary. Rebuild it."
        )
    for key in ("logits", "log_probs", "rest"):
        if key in flat and not np.isfinite(flat[key][flat[key] > -np.inf] if key == "log_probs" else flat[key]).all():
            raise ValueError(
                f"Column '{names[key]}' holds NaN or infinite teacher values. Rebuild the cache, in float32 if the "
                "teacher's logits overflow float16 (teacher_cache_dtype='float32')."
            )


def _check_logit_values(values: np.ndarray, column: str, num_labels: int) -> None:
    if values.ndim != 2 or values.shape[1] != num_labels:
        raise ValueError(
            f"Column '{column}' holds teacher logits of shape {values.shape[1:]} per example, but the student has "
            f"num_labels={num_labels}. The logits come from a teacher with another label space: rebuild them with "
            "the right teacher (hf_distill.cache_teacher_logits)."
        )
    bad_rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad_rows.size:
        raise ValueError(
            f"Column '{column}' holds NaN or infinite teacher logits in {bad_rows.size} rows (first: row "
            f"{bad_rows[0]}). Rebuild the cache, in float32 if the teacher's logits overflow float16 "
            "(teacher_cache_dtype='float32')."
        )


def _collate(values: list, pad_value: int) -> torch.Tensor:
    """Stack equal-shaped values; right-pad 1-D sequences of different lengths with `pad_value`."""
    arrays = [np.asarray(value) for value in values]
    if all(array.shape == arrays[0].shape for array in arrays):
        return torch.as_tensor(np.stack(arrays))
    width = max(len(array) for array in arrays)
    padded = np.full((len(arrays), width), pad_value, dtype=arrays[0].dtype)
    for row, array in enumerate(arrays):
        padded[row, : len(array)] = array
    return torch.as_tensor(padded)


def length_grouped_batches(
    order: np.ndarray, lengths: np.ndarray | None, batch_size: int, max_batch_tokens: int | None
):
    """Consecutive slices of `order` (sorted by decreasing length): at most `batch_size` examples, at most
    `max_batch_tokens` padded tokens (examples x longest length), and padding at most `MAX_PADDING_FRACTION` of the
    real tokens. Without lengths (fixed-size inputs), slices of `batch_size`."""
    start = 0
    while start < len(order):
        stop = min(start + batch_size, len(order))
        if lengths is not None:
            width = max(int(lengths[order[start]]), 1)
            budget = stop if max_batch_tokens is None else min(stop, start + max(1, max_batch_tokens // width))
            real_tokens, stop = width, start + 1
            while stop < budget and (stop + 1 - start) * width <= (1 + MAX_PADDING_FRACTION) * (
                real_tokens + int(lengths[order[stop]])
            ):
                real_tokens += int(lengths[order[stop]])
                stop += 1
        yield order[start:stop]
        start = stop


def _encode(head, values: dict[str, torch.Tensor], top_k: int, temperature: float, sparse_target: str,
            generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The stored fields of one batch: the head's logits, or their sparse target's log-probabilities and rest."""
    if head.cache_layout != TOPK:
        return values
    ids, log_probs, rest = make_sparse_target(values["logits"], sparse_target, top_k, temperature, generator)
    return {"ids": ids.int(), "log_probs": log_probs, "rest": rest}


def _shard_seed(seed: int, shard_index: int) -> int:
    """The seed of a shard's sampled draws: each shard draws on its own, so a shard's values do not depend on which
    process builds it or on the shards before it; shard 0 keeps `seed`."""
    return seed + shard_index * 2**32


@torch.inference_mode()
def _run_teacher(teacher, dataset, head, shards, batch_size, max_batch_tokens, device, show_progress, description,
                 top_k, temperature, pad_token_id, bf16, sparse_target, seed):
    """Yield `{field: [per-example arrays]}` for each shard of `shards` (indices), in that order; with `bf16`, the
    teacher runs under bfloat16 autocast. Sampled targets draw from a generator seeded per shard from `seed`."""
    lengths = _lengths(dataset, head.length_column)
    input_columns = [name for name in (*head.input_names, head.length_column) if name in dataset.column_names]
    rows = dataset.select_columns(list(dict.fromkeys(input_columns))).with_format(None)
    was_training = teacher.training
    teacher.eval()
    ranges = [shard_rows(index, len(dataset), SHARD_EXAMPLES) for index in shards]
    progress = tqdm(total=sum(map(len, ranges)), desc=description, disable=not show_progress)
    try:
        for index, rows_of_shard in zip(shards, ranges):
            generator = None
            if sparse_target != "top_k":
                generator = torch.Generator(device=device).manual_seed(_shard_seed(seed, index))
            shard = np.arange(rows_of_shard.start, rows_of_shard.stop)
            if lengths is not None:
                shard = shard[np.argsort(-lengths[shard], kind="stable")]
            outputs = {}
            for indices in length_grouped_batches(shard, lengths, batch_size, max_batch_tokens):
                batch = rows[indices.tolist()]
                tensors = {
                    name: _collate(batch[name], pad_token_id if "input_ids" in name else _PAD_VALUES.get(name, 0))
                    for name in batch
                }
                labels = {"labels": tensors.pop("labels")} if "labels" in tensors else {}
                if "input_ids" in tensors and "attention_mask" not in tensors:
                    batch_lengths = torch.as_tensor([len(values) for values in batch["input_ids"]])
                    tensors["attention_mask"] = (
                        torch.arange(tensors["input_ids"].shape[1])[None, :] < batch_lengths[:, None]
                    ).long()
                tensors = {name: value.to(device) for name, value in tensors.items()}
                labels = {name: value.to(device) for name, value in labels.items()}
                inputs = head.teacher_inputs(head.prepare_inputs(tensors, labels, teacher))
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    values = head.cache_values(teacher(**inputs), inputs)
                # An overflow in the teacher itself, before any storage cast.
                check_teacher_logits_finite(values["logits"], teacher)
                values = _encode(head, values, top_k, temperature, sparse_target, generator)
                for key, value in values.items():
                    value = value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                    for row, index in enumerate(indices):
                        example = value[row] if lengths is None or head.cache_layout == DENSE else (
                            value[row, : lengths[index]]
                        )
                        outputs.setdefault(key, {})[int(index)] = example
                progress.update(len(indices))
            yield {key: [by_index[i] for i in sorted(by_index)] for key, by_index in outputs.items()}
    finally:
        progress.close()
        teacher.train(was_training)


def _features(layout: str, names: dict[str, str], dtype: str, num_classes: int) -> Features:
    if layout == DENSE:
        return Features({names["logits"]: Sequence(Value(dtype), length=num_classes)})
    if layout == PER_TOKEN:
        return Features({names["logits"]: List(Value(dtype))})
    return Features({names["ids"]: List(Value("int32")), names["log_probs"]: List(Value(dtype)),
                     names["rest"]: List(Value("float32"))})


def _arrow_column(examples: list[np.ndarray], layout: str, key: str, numpy_dtype) -> pa.Array:
    """Per-example arrays as one Arrow column: fixed-size lists (dense) or flattened variable-size lists."""
    dtype = np.int32 if key == "ids" else (np.float32 if key == "rest" else numpy_dtype)
    if layout == DENSE:
        stacked = np.stack(examples).astype(dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1)), stacked.shape[1])
    flat = [example.astype(dtype).reshape(-1) for example in examples]
    offsets = np.concatenate([[0], np.cumsum([len(values) for values in flat])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat)))


def _check_storage_range(examples: list[np.ndarray], column: str, stored_dtype: str) -> None:
    if column.endswith("_ids"):  # token ids are stored as int32 whatever the dtype: 151,936 > float16's 65,504
        return
    for row, values in enumerate(examples):
        finite = values[np.isfinite(values)]
        if stored_dtype == "float16" and "rest" not in column and (np.abs(finite) > np.finfo(np.float16).max).any():
            raise ValueError(
                f"Teacher values of example {row} exceed float16's range ('{column}'): store them as float32 "
                "(teacher_cache_dtype='float32')."
            )


def _describe_differences(cached: dict, current: dict) -> str:
    lines = [
        f"  - {key}: cached {cached.get(key)!r}, now {current.get(key)!r}"
        for key in dict.fromkeys([*current, *cached])
        if cached.get(key) != current.get(key)
    ]
    return "\n".join(lines)


def cache_teacher_logits(
    teacher: PreTrainedModel,
    dataset: Dataset,
    *,
    tokenizer=None,
    column: str = "teacher_logits",
    cache_dir: str | None = None,
    dtype: str = "float16",
    batch_size: int = 256,
    max_batch_tokens: int | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    head: DistillationHead | None = None,
    top_k: int = DEFAULT_TOP_K,
    temperature: float = 1.0,
    bf16: bool = False,
    sparse_target: str = "top_k",
    seed: int = 0,
) -> Dataset:
    """Return `dataset` with the teacher's outputs as columns, computed once and reused on later calls.

    Args:
        teacher: a transformers model; `head` (default: chosen from the teacher's class) says which outputs count.
        dataset: tokenized (or processed) examples with the inputs the head feeds the teacher.
        tokenizer: the tokenizer that produced `input_ids`; recorded in the cache's fingerprint.
        column: name of the logits column (`(num_labels,)` dense or `(length * classes,)` per token); top-k
            caches name theirs `<prefix>_topk_ids/_log_probs/_rest` from it (`teacher_columns`).
        cache_dir: folder holding the caches; default beside the dataset's Arrow files or in the datasets cache.
        dtype: storage dtype of logits and log-probabilities, `"float16"` or `"float32"`.
        batch_size: most examples per teacher forward; batches are formed from length-sorted examples, each
            padded by at most `MAX_PADDING_FRACTION` of its real tokens.
        max_batch_tokens: optional budget of padded tokens per forward (examples x longest length); top-k
            layouts default to the tokens whose float32 logits fit `TOPK_LOGITS_BYTES_PER_FORWARD`.
        overwrite: rebuild a cache that other inputs produced instead of refusing it.
        device: where the teacher runs; default the device of its parameters.
        show_progress: show a progress bar while the teacher runs.
        head: the [`~hf_distill.heads.DistillationHead`]; its `num_classes` limits vocabulary-sized outputs.
        top_k: classes kept per token by top-k layouts (with `sparse_target="sampled"`, the draws per token).
        temperature: temperature of the stored top-k log-probabilities (the distillation temperature).
        bf16: run the teacher under bfloat16 autocast: about 2x faster on CPUs with AVX512-BF16 or AMX, at logits
            further from float32 than float16 storage (benchmarks/README.md); part of the fingerprint.
        sparse_target: top-k layouts keep the `"top_k"` most likely classes, or the classes of `top_k` `"sampled"`
            draws, or the `top_k // 2` most likely and as many draws from the rest (`"top_k_and_sampled"`):
            `hf_distill.losses.sparse_target`.
        seed: the seed of those draws; part of the fingerprint.

    Under several processes (`accelerate launch`) each one runs the teacher, on its own device, over its share of
    the shards; the main process merges them, and every process reads the merged cache, bit-identical to a
    1-process build. A build interrupted by a kill keeps its complete shards: a rerun with the same inputs runs the
    teacher on the others only.
    """
    head = head_for(teacher) if head is None else head
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to compute teacher outputs for.")
    missing = [name for name in head.input_names[:1] if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset has no '{missing[0]}' column (columns: {dataset.column_names}); "
            f"{'tokenize' if missing[0] == 'input_ids' else 'process'} it before caching teacher outputs."
        )
    if head.length_column is not None and head.length_column not in dataset.column_names:
        # Checked before the teacher runs: a seq2seq teacher without labels would decode from its own inputs.
        raise ValueError(
            f"The dataset has no '{head.length_column}' column (columns: {dataset.column_names}): a {head.name} "
            f"cache holds the teacher's outputs at every '{head.length_column}' position. Give every example its "
            f"'{head.length_column}' (for unlabelled text, the teacher's own generations) before caching."
        )
    if dataset.format["type"] == "custom":
        raise ValueError(
            "The dataset transforms its rows on access (set_transform / with_transform): a cached teacher output "
            "belongs to one view of an example, and a random augmentation gives another view every epoch. Store "
            "the processed inputs with dataset.map(...) to cache them, or set use_teacher_cache=False to run the "
            "teacher online on every batch."
        )
    names = teacher_columns(head.cache_layout, column)
    present = [name for name in names.values() if name in dataset.column_names]
    if present:
        raise ValueError(
            f"The dataset already has the column(s) {present}; remove them or choose another column name."
        )
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(_NUMPY_DTYPES)}.")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: keep at least 1 class per token.")
    if sparse_target not in SPARSE_TARGETS:
        raise ValueError(f"sparse_target={sparse_target!r} is not supported: use one of {SPARSE_TARGETS}.")

    state = PartialState()
    if device is None:
        device = next(teacher.parameters()).device
    num_classes = distribution_width(teacher.config, head)
    top_k = min(top_k, num_classes)
    if head.cache_layout == TOPK and max_batch_tokens is None:
        max_batch_tokens = max(1, TOPK_LOGITS_BYTES_PER_FORWARD // (4 * num_classes))
    teacher_digest = weights_digest(teacher)
    record = _cache_record(teacher, teacher_digest, dataset, tokenizer, dtype, head, top_k, temperature, num_classes)
    if bf16:  # absent otherwise: caches built before the option keep their record
        record["teacher_autocast"] = "bfloat16"
    if head.cache_layout == TOPK and sparse_target != "top_k":  # likewise
        record.update(sparse_target=sparse_target, seed=seed)
    path = default_cache_path(dataset, column, teacher_digest, record, cache_dir)
    if any(other != (path, record) for other in gather((path, record), state)):
        raise RuntimeError(
            "The processes would cache different teacher outputs (their datasets' fingerprints, teachers or settings "
            "differ). Build the dataset identically on every process, and give each the same teacher."
        )
    features = _features(head.cache_layout, names, dtype, num_classes)
    files = [shard_file(path, record, shard_rows(index, len(dataset), SHARD_EXAMPLES))
             for index in range(num_shards(len(dataset), SHARD_EXAMPLES))]
    # The main process holds the lock from its check to the merge: another run on this cache waits for the result.
    with _exclusive_build(path) if state.is_main_process else contextlib.nullcontext():
        refusal, missing = broadcast(_plan(path, record, overwrite, files) if state.is_main_process else None, state)
        if refusal:
            raise ValueError(refusal)
        if missing is not None:
            # Round-robin over the missing shards: a resumed build is shared as evenly as a fresh one.
            mine = missing[state.process_index :: state.num_processes]
            shares = [f"{len(mine)} of {len(files)} shards in this process"] if state.num_processes > 1 else []
            if len(missing) < len(files):
                shares.append(f"{len(files) - len(missing)} of {len(files)} complete before")
            description = "Caching teacher outputs" + (f" ({', '.join(shares)})" if shares else "")
            try:
                run_together(lambda: _build_shards(
                    teacher, dataset, head, names, dtype, batch_size, max_batch_tokens, device,
                    show_progress and state.is_main_process, top_k, temperature, bf16, sparse_target, seed, features,
                    {index: files[index] for index in mine}, description,
                ), state)
            finally:
                if state.is_main_process:  # every process is done writing shards here
                    remove_shards(path, empty_only=True)

            def merge():
                if state.is_main_process:
                    _build(path=path, record=record, features=features, files=files, num_examples=len(dataset))

            run_together(merge, state)
        if state.is_main_process:
            # Opened under the lock: no other process replaces the folder meanwhile.
            outputs = _open_cache(path, record)
    if not state.is_main_process:
        with _exclusive_build(path):
            outputs = _open_cache(path, record)
    if len(outputs) != len(dataset):
        raise ValueError(
            f"The teacher cache at {path} holds {len(outputs)} rows for {len(dataset)} examples: delete that folder."
        )
    combined = concatenate_datasets([dataset, outputs], axis=1)
    check_teacher_columns(combined, head, column, num_classes, top_k if head.cache_layout == TOPK else None)
    return combined


def _plan(path: str, record: dict, overwrite: bool, files: list[str]) -> tuple[str | None, list[int] | None]:
    """`(refusal, missing)`: why the cache at `path` cannot serve `record`, or None; the shards (indices into
    `files`) a build must run the teacher on, or None when the cache there serves `record`."""
    if os.path.exists(os.path.join(path, METADATA_FILE)):
        with open(os.path.join(path, METADATA_FILE)) as file:
            cached_record = json.load(file)
        if cached_record == record:
            remove_shards(path)  # left by a build killed between its merge and their removal
            return None, None
        if not overwrite:
            return (
                f"The teacher cache at {path} was built from other inputs:\n"
                f"{_describe_differences(cached_record, record)}\n"
                "Delete that folder, or rebuild it with overwrite=True (--overwrite_teacher_cache)."
            ), None
    return None, missing_shards(files)


def _open_cache(path: str, record: dict) -> Dataset:
    """The teacher outputs of the cache at `path`, which must have been built for `record`."""
    if not os.path.exists(os.path.join(path, METADATA_FILE)):
        raise RuntimeError(
            f"No teacher cache at {path} after the main process built it: the processes see different folders. "
            "Give every process the same cache_dir, on a file system they share."
        )
    with open(os.path.join(path, METADATA_FILE)) as file:
        cached_record = json.load(file)
    if cached_record != record:
        raise ValueError(
            f"The teacher cache at {path} was replaced by another run's, built from other inputs:\n"
            f"{_describe_differences(cached_record, record)}\nRerun once that run has finished."
        )
    return Dataset.from_file(os.path.join(path, DATA_FILE))


def distribution_width(config, head: DistillationHead) -> int:
    """Classes of a model's distributions under `head`: its `num_classes` when set, `num_labels`, 2 for QA
    (start, end), or the vocabulary size."""
    if head.num_classes is not None:
        return head.num_classes
    if head.cache_layout == TOPK:
        return config.get_text_config().vocab_size
    if head.name == "question_answering":
        return 2
    return config.num_labels


def _build_shards(teacher, dataset, head, names, dtype, batch_size, max_batch_tokens, device, show_progress, top_k,
                  temperature, bf16, sparse_target, seed, features, files: dict[int, str], description) -> None:
    """Run the teacher over the shards `files` maps (index -> file) and write each one once complete."""
    if not files:
        return
    pad_token_id = getattr(teacher.config, "pad_token_id", None) or 0
    shards = _run_teacher(teacher, dataset, head, list(files), batch_size, max_batch_tokens, device, show_progress,
                          description, top_k, temperature, pad_token_id, bf16, sparse_target, seed)
    for shard, file in zip(shards, files.values()):
        columns = {}
        for key, examples in shard.items():
            _check_storage_range(examples, names[key], dtype)
            columns[names[key]] = _arrow_column(examples, head.cache_layout, key, _NUMPY_DTYPES[dtype])
        write_shard(file, pa.table(columns).cast(features.arrow_schema), features)


def _build(path: str, record: dict, features: Features, files: list[str], num_examples: int) -> None:
    """Merge the complete shards `files` (every shard, in dataset order) into the cache folder at `path`, with its
    record; then remove them."""
    with write_folder_atomically(path) as tmp_path:
        with ArrowWriter(features=features, path=os.path.join(tmp_path, DATA_FILE)) as writer:
            for index, file in enumerate(files):
                writer.write_table(read_shard(file, shard_rows(index, num_examples, SHARD_EXAMPLES)))
            writer.finalize()
        with open(os.path.join(tmp_path, METADATA_FILE), "w") as file:
            json.dump(record, file, indent=2)
    remove_shards(path)


@contextmanager
def write_folder_atomically(path: str):
    """Yield a fresh folder beside `path` to write into: when the block ends it replaces `path` (and whatever was
    there), when it raises it is removed, so no reader ever sees a half-written `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp_path = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp_path
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


@contextmanager
def _exclusive_build(path: str):
    """Hold the cross-process lock of the cache at `path`; remove what killed builds of it left behind."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with FileLock(os.path.join(parent, f".{name}.lock")):
        # Only a holder of this lock writes these folders, so any found now belongs to a build that died.
        for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)
        yield
