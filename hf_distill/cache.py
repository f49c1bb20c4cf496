"""Teacher-logit cache: run the teacher once, store its logits as a memory-mapped column of the dataset.

A cache is a folder holding the logits as an Arrow dataset plus `hf_distill_cache.json`, the record of what
produced them (teacher config and weights digest, tokenizer digest, max length, dtype, the dataset's fingerprint).
The folder name depends on the dataset and the column only, so a cache built by another teacher or tokenizer is
found and refused with a message that says what differs, rather than silently used or silently rebuilt.

Builds are atomic: the logits are written to a temporary folder that is renamed into place once complete. A file
lock beside the cache serialises check -> build -> load across processes (two runs on one dataset: one teacher
pass, the other waits and reuses it) and lets each build remove the temporary folders of killed ones.
"""

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
from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets.config import HF_DATASETS_CACHE
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .teacher import check_teacher_logits_finite

METADATA_FILE = "hf_distill_cache.json"
# Part of every cache's path: a new format (or digest definition) never reads, nor refuses, an older cache.
CACHE_FORMAT_VERSION = 2
MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
_TORCH_DTYPES = {"float16": np.float16, "float32": np.float32}


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


def _input_lengths(dataset: Dataset) -> np.ndarray:
    """Number of tokens of every example, `(num_examples,)`, read from Arrow without decoding rows."""
    column = dataset.with_format("arrow")["input_ids"]
    if isinstance(column, pa.Table):
        column = column.column(0)
    return pc.list_value_length(column).to_numpy(zero_copy_only=False)


def _cache_record(teacher: PreTrainedModel, dataset: Dataset, tokenizer, dtype: str, max_length: int) -> dict:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher_name_or_path": teacher.config._name_or_path,
        "teacher_config_digest": _sha256([teacher.config.to_json_string(use_diff=False).encode()]),
        "teacher_weights_digest": weights_digest(teacher),
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "max_length": int(max_length),
        "dtype": dtype,
        "dataset_fingerprint": dataset._fingerprint,
        "num_examples": len(dataset),
        "num_labels": teacher.config.num_labels,
    }


def default_cache_path(dataset: Dataset, column: str, cache_dir: str | None = None) -> str:
    """Where the cache of `dataset` lives: beside its Arrow files when it has some, else under the datasets cache."""
    if cache_dir is None:
        if dataset.cache_files:
            cache_dir = os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), "hf_distill")
        else:
            cache_dir = os.path.join(HF_DATASETS_CACHE, "hf_distill")
    return os.path.join(cache_dir, f"{column}-{dataset._fingerprint}-v{CACHE_FORMAT_VERSION}")


def check_teacher_logits(logits_dataset: Dataset, column: str, num_labels: int) -> None:
    """Raise if the column `column` is not `(num_examples, num_labels)` of finite numbers."""
    # Slicing converts the whole column at once; indexing the column by name decodes it row by row (~100x slower).
    values = logits_dataset.select_columns([column]).with_format("numpy")[:][column]
    _check_logit_values(np.asarray(values), column, num_labels)


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


@torch.inference_mode()
def _run_teacher(teacher: PreTrainedModel, dataset: Dataset, batch_size: int, device, show_progress: bool) -> np.ndarray:
    """Teacher logits `(num_examples, num_labels)` in dataset order, from length-sorted batches."""
    lengths = _input_lengths(dataset)
    order = np.argsort(-lengths, kind="stable")
    input_columns = [name for name in MODEL_INPUT_COLUMNS if name in dataset.column_names]
    rows = dataset.select_columns(input_columns).with_format(None)
    pad_token_id = teacher.config.pad_token_id or 0
    logits = np.empty((len(dataset), teacher.config.num_labels), dtype=np.float32)
    was_training = teacher.training
    teacher.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="Caching teacher logits", disable=not show_progress):
        indices = order[start : start + batch_size]
        batch = rows[indices.tolist()]
        width = int(lengths[indices].max())
        inputs = {}
        for name in input_columns:
            pad_value = pad_token_id if name == "input_ids" else 0
            padded = torch.full((len(indices), width), pad_value, dtype=torch.long)
            for row, values in enumerate(batch[name]):
                padded[row, : len(values)] = torch.as_tensor(values)
            inputs[name] = padded.to(device)
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = (
                torch.arange(width)[None, :] < torch.as_tensor(lengths[indices])[:, None]
            ).long().to(device)
        logits[indices] = teacher(**inputs).logits.float().cpu().numpy()
    teacher.train(was_training)
    return logits


