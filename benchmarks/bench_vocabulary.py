"""Memory and time of a language-model distillation step at large vocabularies: fused against unfused, and against a
plain `transformers.Trainer` step.

Each variant runs in a fresh process (`--worker`): it builds random Llama-shaped models and a batch of random
tokens, notes its RSS once everything is loaded (the Trainer built, a cache built where the variant reads one),
resets the peak (`/proc/self/clear_refs`), trains `--steps` optimizer steps after one warm-up step, and reports the
peak RSS above that post-load RSS and the median step time. Variants:

- `plain`: `Trainer` on labels (the model's own cross-entropy, which holds the logits);
- `floor`: the same plus a no-grad teacher forward on every batch, as a tutorial online-KD loop would run it;
- `online` / `online_unfused`: `DistillationTrainer` with the teacher online (forward KL at T = 1, alpha 0.5), fused
  vocabulary loss on (the default) or off; `jsd` / `jsd_unfused`: the same with JSD(0.5);
- `cached` / `cached_unfused`: `DistillationTrainer` on a top-256 cache of the teacher.

Targets (issue 21): online peak / plain peak <= 1.0; online time / (plain + teacher forward, i.e. `floor`) <= 1.05;
cached time / plain <= 1.02.

    python benchmarks/bench_vocabulary.py --vocab 151936 --batch 2 --seq 512 --rounds 3
    python benchmarks/bench_vocabulary.py --vocab 49152 --batch 4 --seq 1024 --variants plain online online_unfused
    python benchmarks/bench_vocabulary.py --shape smollm2 --vocab 49152 --batch 4 --seq 256
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {  # (hidden, layers, heads, kv heads, intermediate) of student and teacher
    "small": {"student": (256, 2, 4, 2, 704), "teacher": (384, 4, 6, 2, 1024)},
    "smollm2": {"student": (576, 6, 9, 3, 1536), "teacher": (576, 30, 9, 3, 1536)},
}
VARIANTS = ("plain", "floor", "online", "online_unfused", "jsd", "jsd_unfused", "cached", "cached_unfused")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, interleaved")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def llama(vocab: int, dims: tuple, seed: int, max_positions: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, intermediate = dims
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=True,
                         max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def worker(args) -> dict:
    """One variant in this process: `{peak_above_load_mib, post_load_mib, step_seconds}`."""
    import datasets
    import numpy as np
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    variant, shape = args.worker, SHAPES[args.shape]
    student = llama(args.vocab, shape["student"], seed=1, max_positions=args.seq)
    teacher = None if variant == "plain" else llama(args.vocab, shape["teacher"], 0, args.seq).eval()
    rows = (args.steps + 1) * args.batch
    ids = np.random.default_rng(0).integers(3, args.vocab, size=(rows, args.seq)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * args.seq] * rows, "labels": ids})
    work_dir = tempfile.mkdtemp(prefix="bench_vocabulary_")
    common = dict(output_dir=work_dir, per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
                  learning_rate=1e-4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                  logging_steps=1000, dataloader_drop_last=True)
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *unused, **unused_kwargs):
            stamps.append(time.perf_counter())

    if variant in ("plain", "floor"):
        class TeacherForwardTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                with torch.no_grad():
                    teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        trainer_class = Trainer if variant == "plain" else TeacherForwardTrainer
        trainer = trainer_class(model=student, args=TrainingArguments(**common), train_dataset=data,
                                data_collator=default_data_collator)
    else:
        distillation = dict(temperature=1.0, alpha=0.5, fused_vocabulary_loss=not variant.endswith("_unfused"),
                            use_teacher_cache=variant.startswith("cached"), teacher_cache_dir=work_dir,
                            distillation_loss="jsd" if variant.startswith("jsd") else "kl")
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                      args=DistillationTrainingArguments(**common, **distillation),
                                      data_collator=default_data_collator)
    trainer.add_callback(Stamp())
    post_load = rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak (VmHWM) starts again from the current RSS
    start = time.perf_counter()
    trainer.train()
    gaps = np.diff([start, *stamps])[1:]  # the first step warms up (and checks the fused path)
    paths = getattr(trainer, "vocabulary_loss_paths", {})
    return {"post_load_mib": post_load, "peak_above_load_mib": rss_mib("VmHWM") - post_load,
            "step_seconds": float(np.median(gaps)), "paths": paths}


def run_variant(args, variant: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--vocab", str(args.vocab),
               "--batch", str(args.batch), "--seq", str(args.seq), "--shape", args.shape, "--steps", str(args.steps),
               "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    shape = SHAPES[args.shape]
    print(f"vocab {args.vocab}, {args.batch} x {args.seq} tokens, student {shape['student']}, teacher "
          f"{shape['teacher']} (hidden, layers, heads, kv heads, ffn), {args.threads} thread(s), {args.steps} timed "
          f"steps, {args.rounds} round(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {variant: [] for variant in args.variants}
    for round_index in range(args.rounds):
        order = args.variants[round_index % len(args.variants):] + args.variants[:round_index % len(args.variants)]
        for variant in order:
            result = run_variant(args, variant)
            results[variant].append(result)
            print(f"  round {round_index + 1} {variant}: {result}", flush=True)
    print("\nvariant: peak RSS above post-load (MiB), step time (s): median [min-max] over rounds")
    summary = {}
    for variant, runs in results.items():
        errors = [run["error"] for run in runs if "error" in run]
        if errors:
            print(f"  {variant}: failed: {errors[0]}")
            continue
        peaks, times = [run["peak_above_load_mib"] for run in runs], [run["step_seconds"] for run in runs]
        summary[variant] = (statistics.median(peaks), statistics.median(times))
        print(f"  {variant}: {spread(peaks)} MiB, {spread(times)} s")
    print("\nratios (medians):")
    for numerator, denominator, target in [
        ("online", "plain", "peak <= 1.0"), ("online", "floor", "time <= 1.05"), ("jsd", "floor", "time"),
        ("jsd", "plain", "peak"), ("cached", "plain", "time <= 1.02"), ("online_unfused", "plain", "peak"),
        ("online_unfused", "floor", "time"), ("jsd_unfused", "floor", "time"), ("cached_unfused", "plain", "time"),
    ]:
        if numerator in summary and denominator in summary:
            (peak, seconds), (base_peak, base_seconds) = summary[numerator], summary[denominator]
            print(f"  {numerator} / {denominator}: peak {peak / base_peak:.2f}, time {seconds / base_seconds:.2f} "
                  f"(target: {target})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
