"""Distil a token-classification (NER) teacher into a small student, with a label-only baseline, entity-level
scores, a report and a model card. The shape of transformers' `run_ner.py`.

    python recipes/token_classification.py recipes/configs/conll2003_minilm.yaml
    accelerate launch recipes/token_classification.py --dataset_name conll2003 \
        --teacher_model_name_or_path <teacher> --output_dir out ...

Stages: (1) teacher: a token-classification checkpoint used as given, or a base checkpoint fine-tuned on the task
first; (2) its per-token logits cached with the data; (3) student: a checkpoint or the teacher's layers, distilled
over every real token of the labelled sentences and of optional unlabelled transfer sentences (distillation term
only); `--baseline` trains the same init on the labels alone. Scores are entity precision / recall / F1 (seqeval's
definition, IOB2) and token accuracy, per word (first sub-token), on validation and test.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

import datasets
from datasets import concatenate_datasets
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    set_seed,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.recipe_support.metrics import make_token_classification_compute_metrics
from hf_distill.recipe_support.models import check_same_tokenizer, load_model, load_tokenizer, resolve_model_path
from hf_distill.recipe_support.stages import (
    OneTeacherArguments,
    RecipeArguments,
    claim_output_dir,
    create_student_card,
    evaluate_model,
    finetune_and_save_teacher,
    init_settings,
    new_student,
    parse_args,
    push_student,
    run_record,
    train_baseline,
    write_comparison,
)
from hf_distill.recipe_support.tasks.token_classification import (
    load_token_classification_data,
    read_transfer_sentences,
    tokenize_and_align_labels,
)

MAIN_METRIC = "f1"
CARD_METRICS = ("f1", "precision", "recall", "accuracy")


ModelArguments = OneTeacherArguments


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. conll2003."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    train_file: str | None = field(default=None, metadata={"help": "JSON lines (tokens, ner_tags) or CoNLL file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Test file, same format (scored at the end)."})
    text_column_name: str | None = field(default=None, metadata={"help": "Word column (default tokens/words)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Tag column (default ner_tags, ...)."})
    tag_names: list[str] | None = field(
        default=None, metadata={"help": "Tag names by id, for integer tags without names in the data."}
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "Label every sub-token of a word (B- becomes I- after the first), not only the first. "
                  "Scores are per word either way."},
    )
    transfer_file: str | None = field(
        default=None,
        metadata={"help": "Unlabelled sentences (text, one a line; or JSON lines / CoNLL, tags ignored) that the "
                  "teacher labels for the student: distillation term only."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Labelled train sentences used."})
    transfer_train_samples: int = field(
        default=0, metadata={"help": "Further train sentences used without their tags, as transfer text."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Validation sentences used."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Test sentences used."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per sentence after truncation."})

    def __post_init__(self):
        if self.transfer_train_samples < 0:
            raise ValueError(f"--transfer_train_samples must be 0 or more, got {self.transfer_train_samples}.")
        if not (self.dataset_name or self.train_file):
            raise ValueError("Give --dataset_name (e.g. conll2003) or --train_file and --validation_file.")
        if self.train_file and not self.validation_file:
            raise ValueError("--train_file needs a --validation_file too: the report compares models on it.")


def check_teacher_labels(name_or_path: str, label_names: list[str]) -> None:
    """Refuse a token-classification teacher trained on other tags (or other tag ids) than the data's."""
    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    if not any(name.endswith("ForTokenClassification") for name in config.architectures or []):
        return
    names = [config.id2label[i] for i in sorted(config.id2label)]
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return
    if names != label_names:
        raise ValueError(
            f"The teacher {name_or_path!r} predicts the tags {names}, but the data has {label_names}: the logits "
            "would be compared tag by tag in the wrong order. Use a teacher trained on these tags, in this order, "
            "or a base checkpoint (--finetune_teacher yes fine-tunes it here)."
        )


def load_splits(data_args):
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    raw, label_names = load_token_classification_data(
        dataset_name=None if data_args.train_file else data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        data_files={split: path for split, path in files.items() if path} if data_args.train_file else None,
        token_column=data_args.text_column_name,
        label_column=data_args.label_column_name,
        label_names=data_args.tag_names,
    )
    for split in ("train", "validation"):
        if split not in raw:
            raise ValueError(f"The data has no {split!r} split (it has {list(raw)}).")
    limits = {"validation": data_args.max_eval_samples, "test": data_args.max_predict_samples}
    for split, limit in limits.items():
        if limit and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw, label_names


def transfer_sentences(raw, data_args, num_labelled):
    parts = []
    if data_args.transfer_train_samples:
        end = min(num_labelled + data_args.transfer_train_samples, len(raw["train"]))
        parts.append(raw["train"].select(range(num_labelled, end)).select_columns(["tokens"]))
    if data_args.transfer_file:
        parts.append(read_transfer_sentences(data_args.transfer_file))
    return concatenate_datasets(parts) if parts else None


