"""Teacher-cache builds in shards: shared among the processes of a launch, kept across a kill, merged atomically.

A build covers the dataset in fixed shards of consecutive examples (`hf_distill.cache.SHARD_EXAMPLES`), whatever the
number of processes: a shard's teacher batches, hence its values, are the same under 1 or N processes, and the
merged cache is bit-identical. Each finished shard is an Arrow file in `.<cache name>.shards/` beside the cache,
named by its rows and a digest of the build's record and those rows. It is written under a temporary name and
renamed once complete, so a killed build leaves complete shards and temporary files only; the next build removes the
temporary files and the shards of other inputs, and runs the teacher on the missing shards alone.

Under `accelerate launch` the processes agree through a few messages on a gloo group of their own, whose timeout
(`WAIT_TIMEOUT`) outlasts a teacher pass: a process waits there while the main process waits for the cache's lock
or while the others finish their shards.
"""

import datetime
import hashlib
import json
import os
import shutil
import tempfile

import pyarrow as pa
import torch
from datasets import Features
from datasets.arrow_writer import ArrowWriter

# Longer than any wait of a build: for the lock (another run building the same cache), or for the slowest process.
WAIT_TIMEOUT = datetime.timedelta(days=1)
_TEMPORARY_PREFIX = ".tmp-"
_group = None


def shards_folder(path: str) -> str:
    """The folder of the shards of the cache at `path` (a hidden sibling; removed once the cache is merged)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.shards")


def num_shards(num_examples: int, shard_examples: int) -> int:
    """How many shards of `shard_examples` cover `num_examples` examples (the last one may hold fewer)."""
    return -(-num_examples // shard_examples)


def shard_rows(index: int, num_examples: int, shard_examples: int) -> range:
    """The dataset rows of shard `index`."""
    return range(index * shard_examples, min((index + 1) * shard_examples, num_examples))


def shard_file(path: str, record: dict, rows: range) -> str:
    """Where the shard of `rows` of the build with `record` (its `hf_distill_cache.json`) lives once complete."""
    digest = hashlib.sha256(json.dumps([record, rows.start, rows.stop], sort_keys=True).encode()).hexdigest()
    return os.path.join(shards_folder(path), f"{rows.start:010d}-{rows.stop:010d}-{digest[:16]}.arrow")


def missing_shards(files: list[str]) -> list[int]:
    """Indices of `files` (every shard of a build, in order) not complete on disk. Removes every other file of their
    folder: temporary files of killed builds, shards of other inputs or of other rows."""
    folder = os.path.dirname(files[0])
    if os.path.isdir(folder):
        expected = {os.path.basename(file) for file in files}
        for name in os.listdir(folder):
            if name not in expected:
                os.remove(os.path.join(folder, name))
    return [index for index, file in enumerate(files) if not os.path.exists(file)]


def write_shard(file: str, table: pa.Table, features: Features) -> None:
    """Write `table` to `file` through a temporary file, flushed to disk before the rename: `file` exists only
    complete."""
    folder = os.path.dirname(file)
    os.makedirs(folder, exist_ok=True)
    handle, tmp_file = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=folder)
    os.close(handle)
    try:
        with ArrowWriter(features=features, path=tmp_file) as writer:
            writer.write_table(table)
            writer.finalize()
        with open(tmp_file, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_file, file)
    finally:
        if os.path.exists(tmp_file):
            os.remove(tmp_file)


def read_shard(file: str, rows: range) -> pa.Table:
    """The table of a complete shard (memory-mapped), checked to hold `len(rows)` rows."""
    try:
        with pa.memory_map(file) as source:
            table = pa.ipc.open_stream(source).read_all()
    except FileNotFoundError as error:
        raise RuntimeError(
            f"The cache shard {file}, built by another process, is not on this machine's disk: give every process "
            "a cache_dir on a file system they share."
        ) from error
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"The cache shard {file} is unreadable ({error}): delete it and rerun.") from error
    if table.num_rows != len(rows):
        raise ValueError(
            f"The cache shard {file} holds {table.num_rows} rows for rows {rows.start}-{rows.stop - 1}: delete it and "
            "rerun to rebuild it."
        )
    return table


def remove_shards(path: str, empty_only: bool = False) -> None:
    """Remove the shard folder of the cache at `path` (with `empty_only`, only when no shard is in it)."""
    folder = shards_folder(path)
    if empty_only:
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _process_group():
    """The gloo group of the builds, one per default process group (a destroyed and re-created one gets its own)."""
    global _group
    world = torch.distributed.group.WORLD
    if _group is None or _group[0] is not world:
        _group = (world, torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    return _group[1]


def gather(value, state) -> list:
    """`value` of every process of `state` (an accelerate `PartialState`), in process order."""
    if state.num_processes == 1:
        return [value]
    values = [None] * state.num_processes
    torch.distributed.all_gather_object(values, value, group=_process_group())
    return values


def broadcast(value, state):
    """The main process's `value`, on every process."""
    if state.num_processes == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=_process_group())
    return box[0]


def run_together(function, state) -> None:
    """Run `function` on every process; if it raises on any, raise on all (the others would otherwise wait)."""
    try:
        function()
    except BaseException as error:
        gather(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__, state)
        raise
    failures = [(index, failure) for index, failure in enumerate(gather(None, state)) if failure]
    if failures:
        index, failure = failures[0]
        raise RuntimeError(
            f"Process {index} failed while caching teacher outputs ({failure}), so this one stops too. The shards "
            "finished so far are kept: once the cause is fixed, a rerun runs the teacher on the others only."
        )
