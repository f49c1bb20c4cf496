"""Teacher-cache builds shared by 2 CPU processes, for `test_cache_distributed.py`. Run as

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 cache_worker.py OUT_DIR SCENARIO ...

or imported, to run a scenario in one process (the reference). Shards hold `SHARD_EXAMPLES` = 8 examples here, so
the toy datasets span 5-6 shards and each process builds some. Each rank writes what it saw to
`OUT_DIR/<scenario>.rank<r>.pt`: the cache's values and file digest, the dataset rows of every teacher batch it ran,
and the shard files left by an interrupted build.
"""

import hashlib
import os
import sys
from unittest import mock

import torch

if __name__ == "__main__":
    from distributed_worker import announce_start

    announce_start(sys.argv[1])

from pathlib import Path

from conftest import make_args, tiny_bert, tiny_bert_token, tiny_llama, token_dataset, toy_dataset, toy_lm_dataset

import hf_distill.cache
import hf_distill.cache_shards
from hf_distill import DistillationTrainer, cache_teacher_logits
from hf_distill.cache import DATA_FILE, cache_folder, teacher_columns
from hf_distill.heads import head_for
from hf_distill.validation import flat_column

SHARD_EXAMPLES = 8
# The shard that process 0 is interrupted in (shards 0, 2, 4 are its share of 6): shards 0, 1, 3, 5 get finished.
INTERRUPTED_SHARD = 2


def teacher_and_dataset(kind: str):
    """`(teacher, dataset, build keyword arguments)` of a build: `dense`, `per_token`, `top_k` or `sampled` (the
    top-k head with sampled draws), or the dense teacher of another seed (`other_teacher`) or top-k with another k
    (`other_k`)."""
    if kind in ("dense", "other_teacher"):
        return tiny_bert(hidden_size=48, num_layers=4, seed=1 if kind == "dense" else 7), toy_dataset(44), {}
    if kind == "per_token":
        return tiny_bert_token(hidden_size=48, num_layers=2, seed=1), token_dataset(36), {}
    top_k = {"top_k": 4, "sampled": 4, "other_k": 2}[kind]
    options = {"top_k": top_k, "temperature": 2.0}
    if kind == "sampled":
        options.update(sparse_target="top_k_and_sampled", seed=3)
    return tiny_llama(seed=2, logit_scale=10.0), toy_lm_dataset(40, max_length=16), options


class BatchRecorder:
    """Forward pre-hook on the teacher: the dataset rows of each batch it runs, in order; with `interrupt_at`,
    raises KeyboardInterrupt (a kill) on the first batch holding a row of that range."""

    def __init__(self, teacher, dataset, interrupt_at: range | None = None):
        self.index_of = {tuple(ids): index for index, ids in enumerate(dataset["input_ids"])}
        if len(self.index_of) != len(dataset):
            raise ValueError("The toy dataset has duplicate rows: teacher batches could not be told apart.")
        self.batches, self.interrupt_at = [], interrupt_at
        self.handle = teacher.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        rows = [self.index_of[tuple(ids[: int(length)])]
                for ids, length in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].sum(1).tolist())]
        if self.interrupt_at is not None and any(row in self.interrupt_at for row in rows):
            raise KeyboardInterrupt
        self.batches.append(rows)


def build(kind: str, cache_dir: str, interrupt: bool = False) -> dict:
    """Cache `kind`'s teacher outputs; process 0 stops at `INTERRUPTED_SHARD` if `interrupt`. Returns the rows of
    each teacher batch this process ran, how the build ended, and the cache's values when it was built."""
    teacher, dataset, options = teacher_and_dataset(kind)
    head = head_for(teacher)
    stop = interrupt and int(os.environ.get("RANK", "0")) == 0
    shard = range(INTERRUPTED_SHARD * SHARD_EXAMPLES, (INTERRUPTED_SHARD + 1) * SHARD_EXAMPLES)
    recorder = BatchRecorder(teacher, dataset, shard if stop else None)
    result = {"batches": recorder.batches, "error": None}
    try:
        cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, head=head, show_progress=False,
                                      batch_size=3, **options)
    except (KeyboardInterrupt, Exception) as error:  # recorded for the test to report
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    with open(os.path.join(cache_folder(cached), DATA_FILE), "rb") as file:
        result["file_sha256"] = hashlib.sha256(file.read()).hexdigest()
    result["values"] = {
        name: torch.from_numpy(flat_column(cached, name).to_numpy(zero_copy_only=False).copy())
        for name in teacher_columns(head.cache_layout).values()
    }
    return result


