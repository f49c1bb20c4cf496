"""Distil an image classifier into a smaller ViT, or into a DeiT with its distillation token, with a label-only
baseline, a report and a model card. The shape of transformers' `run_image_classification.py`.

    python recipes/image_classification.py recipes/configs/digits_vit.yaml          # offline, trains its teacher
    accelerate launch recipes/image_classification.py --dataset_name cifar10 \
        --teacher_model_name_or_path <ViT fine-tuned on CIFAR-10> --student_model_type vit deit \
        --student_config_overrides "num_hidden_layers=4" --output_dir out ...

Stages: (1) teacher: a given classifier (fine-tuned first when its head is new, `--ignore_mismatched_sizes`
replaces one of another size), or a model of `--teacher_model_type` built from a config and trained here;
(2) its logits cached with the processed images (not with `--augment`: random views need the teacher online);
(3) each student of `--student_model_type`: a `vit` (ViTForImageClassification, any width or depth) or a `deit`
(DeiTForImageClassificationWithTeacher: its distillation head learns the teacher, its class head the labels, the
two averaged at inference), built from the student config; `--baseline` trains the same student on labels alone
(for `deit`, DeiTForImageClassification: the same network without the distillation token, DeiT's own baseline).
Images are processed by the teacher's image processor with its PIL backend (transformers' ViTImageProcessorPil:
resize, rescale, normalise), so torchvision is never needed.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Trainer,
    ViTImageProcessorPil,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.recipe_support import stages
from hf_distill.recipe_support.models import load_model, resolve_model_path
from hf_distill.recipe_support.stages import (
    claim_output_dir,
    evaluate_model,
    parse_args,
    push_student,
    run_record,
    teachers_metrics,
    write_comparison,
)
from hf_distill.recipe_support.tasks.image_classification import (
    load_image_classification_data,
    mixup_copies,
    process_images,
)

logger = logging.get_logger("hf_distill.recipes.image_classification")
STUDENT_TYPES = ("vit", "deit")


@dataclass
class ModelArguments:
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher image classifier (Hub id or folder); or use --teacher_model_type."}
    )
    teacher_model_type: str | None = field(
        default=None, metadata={"help": "Train a teacher of this type (e.g. vit) from a config, here, first."}
    )
    teacher_config_overrides: str | None = field(
        default=None, metadata={"help": "Config of that teacher, e.g. 'image_size=8,patch_size=2,hidden_size=96'."}
    )
    teacher_hub_id: str | None = field(default=None, metadata={"help": "Hub id of the teacher, for the card."})
    teacher_seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Train one teacher per seed (a teacher trained here: --teacher_model_type, or a checkpoint "
                  "with a new head); the students distil their ensemble (--teacher_ensemble, --teacher_weights). "
                  "Default: one teacher, trained with --seed."},
    )
    teacher_num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs of teacher training."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of teacher training."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a teacher head of another size (e.g. ImageNet's 1,000 classes)."}
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor (default: the teacher's, or ViT's at the config's size)."}
    )
    student_model_type: list[str] = field(
        default_factory=lambda: ["vit"], metadata={"help": "Students to distil: vit, deit, or both."}
    )
    student_config_overrides: str | None = field(
        default=None,
        metadata={"help": "Changes to the teacher's config for the students, e.g. 'num_hidden_layers=2,"
                  "hidden_size=64,intermediate_size=128'. Image and patch size must stay the teacher's."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (cifar10), or sklearn_digits."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder of the train split."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder of the validation split."})
    train_file: str | None = field(default=None, metadata={"help": ".npz with images, labels (, label_names)."})
    validation_file: str | None = field(default=None, metadata={"help": ".npz of the validation split."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default image/img)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default label/labels)."})
    train_val_split: float = field(default=0.15, metadata={"help": "Train share held out without a validation set."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train images used."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Validation (and test) images used."})
    augment: bool = field(
        default=False,
        metadata={"help": "Random shifts (and --augment_flip) of the train images, a new view each epoch; the teacher "
                  "then runs online (cached logits belong to one view)."},
    )
    augment_max_shift: int = field(default=1, metadata={"help": "Largest shift in pixels of --augment."})
    augment_flip: bool = field(default=False, metadata={"help": "Mirror half the views (not for digits)."})
    mixup_copies: int = field(
        default=0,
        metadata={"help": "Transfer images for the students: this many mixup copies of the train set (two train "
                  "images mixed, no label), which the teacher labels. The baselines train on the labelled images."},
    )
    mixup_alpha: float = field(default=1.0, metadata={"help": "Beta(alpha, alpha) of the mixup weights."})
    process_on_the_fly: bool = field(
        default=False, metadata={"help": "Process images on access instead of storing them (large images)."}
    )

    def __post_init__(self):
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")
        if self.mixup_copies < 0 or self.mixup_alpha <= 0:
            raise ValueError(f"--mixup_copies must be >= 0 and --mixup_alpha > 0, got {self.mixup_copies} and "
                             f"{self.mixup_alpha}.")
        if self.mixup_copies and (self.augment or self.process_on_the_fly):
            raise ValueError("--mixup_copies mixes stored images: drop --augment / --process_on_the_fly to use it.")


@dataclass
class RecipeArguments(stages.RecipeArguments):
    latency_batch_size: int = field(default=64, metadata={"help": "Batch size of the CPU throughput measurement."})


def parse_overrides(text: str | None, flag: str) -> dict:
    """`'a=1,b=0.5,c=gelu'` -> `{"a": 1, "b": 0.5, "c": "gelu"}`."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag}: {item!r} is not key=value; write e.g. 'hidden_size=64,num_hidden_layers=2'.")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        overrides[key.strip()] = value
    return overrides