def _describe_differences(cached: dict, current: dict) -> str:
    lines = [
        f"  - {key}: cached {cached.get(key)!r}, now {current.get(key)!r}"
        for key in current
        if cached.get(key) != current[key]
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
    overwrite: bool = False,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> Dataset:
    """Return `dataset` with a column of the teacher's logits, computed once and reused on later calls.

    Args:
        teacher: a sequence-classification model whose `forward` returns `.logits` `(batch, num_labels)`.
        dataset: tokenized examples with `input_ids` (and optionally `attention_mask`, `token_type_ids`).
        tokenizer: the tokenizer that produced `input_ids`; recorded in the cache's fingerprint.
        column: name of the new column, `(num_labels,)` floats per example.
        cache_dir: folder holding the caches; default beside the dataset's Arrow files or in the datasets cache.
        dtype: storage dtype, `"float16"` or `"float32"`.
        batch_size: examples per teacher forward; batches are formed from length-sorted examples.
        overwrite: rebuild a cache that another teacher, tokenizer or dtype produced instead of refusing it.
        device: where the teacher runs; default the device of its parameters.
        show_progress: show a progress bar while the teacher runs (`DistillationTrainer` passes
            `not args.disable_tqdm`).

    Under several processes the main process builds the cache and the others wait and load it.
    """
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to compute teacher logits for.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"The dataset has no 'input_ids' column (columns: {dataset.column_names}); tokenize it before caching "
            "teacher logits."
        )
    if column in dataset.column_names:
        raise ValueError(f"The dataset already has a '{column}' column; remove it or choose another column name.")
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(_TORCH_DTYPES)}.")

    state = PartialState()
    if device is None:
        device = next(teacher.parameters()).device
    path = default_cache_path(dataset, column, cache_dir)
    record = _cache_record(teacher, dataset, tokenizer, dtype, _input_lengths(dataset).max())
    with state.main_process_first(), _exclusive_build(path):
        if os.path.exists(os.path.join(path, METADATA_FILE)):
            with open(os.path.join(path, METADATA_FILE)) as file:
                cached_record = json.load(file)
            if cached_record != record and not (overwrite and state.is_main_process):
                raise ValueError(
                    f"The teacher-logit cache at {path} was built from other inputs:\n"
                    f"{_describe_differences(cached_record, record)}\n"
                    "Delete that folder, or rebuild it with overwrite=True (--overwrite_teacher_cache)."
                )
            if cached_record != record:
                _build(teacher, dataset, record, path, column, dtype, batch_size, device, show_progress)
        elif state.is_main_process:
            _build(teacher, dataset, record, path, column, dtype, batch_size, device, show_progress)
        else:
            raise RuntimeError(
                f"Process {state.process_index} found no teacher-logit cache at {path} after the main process built "
                "its own: the processes see different datasets (fingerprints differ). Build the dataset identically "
                "on every process."
            )
        logits_dataset = load_from_disk(path)  # under the lock: no other process replaces the folder meanwhile
    check_teacher_logits(logits_dataset, column, teacher.config.num_labels)
    return concatenate_datasets([dataset, logits_dataset], axis=1)


def _build(teacher, dataset, record, path, column, dtype, batch_size, device, show_progress) -> None:
    teacher_logits = _run_teacher(teacher, dataset, batch_size, device, show_progress)
    check_teacher_logits_finite(teacher_logits, teacher)  # an overflow in the teacher, not in the storage dtype
    logits = teacher_logits.astype(_TORCH_DTYPES[dtype])
    _check_logit_values(logits, column, teacher.config.num_labels)
    flat = pa.array(logits.reshape(-1))
    logits_dataset = Dataset(pa.table({column: pa.FixedSizeListArray.from_arrays(flat, logits.shape[1])}))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp_path = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        logits_dataset.save_to_disk(tmp_path)
        with open(os.path.join(tmp_path, METADATA_FILE), "w") as file:
            json.dump(record, file, indent=2)
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