def trainer_cache(workdir: str) -> dict:
    """The cache `DistillationTrainer` builds itself for the dense teacher and dataset (same batch size)."""
    teacher, dataset, _ = teacher_and_dataset("dense")
    recorder = BatchRecorder(teacher, dataset)
    trainer = DistillationTrainer(model=tiny_bert(seed=2), args=make_args(Path(workdir), teacher_cache_batch_size=3),
                                  train_dataset=dataset, teacher_model=teacher)
    values = flat_column(trainer.train_dataset, "teacher_logits").to_numpy(zero_copy_only=False)
    return {"batches": recorder.batches, "values": {"teacher_logits": torch.from_numpy(values.copy())}}


def listing(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def build_after_interruption(kind: str, interrupted_kind: str, cache_dir: str, shards_dir: str) -> dict:
    """Interrupt a build of `interrupted_kind`, leave a half-written shard as a kill would, then build `kind` in
    the same cache folder; every shard goes to `shards_dir`, whatever the cache it belongs to."""
    with mock.patch.object(hf_distill.cache_shards, "shards_folder", lambda path: shards_dir):
        interrupted = build(interrupted_kind, cache_dir, interrupt=True)
        left = listing(shards_dir)
        if int(os.environ.get("RANK", "0")) == 0:  # before the next build's first message: its plan sees it
            with open(os.path.join(shards_dir, ".tmp-killed"), "wb") as file:
                file.write(b"half a shard")
        resumed = build(kind, cache_dir)
    return {"interrupted": interrupted, "shards_left": left, "resumed": resumed,
            "shards_after": listing(shards_dir)}


def run_scenario(name: str, workdir: str) -> dict:
    """`dense`, `per_token`, `top_k`, `sampled`: one build. `trainer`: the dense one, by `DistillationTrainer`.
    `resume`: the dense build interrupted, then run again. `other_teacher` / `other_k`: the dense / top-k build after
    an interrupted one of another teacher / k. `different_datasets`: each process has a dataset of its own."""
    cache_dir = os.path.join(workdir, "cache")
    with mock.patch.object(hf_distill.cache, "SHARD_EXAMPLES", SHARD_EXAMPLES):
        if name in ("dense", "per_token", "top_k", "sampled"):
            return {"build": build(name, cache_dir), "cache_listing": listing(cache_dir)}
        if name == "trainer":
            return trainer_cache(workdir)
        if name == "different_datasets":
            teacher, _, _ = teacher_and_dataset("dense")
            try:
                cache_teacher_logits(teacher, toy_dataset(44, seed=int(os.environ.get("RANK", "0"))),
                                     cache_dir=cache_dir, show_progress=False)
            except RuntimeError as error:
                return {"error": str(error), "cache_listing": listing(cache_dir)}
            return {"error": None}
        shards_dir = os.path.join(workdir, "shards")
        if name == "resume":
            return build_after_interruption("dense", "dense", cache_dir, shards_dir)
        return build_after_interruption({"other_teacher": "dense", "other_k": "top_k"}[name], name, cache_dir,
                                        shards_dir)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    for scenario in sys.argv[2:]:
        results = run_scenario(scenario, os.path.join(out_dir, scenario))
        torch.save(results, os.path.join(out_dir, f"{scenario}.rank{os.environ.get('RANK', '0')}.pt"))