def check_args(model_args, training_args) -> None:
    if bool(model_args.teacher_model_name_or_path) == bool(model_args.teacher_model_type):
        raise ValueError(
            "Give exactly one of --teacher_model_name_or_path (a trained or pretrained classifier) and "
            "--teacher_model_type (e.g. vit, trained here from --teacher_config_overrides)."
        )
    num_teachers = len(model_args.teacher_seeds or [None])
    if training_args.teacher_weights is not None and len(training_args.teacher_weights) != num_teachers:
        raise ValueError(f"--teacher_weights has {len(training_args.teacher_weights)} weights for {num_teachers} "
                         "teacher(s): give one weight per --teacher_seeds seed, in the same order.")
    unknown = [kind for kind in model_args.student_model_type if kind not in STUDENT_TYPES]
    if unknown or not model_args.student_model_type:
        raise ValueError(f"--student_model_type {unknown}: use one or more of {list(STUDENT_TYPES)}.")


def build_teacher(model_args, num_labels, id2label):
    """`(teacher, trained_here, config)`."""
    label_space = {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if model_args.teacher_model_type:
        config = AutoConfig.for_model(
            model_args.teacher_model_type, **parse_overrides(model_args.teacher_config_overrides,
                                                             "--teacher_config_overrides"), **label_space
        )
        return AutoModelForImageClassification.from_config(config), True
    teacher, head_is_new = load_model(
        AutoModelForImageClassification, model_args.teacher_model_name_or_path, num_labels, id2label,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, what="the data's classes",
    )
    return teacher, head_is_new


def student_config(teacher_config, kind: str, overrides: dict):
    """The student's config: the teacher's (as a ViT or DeiT config) with `overrides`."""
    fields = {key: value for key, value in teacher_config.to_dict().items()
              if key not in ("model_type", "architectures")}
    config = AutoConfig.for_model(kind, **{**fields, **overrides})
    if (config.image_size, config.patch_size) != (teacher_config.image_size, teacher_config.patch_size):
        raise ValueError("--student_config_overrides must keep the teacher's image_size and patch_size: both read the "
                         "same processed images.")
    return config


def image_processor_for(model_args, teacher_config):
    name = model_args.image_processor_name or model_args.teacher_model_name_or_path
    if name:
        try:
            return AutoImageProcessor.from_pretrained(resolve_model_path(name))
        except OSError:
            if model_args.image_processor_name:
                raise
    # A teacher trained here has no processor: ViT's, at the model's size, normalising to [-1, 1].
    channels = teacher_config.num_channels
    return ViTImageProcessorPil(size={"height": teacher_config.image_size, "width": teacher_config.image_size},
                                image_mean=[0.5] * channels, image_std=[0.5] * channels)


def cross_entropy_of_logits(outputs, labels, num_items_in_batch=None):
    """The label loss of a model whose forward takes no labels (DeiT with teacher), for evaluation."""
    return torch.nn.functional.cross_entropy(outputs["logits"], labels)


def main(argv=None):
    model_args, data_args, recipe_args, training_args = parse_args(
        (ModelArguments, DataArguments, RecipeArguments, DistillationTrainingArguments),
        sys.argv[1:] if argv is None else argv,
    )
    check_args(model_args, training_args)
    push_to_hub = training_args.push_to_hub
    # Images have no padding: keep every column the collator needs; the teacher's logits ride in the batch.
    training_args = dataclasses.replace(training_args, push_to_hub=False, remove_unused_columns=False)
    datasets.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    output_dir = training_args.output_dir

    # Data, models and configs: every check before the output folder is claimed and anything trains.
    raw, label_names = load_image_classification_data(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir, validation_dir=data_args.validation_dir, train_file=data_args.train_file,
        validation_file=data_args.validation_file, image_column=data_args.image_column_name,
        label_column=data_args.label_column_name, train_val_split=data_args.train_val_split,
    )
    if data_args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if data_args.max_eval_samples:
        for split in ("validation", "test"):
            if split in raw:
                raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
    id2label = dict(enumerate(label_names))
    teacher_seeds = model_args.teacher_seeds or [training_args.seed]
    teachers = {}
    for index, seed in enumerate(teacher_seeds):
        set_seed(seed)  # each teacher's initial weights (of a model trained here, or of a new head)
        name = "teacher" if len(teacher_seeds) == 1 else f"teacher_{index}"
        teachers[name], train_teacher = build_teacher(model_args, len(label_names), id2label)
        if model_args.teacher_seeds and not train_teacher:
            raise ValueError(
                f"--teacher_seeds trains one teacher per seed, but {model_args.teacher_model_name_or_path} is a "
                "trained classifier of these classes, used as given. Drop --teacher_seeds, or train teachers here "
                "with --teacher_model_type."
            )
    teacher = teachers[next(iter(teachers))]
    overrides = parse_overrides(model_args.student_config_overrides, "--student_config_overrides")
    student_configs = {kind: student_config(teacher.config, kind, overrides) for kind in model_args.student_model_type}
    image_processor = image_processor_for(model_args, teacher.config)
    augment = {"max_shift": data_args.augment_max_shift, "flip": data_args.augment_flip} if data_args.augment else None
    processed = process_images(raw, image_processor, teacher.config.num_channels, augment, training_args.seed,
                               on_the_fly=data_args.process_on_the_fly)
    online_teacher = bool(augment) or data_args.process_on_the_fly
    if online_teacher and training_args.use_teacher_cache:
        logger.warning("The train images are processed on access (--augment / --process_on_the_fly): the teacher "
                       "runs online on every batch, since a cached logit belongs to one view of an image.")
        training_args = dataclasses.replace(training_args, use_teacher_cache=False)
    distill_train = processed["train"]
    if data_args.mixup_copies:
        distill_train = datasets.concatenate_datasets([distill_train, mixup_copies(
            distill_train, data_args.mixup_copies, data_args.mixup_alpha, seed=training_args.seed)])
    claim_output_dir(output_dir, run_record(model_args, data_args, recipe_args),
                     recipe_args.overwrite_output_dir, training_args.process_index == 0)
    collator = default_data_collator

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}

    # Stage 1: the teachers, each in its own folder.
    teacher_dirs = {name: os.path.join(output_dir, name) for name in teachers}
    for (name, model), seed in zip(teachers.items(), teacher_seeds):
        if train_teacher:
            Trainer(
                model=model,
                args=dataclasses.replace(training_args, output_dir=teacher_dirs[name], seed=seed,
                                         num_train_epochs=model_args.teacher_num_train_epochs,
                                         learning_rate=model_args.teacher_learning_rate),
                train_dataset=processed["train"], data_collator=collator,
            ).train()
        if training_args.should_save:
            model.save_pretrained(teacher_dirs[name])
            image_processor.save_pretrained(teacher_dirs[name])
    several = len(teachers) > 1
    teacher_model = list(teachers.values()) if several else teacher

    # Stages 2-3: per student, distillation (logits cached on first use, then reused) and its baseline.
    models, trainers = {name: (model, teacher_dirs[name]) for name, model in teachers.items()}, {}
    for kind, config in student_configs.items():
        suffix = "" if len(student_configs) == 1 else f"_{kind}"
        student_class = DeiTForImageClassificationWithTeacher if kind == "deit" else AutoModelForImageClassification
        set_seed(training_args.seed)
        student = (student_class(config) if kind == "deit" else student_class.from_config(config))
        student_dir = os.path.join(output_dir, f"student{suffix}")
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher_model,
            args=dataclasses.replace(training_args, output_dir=student_dir),
            train_dataset=distill_train, eval_dataset=processed["validation"], data_collator=collator,
            compute_metrics=compute_metrics,
        )
        trainer.train()
        trainer.save_model(student_dir)
        image_processor.save_pretrained(student_dir)
        trainers[kind] = trainer
        if recipe_args.baseline:
            set_seed(training_args.seed)  # the same initial weights as the student
            baseline_model = (DeiTForImageClassification(config) if kind == "deit"
                              else AutoModelForImageClassification.from_config(config))
            baseline_dir = os.path.join(output_dir, f"baseline{suffix}")
            baseline = Trainer(model=baseline_model, args=dataclasses.replace(training_args, output_dir=baseline_dir),
                               train_dataset=processed["train"], data_collator=collator)
            baseline.train()
            baseline.save_model(baseline_dir)
            models[f"baseline{suffix}"] = (baseline.model, baseline_dir)
        models[f"student{suffix}"] = (trainer.student, student_dir)

    eval_splits = {split: processed[split] for split in ("validation", "test") if split in processed}
    metrics = {
        split: {
            **teachers_metrics(teachers, dataset, collator, compute_metrics, training_args, split),
            **{
                name: evaluate_model(model, dataset, collator, compute_metrics, training_args, split,
                                     compute_loss_func=cross_entropy_of_logits if isinstance(
                                         model, DeiTForImageClassificationWithTeacher) else None)
                for name, (model, _) in list(models.items())[len(teachers):]
            },
        }
        for split, dataset in eval_splits.items()
    }
    if not training_args.should_save:
        return
    student_dirs = [path for name, (_, path) in models.items() if name.startswith("student")]
    report, markdown = write_comparison(
        models, metrics["validation"], "accuracy", eval_splits["validation"], collator, output_dir,
        copy_to=student_dirs, batch_size=recipe_args.latency_batch_size, rounds=recipe_args.latency_rounds,
        metric_names=["accuracy"], extra={"test": metrics["test"]} if "test" in metrics else None,
        combined={"ensemble": list(teachers)} if several else None, reference="ensemble" if several else "teacher",
    )
    title = "teachers, their ensemble" if several else "teacher"
    print(f"\nImage classification: {title} vs baselines vs distilled students (validation accuracy)\n\n{markdown}")
    if "test" in metrics:
        print("test accuracy: " + ", ".join(f"{name} {m['accuracy']:.4f}" for name, m in metrics["test"].items()))

    teacher_id = model_args.teacher_hub_id or model_args.teacher_model_name_or_path or "trained here"
    for kind, trainer in trainers.items():
        student_dir = trainer.args.output_dir
        settings = {
            **({"teacher_training": {"epochs": model_args.teacher_num_train_epochs,
                                     "learning_rate": model_args.teacher_learning_rate,
                                     "seeds" if several else "seed": teacher_seeds if several else teacher_seeds[0],
                                     **({"config": model_args.teacher_config_overrides}
                                        if model_args.teacher_model_type else {})}} if train_teacher else {}),
            "student_init": {"architecture": type(trainer.student).__name__,
                             "config_overrides": model_args.student_config_overrides},
            "augmentation": augment,
            **({"transfer_data": f"{data_args.mixup_copies} mixup copies of the train images (Beta("
                                 f"{data_args.mixup_alpha:g}, {data_args.mixup_alpha:g})), labelled by the teacher"}
               if data_args.mixup_copies else {}),
            "teacher_outputs": "online" if online_teacher else "cached",
            **({"inference": "mean of the class and distillation heads' logits (DeiT)"} if kind == "deit" else {}),
        }
        name = os.path.basename(student_dir)
        trainer.create_model_card(
            model_name=training_args.hub_model_id or f"{os.path.basename(os.path.abspath(output_dir))}-{name}",
            dataset=data_args.dataset_name or "local images",
            dataset_args=data_args.dataset_config_name,
            tags=["vision", kind],
            teacher_model_name=teacher_id,
            eval_results={"accuracy": metrics["validation"][name]["accuracy"]},
            report_markdown=markdown,
            chart_path=report["chart"],
            extra_settings=settings,
            output_dir=student_dir,
        )
    if push_to_hub:
        for kind, trainer in trainers.items():
            repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
            repo_id = repo_id if len(trainers) == 1 else f"{repo_id}-{kind}"
            push_student(trainer.args.output_dir, dataclasses.replace(training_args, hub_model_id=repo_id))


if __name__ == "__main__":
    main()
