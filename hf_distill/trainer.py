"""`DistillationTrainer`: a drop-in `transformers.Trainer` whose loss distils a teacher into the student."""

import inspect
import os

import datasets
import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import find_labels, logging

from .arguments import DistillationTrainingArguments
from .cache import cache_teacher_logits, check_teacher_columns, distribution_width
from .checkpoints import StudentCheckpoints
from .collator import TeacherColumnsCollator
from .fused_vocabulary import FusedForward
from .heads import DENSE, TOPK, DistillationHead, Units, head_for
from .layer_alignment import LayerAlignment
from .model_card import LABELLED_PIPELINES, build_model_card, distillation_settings, teacher_names
from .objective import DistillationObjective, TermLog, resolve_distillation_loss, step_counts
from .teacher import (
    base_model,
    check_compatible,
    check_teacher_logits_finite,
    check_teacher_placement,
    check_teacher_set,
    freeze_teacher,
    model_config,
    named_labels,
    named_teachers,
    place_teacher,
)
from .teacher_columns import TeacherColumns, teacher_column
from .validation import check_distillation_inputs
from .wrapper import DistillWrapper

logger = logging.get_logger(__name__)


def _distillation_arguments(args: TrainingArguments | None) -> DistillationTrainingArguments:
    """`args` as `DistillationTrainingArguments` (a plain `TrainingArguments` gets the distillation defaults)."""
    if args is None:
        args = DistillationTrainingArguments(output_dir="trainer_output")
    elif not isinstance(args, DistillationTrainingArguments):
        args = DistillationTrainingArguments.from_training_arguments(args)
    if args.n_gpu > 1:
        raise ValueError(
            f"{args.n_gpu} GPUs are visible to one process, which would run the student under DataParallel; "
            "DistillationTrainer supports distributed data parallel only. Launch with `accelerate launch` or "
            "`torchrun`, or restrict CUDA_VISIBLE_DEVICES to one GPU."
        )
    return args


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(base_model(model).forward).parameters


