"""Distil an extractive question-answering teacher into a small student, with a label-only baseline, exact match
and F1, a report and a model card. The shape of transformers' `run_qa.py`.

    python recipes/question_answering.py recipes/configs/squad_minilm.yaml
    accelerate launch recipes/question_answering.py --dataset_name squad \
        --teacher_model_name_or_path <teacher> --output_dir out ...

Stages: (1) teacher: a question-answering checkpoint used as given, or a base checkpoint fine-tuned on the task
first; (2) its start/end logits cached per feature (every window of a long context is a feature); (3) student: a
checkpoint or the teacher's layers, distilled over the labelled questions and optional transfer questions whose
answers are dropped (distillation term only); `--baseline` trains the same init on the labelled questions alone
(`--distill false`: the teacher and the baseline only).
Scores: exact match and F1 (official SQuAD definitions, as fractions) of the answers that `run_qa.py`'s
post-processing takes from the logits, on the validation questions.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import datasets
from datasets import concatenate_datasets
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, set_seed

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.recipe_support import stages
from hf_distill.recipe_support.metrics import make_question_answering_compute_metrics
from hf_distill.recipe_support.models import check_same_tokenizer, load_model, load_tokenizer
from hf_distill.recipe_support.stages import (
    OneTeacherArguments,
    claim_output_dir,
    create_student_card,
    finetune_and_save_teacher,
    init_settings,
    new_student,
    parse_args,
    predict_model,
    push_student,
    run_record,
    train_baseline,
    write_comparison,
)
from hf_distill.recipe_support.tasks.question_answering import (
    load_question_answering_data,
    prepare_train_features,
    prepare_validation_features,
)

MAIN_METRIC = "f1"
CARD_METRICS = ("exact_match", "f1")


ModelArguments = OneTeacherArguments


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset: squad or squad_v2."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    train_file: str | None = field(
        default=None, metadata={"help": "JSON lines with the squad columns (id, context, question, answers)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation file, same format."})
    version_2_with_negative: bool = field(
        default=False, metadata={"help": "Some questions have no answer (SQuAD v2.0): allowed, and scored."}
    )
    null_score_diff_threshold: float = field(
        default=0.0,
        metadata={"help": "v2.0: answer nothing when the null score beats the best span's by more than this."},
    )
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per feature (question + context window)."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens shared by consecutive windows of a long context."})
    n_best_size: int = field(default=20, metadata={"help": "Start and end candidates per feature."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Labelled train questions used."})
    transfer_train_samples: int = field(
        default=0, metadata={"help": "Further train questions used without their answers, as transfer data."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Validation questions used."})

    def __post_init__(self):
        if self.transfer_train_samples < 0:
            raise ValueError(f"--transfer_train_samples must be 0 or more, got {self.transfer_train_samples}.")
        if not (self.dataset_name or self.train_file):
            raise ValueError("Give --dataset_name (e.g. squad) or --train_file and --validation_file.")
        if self.train_file and not self.validation_file:
            raise ValueError("--train_file needs a --validation_file too: the report compares models on it.")
        if not 0 <= self.doc_stride < self.max_seq_length:
            raise ValueError(
                f"--doc_stride ({self.doc_stride}) must be below --max_seq_length ({self.max_seq_length}): it is "
                "the overlap of consecutive windows. run_qa.py's defaults are 128 and 384."
            )


@dataclass
class RecipeArguments(stages.RecipeArguments):
    distill: bool = field(
        default=True,
        metadata={"help": "Stages 2-3: cache the teacher and distil the student (false: teacher and --baseline only, "
                  "e.g. to train the baseline in another process from a saved teacher)."},
    )
    latency_max_features: int = field(
        default=512, metadata={"help": "Validation features each CPU throughput pass reads, spread over lengths."}
    )


def load_splits(data_args):
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    raw = load_question_answering_data(
        dataset_name=None if data_args.train_file else data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        data_files={split: path for split, path in files.items() if path} if data_args.train_file else None,
        version_2_with_negative=data_args.version_2_with_negative,
    )
    for split in ("train", "validation"):
        if split not in raw:
            raise ValueError(f"The data has no {split!r} split (it has {list(raw)}).")
    if data_args.max_eval_samples:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    return raw


def sorted_by_length(features):
    """The features, shortest first: evaluation batches with little padding (answers are matched by example_id)."""
    lengths = [len(ids) for ids in features["input_ids"]]
    return features.select(sorted(range(len(features)), key=lengths.__getitem__))


def spread_sample(features, count: int):
    """`count` features evenly spaced over the length-sorted features: every length, in similar-length batches."""
    step = max(1, len(features) // count)
    return features.select(range(0, len(features), step)[:count])


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
    if not (recipe_args.distill or recipe_args.baseline):
        raise ValueError("--distill false and --baseline false leave nothing to train: keep one of them.")
    raw = load_splits(data_args)
    tokenizer = load_tokenizer(model_args.teacher_model_name_or_path)
    if model_args.student_model_name_or_path:
        check_same_tokenizer(tokenizer, load_tokenizer(model_args.student_model_name_or_path),
                             model_args.teacher_model_name_or_path, model_args.student_model_name_or_path)
    num_labelled = min(data_args.max_train_samples or len(raw["train"]), len(raw["train"]))
    transfer_end = min(num_labelled + data_args.transfer_train_samples, len(raw["train"]))

    def features(questions, labelled=True):
        return prepare_train_features(questions, tokenizer, data_args.max_seq_length, data_args.doc_stride, labelled)

    labelled = features(raw["train"].select(range(num_labelled)))
    transfer = features(raw["train"].select(range(num_labelled, transfer_end)), labelled=False) if (
        transfer_end > num_labelled) else None
    distill = concatenate_datasets([labelled, transfer]) if transfer is not None else labelled
    eval_examples = raw["validation"]
    eval_features = sorted_by_length(
        prepare_validation_features(eval_examples, tokenizer, data_args.max_seq_length, data_args.doc_stride)
    )
    teacher, head_is_new = load_model(AutoModelForQuestionAnswering, model_args.teacher_model_name_or_path, 2,
                                      what="extractive QA (start and end logits)")
    claim_output_dir(output_dir, run_record(model_args, data_args, recipe_args),
                     recipe_args.overwrite_output_dir, training_args.process_index == 0)
    collator = DataCollatorWithPadding(tokenizer)
    compute_metrics = make_question_answering_compute_metrics(
        eval_examples, eval_features, data_args.version_2_with_negative, data_args.n_best_size,
        data_args.max_answer_length, data_args.null_score_diff_threshold,
    )

    # Stage 1: the teacher.
    teacher_dir = os.path.join(output_dir, "teacher")
    teacher_finetuned = finetune_and_save_teacher(teacher, tokenizer, model_args, training_args, labelled, collator,
                                                  teacher_dir, head_is_new)

    # Stages 2-3: DistillationTrainer caches the teacher's start/end logits per feature, then distils.
    def student_init():
        return new_student(teacher, AutoModelForQuestionAnswering, model_args, 2, None)

    models = {"teacher": (teacher, teacher_dir)}
    if recipe_args.baseline:
        models["baseline"] = train_baseline(student_init(), labelled, tokenizer, collator, training_args, output_dir)
    student_dir = os.path.join(output_dir, "student")
    if recipe_args.distill:
        trainer = DistillationTrainer(
            model=student_init(), teacher_model=teacher,
            args=dataclasses.replace(training_args, output_dir=student_dir), train_dataset=distill,
            processing_class=tokenizer, data_collator=collator,
        )
        trainer.train()
        trainer.save_model(student_dir)
        models["student"] = (trainer.student, student_dir)

    # Evaluation is collective (sharded data, gathered predictions): every process runs it. Trainer scores only
    # with labels, so the answers are taken from the gathered logits here.
    metrics = {}
    for name, (model, _) in models.items():
        _, predictions, _ = predict_model(model, eval_features, collator, None, training_args, "validation")
        metrics[name] = compute_metrics(predictions)
    if not training_args.should_save:  # Only the main process reports, writes the card and pushes.
        return
    report, markdown = write_comparison(
        models, metrics, MAIN_METRIC, spread_sample(eval_features, recipe_args.latency_max_features), collator,
        output_dir, copy_to=[student_dir] if recipe_args.distill else [], batch_size=recipe_args.latency_batch_size,
        rounds=recipe_args.latency_rounds,
    )
    print(f"\nExtractive QA: teacher vs baseline vs distilled student (validation, F1)\n\n{markdown}")
    print("exact match: " + ", ".join(f"{name} {m['exact_match']:.4f}" for name, m in metrics.items()))
    if not recipe_args.distill:
        return

    settings = {
        **init_settings(model_args, teacher_finetuned),
        "labelled_questions": num_labelled,
        "transfer_questions": transfer_end - num_labelled,
        "labelled_features": len(labelled),
        "transfer_features": len(distill) - len(labelled),
        "validation_questions": len(eval_examples),
        "version_2_with_negative": data_args.version_2_with_negative,
        "max_seq_length": data_args.max_seq_length,
        "doc_stride": data_args.doc_stride,
    }
    create_student_card(trainer, model_args, data_args, training_args, report, markdown,
                        local_dataset="local question-answering files", tags=["extractive-qa"],
                        eval_results={name: metrics["student"][name] for name in CARD_METRICS}, settings=settings)
    if push_to_hub:
        push_student(student_dir, training_args)


if __name__ == "__main__":
    main()
