"""The token-classification, question-answering and image-classification recipes' targets, measured: run a shipped
config over seeds and print the figures from each run's results.json (validation and test metric, retention, CPU
speed-up) and their means.

    nice python benchmarks/bench_tasks.py recipes/configs/conll2003_minilm.yaml --seeds 42
    nice python benchmarks/bench_tasks.py recipes/configs/squad_minilm.yaml --seeds 42 43 44
    nice python benchmarks/bench_tasks.py recipes/configs/digits_vit.yaml --seeds 42 43 44
    nice python benchmarks/bench_tasks.py recipes/configs/digits_vit.yaml --seeds 42 43 44 --set augment=true
    nice python benchmarks/bench_tasks.py recipes/configs/digits_vit.yaml --seeds 42 --set "teacher_seeds=[1, 2]"

Each seed runs the recipe in a subprocess (`--seed`, `--output_dir <config's>_seed<seed>`); `--summarise` only
reads finished runs.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"conll2003": "token_classification.py", "digits": "image_classification.py",
           "squad": "question_answering.py"}


def recipe_for(config_path: str) -> str:
    name = next(script for key, script in RECIPES.items() if key in os.path.basename(config_path))
    return os.path.join(REPO, "recipes", name)


def run(config_path: str, seed: int, output_dir: str, overrides: dict) -> None:
    with open(config_path) as file:
        config = yaml.safe_load(file)
    # Each seed trains its own teacher: its cache lives with the run (a shared default folder would hold another
    # seed's teacher outputs for the same data, which the cache refuses).
    config.update(overrides, seed=seed, output_dir=output_dir, overwrite_output_dir=True,
                  teacher_cache_dir=os.path.join(output_dir, "teacher_cache"))
    seeded = f"{output_dir}.yaml"
    os.makedirs(os.path.dirname(os.path.abspath(seeded)), exist_ok=True)
    with open(seeded, "w") as file:
        yaml.safe_dump(config, file)
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, recipe_for(config_path), seeded], check=True, env=env, cwd=REPO)


def figures(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "results.json")) as file:
        report = json.load(file)
    metric = report["main_metric"]
    rows = {row["name"]: row for row in report["rows"]}
    test = report.get("test", {})
    reference = "ensemble" if "ensemble" in rows else "teacher"  # what the recipe's retention refers to
    return {
        name: {
            "validation": row["metric_value"],
            "test": test.get(name, {}).get(metric),
            "retention": row["retention"],
            "test_retention": test[name][metric] / test[reference][metric] if name in test else None,
            "speedup": row["speedup"],
        }
        for name, row in rows.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Override config entries (YAML values), e.g. --set augment=true temperature=4; the "
                             "output folders are named after them.")
    parser.add_argument("--summarise", action="store_true", help="Read finished runs only.")
    args = parser.parse_args()
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    with open(args.config) as file:
        base_dir = yaml.safe_load(file)["output_dir"]
    variant = re.sub(r"[^\w.-]", "_", "".join(f"-{key}{value}" for key, value in overrides.items()))
    runs = {}
    for seed in args.seeds:
        output_dir = f"{base_dir}{variant}_seed{seed}"
        if not args.summarise:
            run(args.config, seed, output_dir, overrides)
        runs[seed] = figures(output_dir)
    names = list(next(iter(runs.values())))
    print(f"\n{args.config} {' '.join(args.set)}, seeds {args.seeds}\n")
    print("| model | validation | test | retention (val) | retention (test) | CPU speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        def mean(key, name=name):
            values = [runs[seed][name][key] for seed in args.seeds if runs[seed][name][key] is not None]
            if not values:
                return "–"
            spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.4f}{spread}"

        print(f"| {name} | {mean('validation')} | {mean('test')} | {mean('retention')} | {mean('test_retention')} "
              f"| {mean('speedup')} |")


if __name__ == "__main__":
    main()