class DistillationTrainer(StudentCheckpoints, Trainer):
    """`transformers.Trainer` that trains the student on the teacher's outputs as well as the labels.

    The loss is `logits_loss_weight * (alpha * loss_kd + (1 - alpha) * loss_ce) + sum_i weight_i * loss_i` over the
    intermediate-layer alignment losses that have a weight > 0 (see [`DistillationTrainingArguments`]). `loss_kd`
    and `loss_ce` are sums over the positions that count (examples, or tokens for token-level heads) divided by
    the optimizer step's total over its micro-batches and processes.

    Which outputs carry the teacher's distribution, and which positions count, is the business of the student's
    head (`hf_distill.heads`, chosen from the model class). The teacher's outputs come from dataset columns when
    present (the fast path: a distillation step then costs a plain training step). Given a `teacher_model` and a
    dataset without them, the trainer builds them once with [`cache_teacher_logits`]
    (`args.use_teacher_cache=True`, the default) or runs the frozen teacher on every batch
    (`use_teacher_cache=False`, non-`datasets` datasets, or any alignment loss on).

    Without a teacher and without teacher columns it is `transformers.Trainer`, unchanged.

    Args:
        model: the student (a `PreTrainedModel` or a PEFT model).
        args: [`DistillationTrainingArguments`]; a plain `TrainingArguments` gets the distillation defaults.
        teacher_model: optional teacher sharing the student's label space and tokenizer, or several (a list, or a
            dict name -> model; `args.teacher_weights` and `args.teacher_ensemble` combine them, each has its own
            cache column `teacher_logits_<name>`, so adding a teacher never recomputes the others). It is frozen (a PEFT
            teacher is merged first, in place: the `PeftModel` passed in loses its adapter), placed by accelerate,
            never wrapped in DDP and never saved.
        Every other argument is [`~transformers.Trainer`]'s.
    """

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_model: nn.Module | list[nn.Module] | dict[str, nn.Module] | None = None,
        **kwargs,
    ):
        args = _distillation_arguments(args)
        if args.uses_alignment and teacher_model is None:
            raise ValueError(
                "Intermediate-layer losses (hidden/embedding/attention/relation weights > 0) compare the student with "
                "the teacher's layers, so they need the teacher online: pass teacher_model=... to DistillationTrainer, "
                "or set those weights to 0 to distil from cached logits only."
            )
        teachers = named_teachers(teacher_model)
        self._teacher_names = list(teachers) or [""]
        eval_datasets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        #: Each teacher's cache columns by field (`"logits"`, or the top-k fields once the head is known).
        self.teacher_columns = TeacherColumns(args.teacher_logits_column, self._teacher_names)
        distilling = bool(teachers) or any(
            self.teacher_columns.present(dataset) for dataset in (train_dataset, *eval_datasets)
        )
        self.head: DistillationHead | None = None
        #: The frozen teachers by name (`""` for a single one); `teacher_model` is the first.
        self.teacher_models: dict[str, nn.Module] = {}
        self._prepared_teachers: set[str] = set()
        self.alignment: LayerAlignment | None = None
        if model is not None and distilling:
            # Everything is checked, and caches built, before Trainer.__init__ creates output_dir: bad input writes
            # nothing.
            model = self._set_up_distillation(model, teachers, args, train_dataset, eval_dataset, processing_class)
            train_dataset = self._with_teacher_outputs(train_dataset, "train", args, processing_class)
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    name: self._with_teacher_outputs(dataset, f"eval '{name}'", args, processing_class)
                    for name, dataset in eval_dataset.items()
                }
            else:
                eval_dataset = self._with_teacher_outputs(eval_dataset, "eval", args, processing_class)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.head is not None:
            self._adapt_trainer(args, processing_class)

    def _set_up_distillation(self, model, teachers: dict, args, train_dataset, eval_dataset, tokenizer) -> nn.Module:
        """Check the models, settings and given teacher columns; freeze the teachers; the model to train."""
        self.head = head_for(model, args.distillation_head)
        check_teacher_set(teachers, self.head, args)
        for teacher in teachers.values():
            self.head.num_classes = check_compatible(model, teacher, self.head, tokenizer)
        for teacher in teachers.values() or [None]:
            check_distillation_inputs(model, teacher, self.head, args, train_dataset, eval_dataset, tokenizer)
        self.teacher_models = {name: freeze_teacher(teacher) for name, teacher in teachers.items()}
        #: Classes per distribution; the top-k width is at most this.
        self._num_classes = distribution_width(model_config(model), self.head)
        self._top_k = min(args.teacher_cache_top_k, self._num_classes)
        self.teacher_columns = TeacherColumns(args.teacher_logits_column, self._teacher_names, self.head.cache_layout)
        self.distillation_loss = resolve_distillation_loss(self.head, model_config(model), args.distillation_loss)
        self.objective = DistillationObjective(
            self.head, args, self.distillation_loss, self._top_k,
            lambda logits: check_teacher_logits_finite(logits, self.teacher_model),
        )
        if args.uses_alignment:
            self.alignment = LayerAlignment(model, self.teacher_models[self._teacher_names[0]], args)
            model = self.alignment.student
        # Every given teacher column is checked before any cache is built: a bad eval set fails first.
        eval_datasets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        for dataset in (train_dataset, *eval_datasets):
            if isinstance(dataset, datasets.Dataset):
                self._check_teacher_columns(dataset, args)
        return model

    def _adapt_trainer(self, args: DistillationTrainingArguments, tokenizer) -> None:
        """What `Trainer.__init__` set that distillation changes: loss scaling, label names, the collator."""
        for teacher in self.teacher_models.values():  # placed lazily, but refused before any step
            check_teacher_placement(teacher, self.accelerator)
        # The losses are sums divided by the whole optimizer step's counts (get_batch_samples), so Trainer must not
        # divide them by the accumulation steps; the student never needs num_items_in_batch.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = False
        if args.label_names is None:
            student_class = base_model(self.student).__class__
            # Trainer read the label names off the wrapper's class, or off a class that declares none (DeiT).
            self.label_names = find_labels(student_class) or list(self.head.default_label_names)
        self._student_keeps_logits = _accepts(self.student, "logits_to_keep")
        self._teacher_keeps_logits = {name: _accepts(teacher, "logits_to_keep")
                                      for name, teacher in self.teacher_models.items()}
        if self.head.cache_layout != DENSE:
            row_width = self._top_k if self.head.cache_layout == TOPK else self._num_classes
            widths = {column: None if key == "rest" else row_width
                      for names in self.teacher_columns.by_teacher.values() for key, column in names.items()}
            self.data_collator = TeacherColumnsCollator(
                self.data_collator, widths, self.head.length_column,
                getattr(tokenizer, "padding_side", "right") or "right",
            )
        self._terms = {"train": TermLog(), "eval": TermLog()}
        #: The fused vocabulary loss of each model (`"student"`, teacher names) where it applies.
        self._fused = self._fused_forwards(args)
        self._step_totals = None
        self._keep_all_logits = False

    def _fused_forwards(self, args: DistillationTrainingArguments) -> dict[str, FusedForward]:
        if not args.fused_vocabulary_loss or self.head.cache_layout != TOPK or self.alignment is not None:
            return {}
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            logger.info(f"Under {self.accelerator.distributed_type} the output layers are sharded outside their "
                        "forward: the vocabulary loss is not fused.")
            return {}
        fused = {"student": FusedForward("student", base_model(self.student), self.head.num_classes)}
        for name, teacher in self.teacher_models.items():
            fused[name] = FusedForward(f"teacher {name}".strip(), base_model(teacher), self.head.num_classes)
        return fused

    @property
    def vocabulary_loss_paths(self) -> dict[str, str]:
        """How each model's vocabulary loss runs: `"fused"`, `"unfused"`, or `"unverified"` before the first step."""
        return {key: fused.path for key, fused in self._fused.items()}

    @property
    def teacher_model(self) -> nn.Module | None:
        """The (first) teacher."""
        return next(iter(self.teacher_models.values()), None)

    @property
    def layer_map(self) -> dict[int, int]:
        """`{student layer: teacher layer}` (1-based) of the intermediate-layer losses; empty without them."""
        return self.alignment.layer_map if self.alignment is not None else {}

    @property
    def student(self) -> nn.Module:
        """The student being trained, without the projections wrapper (a `PreTrainedModel` or a PEFT model)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.student if isinstance(model, DistillWrapper) else model

    @property
    def _student_config(self):
        return self.student.config

    # ---- set-up ----

    def _with_teacher_outputs(self, dataset, name: str, args: DistillationTrainingArguments, tokenizer):
        """Check the teacher columns of `dataset`, building them from the teacher's cache when they are missing."""
        if not isinstance(dataset, datasets.Dataset):
            return dataset
        if len(dataset) == 0:
            raise ValueError(f"The {name} dataset is empty: give it at least one example.")
        if self.teacher_columns.present(dataset):
            return dataset  # checked in __init__
        if not self.teacher_models:
            raise ValueError(
                f"The {name} dataset has no '{args.teacher_logits_column}' column and no teacher_model was given. "
                "Pass teacher_model=... to DistillationTrainer, or add the column with "
                "hf_distill.cache_teacher_logits(teacher, dataset)."
            )
        if not args.use_teacher_cache or args.uses_alignment:  # the teachers run on every batch anyway
            return dataset
        # Each teacher's cache belongs to the dataset without teacher columns: adding a teacher reuses the others'.
        present = [column for column in self.teacher_columns.all if column in dataset.column_names]
        base = dataset.remove_columns(present) if present else dataset
        for teacher_name, teacher in self.teacher_models.items():
            if self.teacher_columns.present(dataset, teacher_name):
                continue
            new_columns = list(self.teacher_columns.by_teacher[teacher_name].values())
            cached = self._cache_teacher(teacher, base, teacher_name, args, tokenizer).select_columns(new_columns)
            dataset = datasets.concatenate_datasets([dataset, cached], axis=1)
        return dataset

    def _cache_teacher(self, teacher, dataset, teacher_name: str, args, tokenizer):
        teacher.to(args.device)
        return cache_teacher_logits(
            teacher, dataset, tokenizer=tokenizer, column=teacher_column(args.teacher_logits_column, teacher_name),
            device=args.device, head=self.head, **args.teacher_cache_kwargs(),
        )

    def _check_teacher_columns(self, dataset, args: DistillationTrainingArguments) -> None:
        """Check the cache columns `dataset` holds, teacher by teacher."""
        for name in self._teacher_names:
            if self.teacher_columns.present(dataset, name):
                check_teacher_columns(dataset, self.head, teacher_column(args.teacher_logits_column, name),
                                      self._num_classes, self._top_k if self.head.cache_layout == TOPK else None)

    def _set_signature_columns_if_needed(self):
        if self.head is None:
            return super()._set_signature_columns_if_needed()
        if self._signature_columns is None:
            # The student's forward decides which columns reach the model, not the projections wrapper's.
            signature = inspect.signature(base_model(self.student).forward)
            self._signature_columns = list(signature.parameters) + list({"label", "label_ids", *self.label_names})
        for column in (*self.teacher_columns.all, self.args.sample_weight_column):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _prepared_teacher(self, name: str) -> nn.Module:
        """Teacher `name` placed by accelerate on first use (lazily, so evaluate() before train() keeps autocast)."""
        if name not in self._prepared_teachers:
            self.teacher_models[name] = place_teacher(self.teacher_models[name], self.accelerator)
            self._prepared_teachers.add(name)
        return self.teacher_models[name]

    # ---- the loss ----

    def _online_teacher_outputs(self, inputs: dict, units: Units | None = None, name: str | None = None,
                                **output_flags):
        """Teacher `name`'s outputs (default: the first) from a no-grad forward on the head's teacher inputs, limited
        to `units` when its forward can."""
        if not self.teacher_models:
            raise ValueError(
                f"The batch has no '{self.args.teacher_logits_column}' and no teacher_model was given: pass "
                "teacher_model=... or add the column with hf_distill.cache_teacher_logits."
            )
        name = next(iter(self.teacher_models)) if name is None else name
        teacher = self._prepared_teacher(name)
        keep = {} if units is None else self.head.forward_kwargs(units, self._teacher_keeps_logits[name])
        with torch.no_grad():
            return teacher(**self.head.teacher_inputs(inputs), **keep, **output_flags)

    def _fused_forward(self, key: str, module: nn.Module, forward, batch: dict, units: Units):
        """`(outputs, ProjectedRows or None)`: `forward(batch)` of model `key` (`"student"` or a teacher's name), run
        for the fused vocabulary loss where it applies (`FusedForward`)."""
        fused = self._fused.get(key)
        if fused is None or self._keep_all_logits:  # compute_metrics needs the logits
            return forward(batch), None
        return fused(module, forward, batch, units)

    def _online_teacher_views(self, inputs: dict, units: Units, name: str):
        """`(outputs, ProjectedRows or None)` of teacher `name` on the batch (`_fused_forward`)."""
        if not self.teacher_models:
            return self._online_teacher_outputs(inputs, units, name), None  # raises: no teacher
        teacher = self._prepared_teacher(name)
        batch = {**self.head.teacher_inputs(inputs),
                 **self.head.forward_kwargs(units, self._teacher_keeps_logits[name])}

        def forward(teacher_batch):
            with torch.no_grad():
                return teacher(**teacher_batch)

        return self._fused_forward(name, base_model(teacher), forward, batch, units)

    def _pop_batch_fields(self, inputs: dict):
        """Take the teacher columns, sample weights and labels out of `inputs` (the student must not see them).

        The teacher columns come back as `{teacher name: {field: tensor}}` for the teachers cached in the batch.
        """
        cached = self.teacher_columns.pop(inputs)
        sample_weight = inputs.pop(self.args.sample_weight_column, None)
        labels = {name: inputs.pop(name) for name in self.label_names if name in inputs}
        return cached, sample_weight, labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted distillation loss of one micro-batch (`DistillationObjective`); each term is logged."""
        if self.head is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        head = self.head
        inputs = dict(inputs)
        cached, sample_weight, labels = self._pop_batch_fields(inputs)
        inputs = head.prepare_inputs(inputs, labels, self.student)
        mode = "train" if model.training else "eval"
        units = head.units(inputs, labels)
        if self.alignment is not None:
            student_outputs, teacher_outputs, alignment_terms = self.alignment.forward(
                lambda **flags: model(**inputs, **flags),
                lambda **flags: self._online_teacher_outputs(inputs, **flags),
                inputs.get("attention_mask"),
            )
            online = {self._teacher_names[0]: (teacher_outputs, None)}
            student_view = None
        else:
            keep = {} if self._keep_all_logits else head.forward_kwargs(units, self._student_keeps_logits)
            student_outputs, student_view = self._fused_forward(
                "student", base_model(self.student), lambda batch: model(**batch), {**inputs, **keep}, units)
            online = {name: self._online_teacher_views(inputs, units, name)
                      for name in self._teacher_names if name not in cached}
            alignment_terms = {}
        views_by_teacher = {}
        for name in self._teacher_names:
            if name in cached:
                views_by_teacher[name] = head.cached_targets(cached[name], units, inputs)
            elif online[name][1] is not None:
                views_by_teacher[name] = [online[name][1]]
            else:
                views_by_teacher[name] = head.teacher_kd_logits(online[name][0], units, inputs)
                for view in views_by_teacher[name]:
                    check_teacher_logits_finite(view, self.teacher_models[name])
        step_totals = None
        if mode == "train" and self._step_totals is not None:
            step_totals = self._step_totals / self.accelerator.num_processes
        student_views = [student_view] if student_view is not None else head.kd_logits(student_outputs, units, inputs)
        step = self.objective(
            student_outputs, student_views, views_by_teacher, units, inputs,
            sample_weight, alignment_terms, step_totals, evaluating=mode == "eval",
        )
        for name, (value_sum, count) in step.terms.items():
            self._terms[mode].add(name, value_sum, count)
        return (step.loss, head.predictions(student_outputs)) if return_outputs else step.loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.head is None:
            return batch_samples, num_items_in_batch
        # The counts of the whole optimizer step (all its micro-batches, all processes): see DistillationObjective.
        self._step_totals = None
        if batch_samples:
            counts = [step_counts(self.head, batch, self.label_names, self.args.sample_weight_column)
                      for batch in batch_samples]
            self._step_totals = self.accelerator.reduce(torch.stack(counts).sum(0).to(device), reduction="sum")
        return batch_samples, num_items_in_batch

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluate through `compute_loss`, so `eval_loss` is the distillation loss with or without labels."""
        if self.head is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = [inputs.get(name) for name in self.label_names]
        labels = None if not labels or any(label is None for label in labels) else labels
        if labels is not None:
            labels = labels[0].detach() if len(labels) == 1 else tuple(label.detach() for label in labels)
        # compute_metrics needs every position's logits; the loss alone needs the counted ones only.
        self._keep_all_logits = not prediction_loss_only
        try:
            with torch.no_grad():
                loss, predictions = self.compute_loss(model, inputs, return_outputs=True)
        finally:
            self._keep_all_logits = False
        if prediction_loss_only:
            return loss.detach(), None, None
        if isinstance(predictions, tuple):
            predictions = tuple(prediction.detach() for prediction in predictions)
        else:
            predictions = predictions.detach()
        return loss.detach(), predictions, labels

    # ---- logging ----

    def _pop_term_averages(self, mode: str) -> dict[str, float]:
        """Averages of the recorded terms over all processes since the last call, then reset."""
        return self._terms[mode].pop_averages(self.args.device, lambda tensor: self.accelerator.reduce(tensor, "sum"))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.head is not None and "loss" in logs:
            logs.update(self._pop_term_averages("train"))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if self.head is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        self._terms["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._pop_term_averages("eval").items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    # ---- the model card ----

    def distillation_settings(self) -> dict:
        """What the student was distilled with: head, temperatures, alpha, losses and weights, layer map, student
        initialisation and the teacher's cache settings (the card's `distillation` metadata)."""
        return distillation_settings(
            self.args, self.head, self.distillation_loss, self._teacher_names, self.layer_map, self._student_config,
            cached=self.teacher_columns.present(self.train_dataset), top_k=self._top_k,
        )

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        *,
        teacher_model_name: str | list[str] | None = None,
        eval_results: dict | None = None,
        dataset_split: str = "validation",
        report_markdown: str | None = None,
        chart_path: str | None = None,
        extra_settings: dict | None = None,
        output_dir: str | None = None,
        example_inputs: str | None = None,
    ):
        """`Trainer.create_model_card` with the distillation section: teacher, settings, `base_model`, tags and a
        `model-index` of `eval_results`, written to `<output_dir or args.output_dir>/README.md`.

        Args:
            teacher_model_name: the teacher's Hub id (default: its `name_or_path`).
            eval_results: the student's metrics (`Trainer.evaluate()` output works).
            report_markdown: a teacher / baseline / student table; `chart_path`: a PNG beside the card.
            extra_settings: recipe settings recorded beside `distillation_settings()` (transfer data, ...).
            example_inputs: the usage snippet's line that builds `inputs` (default: one per pipeline).
            The other arguments are `Trainer.create_model_card`'s.

        Returns:
            The `huggingface_hub.ModelCard` (None on processes other than the main one).
        """
        if self.head is None:
            return super().create_model_card(language, license, tags, model_name, finetuned_from, tasks,
                                             dataset_tags, dataset, dataset_args)
        if not self.is_world_process_zero():
            return None
        output_dir = output_dir or self.args.output_dir
        config = self._student_config
        card = build_model_card(
            student_id_or_path_base=finetuned_from or getattr(config, "_name_or_path", None),
            teacher_model_id=teacher_model_name or teacher_names(self.teacher_models),
            task=dataset_args if isinstance(dataset_args, str) else None,
            dataset_id=(dataset[0] if isinstance(dataset, list) else dataset) or "local data",
            dataset_config=dataset_args if isinstance(dataset_args, str) else None,
            model_name=model_name or self.args.hub_model_id or os.path.basename(os.path.abspath(output_dir)),
            eval_results=eval_results or {},
            distillation_settings={**self.distillation_settings(), **(extra_settings or {})},
            report_markdown=report_markdown,
            chart_path=chart_path,
            license=license or "apache-2.0",
            extra_tags=[tags] if isinstance(tags, str) else list(tags or []),
            dataset_split=dataset_split,
            pipeline_tag=self.head.pipeline_tag,
            id2label=named_labels(config) if self.head.pipeline_tag in LABELLED_PIPELINES else None,
            example_inputs=example_inputs,
        )
        os.makedirs(output_dir, exist_ok=True)
        card.save(os.path.join(output_dir, "README.md"))
        return card