def main(argv=None):
    model_args, data_args, recipe_args, training_args = parse_args(
        (ModelArguments, DataArguments, RecipeArguments, DistillationTrainingArguments),
        sys.argv[1:] if argv is None else argv,
    )
    # The recipe pushes the finished student itself, with its card, at the end: no Trainer of it pushes.
    push_to_hub = training_args.push_to_hub
    training_args = dataclasses.replace(training_args, push_to_hub=False)
    datasets.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    output_dir = training_args.output_dir

    # Data, tokenizer and teacher: every check before the output folder is claimed and anything trains.
    raw, label_names = load_splits(data_args)
    id2label = dict(enumerate(label_names))
    tokenizer = load_tokenizer(model_args.teacher_model_name_or_path)
    if model_args.student_model_name_or_path:
        check_same_tokenizer(tokenizer, load_tokenizer(model_args.student_model_name_or_path),
                             model_args.teacher_model_name_or_path, model_args.student_model_name_or_path)
    check_teacher_labels(model_args.teacher_model_name_or_path, label_names)
    num_labelled = min(data_args.max_train_samples or len(raw["train"]), len(raw["train"]))
    labelled_raw = raw["train"].select(range(num_labelled))
    transfer_raw = transfer_sentences(raw, data_args, num_labelled)

    def tokenize(dataset, label_all_tokens=False):
        return tokenize_and_align_labels(dataset, tokenizer, label_names, data_args.max_seq_length, label_all_tokens)

    labelled = tokenize(labelled_raw, data_args.label_all_tokens)
    distill = concatenate_datasets([labelled, tokenize(transfer_raw)]) if transfer_raw is not None else labelled
    # Scores are per word: evaluation labels the first sub-token whatever the training alignment.
    eval_splits = {split: tokenize(raw[split]) for split in ("validation", "test") if split in raw}
    teacher, head_is_new = load_model(AutoModelForTokenClassification, model_args.teacher_model_name_or_path,
                                      len(label_names), id2label, what="the data's tags")
    claim_output_dir(output_dir, run_record(model_args, data_args, recipe_args),
                     recipe_args.overwrite_output_dir, training_args.process_index == 0)
    collator = DataCollatorForTokenClassification(tokenizer)
    compute_metrics = make_token_classification_compute_metrics(label_names)

    # Stage 1: the teacher.
    teacher_dir = os.path.join(output_dir, "teacher")
    teacher_finetuned = finetune_and_save_teacher(teacher, tokenizer, model_args, training_args, labelled, collator,
                                                  teacher_dir, head_is_new)

    # Stages 2-3: DistillationTrainer caches the teacher's per-token logits with the data, then distils.
    def student_init():
        return new_student(teacher, AutoModelForTokenClassification, model_args, len(label_names), id2label)

    student_dir = os.path.join(output_dir, "student")
    trainer = DistillationTrainer(
        model=student_init(), teacher_model=teacher, args=dataclasses.replace(training_args, output_dir=student_dir),
        train_dataset=distill, eval_dataset=eval_splits["validation"], processing_class=tokenizer,
        data_collator=collator, compute_metrics=compute_metrics,
    )
    trainer.train()
    trainer.save_model(student_dir)
    models = {"teacher": (teacher, teacher_dir), "student": (trainer.student, student_dir)}
    if recipe_args.baseline:
        baseline = train_baseline(student_init(), labelled, tokenizer, collator, training_args, output_dir)
        models = {"teacher": models["teacher"], "baseline": baseline, "student": models["student"]}

    # Evaluation is collective (sharded data, gathered predictions): every process runs it.
    metrics = {
        split: {name: evaluate_model(model, dataset, collator, compute_metrics, training_args, split)
                for name, (model, _) in models.items()}
        for split, dataset in eval_splits.items()
    }
    if not training_args.should_save:  # Only the main process reports, writes the card and pushes.
        return
    report, markdown = write_comparison(
        models, metrics["validation"], MAIN_METRIC, eval_splits["validation"], collator, output_dir,
        copy_to=[student_dir], batch_size=recipe_args.latency_batch_size, rounds=recipe_args.latency_rounds,
        extra={"test": metrics["test"]} if "test" in metrics else None,
    )
    print(f"\nNER: teacher vs baseline vs distilled student (validation, entity F1)\n\n{markdown}")
    if "test" in metrics:
        print("test entity F1: " + ", ".join(f"{name} {m[MAIN_METRIC]:.4f}" for name, m in metrics["test"].items()))

    settings = {
        **init_settings(model_args, teacher_finetuned),
        "labelled_sentences": len(labelled),
        "transfer_sentences": len(distill) - len(labelled),
        "label_all_tokens": data_args.label_all_tokens,
        "max_seq_length": data_args.max_seq_length,
    }
    create_student_card(trainer, model_args, data_args, training_args, report, markdown,
                        local_dataset="local token-classification files", tags=["ner"],
                        eval_results={name: metrics["validation"]["student"][name] for name in CARD_METRICS},
                        settings=settings)
    with open(os.path.join(student_dir, "test_results.json"), "w") as file:
        json.dump(metrics.get("test", {}).get("student", {}), file, indent=2)
    if push_to_hub:
        push_student(student_dir, training_args)


if __name__ == "__main__":
    main()
