"""`DistillationTrainer`: a drop-in `transformers.Trainer` whose loss distils a teacher into the student."""

import inspect
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import datasets
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import find_labels, logging

from .alignment import (
    HiddenStateProjection,
    attention_mse_loss,
    attention_relation_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    resolve_layer_map,
    value_relation_loss,
)
from .arguments import ALIGNMENT_WEIGHTS, DistillationTrainingArguments
from .cache import cache_teacher_logits, check_teacher_columns, distribution_width, teacher_columns
from .checkpoints import last_complete_checkpoint
from .collator import TeacherColumnsCollator
from .heads import DENSE, TOPK, DistillationHead, TopKTarget, Units, head_for
from .hooks import capture_outputs, value_projections
from .losses import (
    chunked_per_row,
    divergence_from_log_probs,
    divergence_per_row,
    ensemble_logits,
    forward_kl_and_cross_entropy_per_row,
    label_loss_per_row,
    mse_per_row,
    sparse_divergence_from_log_probs,
    sparse_target,
    tempered_log_softmax,
)
from .model_card import build_model_card
from .teacher import (
    base_model,
    check_compatible,
    check_teacher_logits_finite,
    check_teacher_placement,
    freeze_teacher,
    model_config,
    named_labels,
    named_teachers,
    place_teacher,
    use_eager_attention,
)
from .validation import check_distillation_inputs
from .wrapper import PROJECTIONS_FILE, DistillWrapper

logger = logging.get_logger(__name__)
# Logits per loss chunk (rows x classes): bounds the float32 softmax intermediates kept for backward (~256 MiB
# each); a batch that fits is computed in one piece, without the recomputation in backward.
LOSS_CHUNK_ELEMENTS = 2**26


def _teacher_column(column: str, teacher_name: str) -> str:
    """The cache column of a teacher: `column` for a single teacher, `column_<name>` for one of several."""
    return f"{column}_{teacher_name}" if teacher_name else column


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(base_model(model).forward).parameters


class DistillationTrainer(Trainer):
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
        if args.uses_alignment and teacher_model is None:
            raise ValueError(
                "Intermediate-layer losses (hidden/embedding/attention/relation weights > 0) compare the student with "
                "the teacher's layers, so they need the teacher online: pass teacher_model=... to DistillationTrainer, "
                "or set those weights to 0 to distil from cached logits only."
            )
        teachers = named_teachers(teacher_model)
        self._teacher_names = list(teachers) or [""]
        eval_datasets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        distilling = bool(teachers) or any(
            self._has_teacher_columns(dataset, args) for dataset in (train_dataset, *eval_datasets)
        )
        self.head: DistillationHead | None = None
        #: The frozen teachers by name (`""` for a single one); `teacher_model` is the first.
        self.teacher_models: dict[str, nn.Module] = {}
        self._prepared_teachers: set[str] = set()
        self.layer_map: dict[int, int] = {}
        self._value_relation_heads = self._value_modules = None
        if model is not None and distilling:
            # Everything is checked, and caches built, before Trainer.__init__ creates output_dir: bad input writes
            # nothing.
            self.head = head_for(model, args.distillation_head)
            self._check_teacher_set(teachers, args)
            for teacher in teachers.values():
                self.head.num_classes = check_compatible(model, teacher, self.head, processing_class)
            for teacher in teachers.values() or [None]:
                check_distillation_inputs(model, teacher, self.head, args, train_dataset, eval_dataset,
                                          processing_class)
            self.teacher_models = {name: freeze_teacher(teacher) for name, teacher in teachers.items()}
            #: Classes per distribution; the top-k width is at most this.
            self._num_classes = distribution_width(model_config(model), self.head)
            self._top_k = min(args.teacher_cache_top_k, self._num_classes)
            #: Each teacher's cache columns by field (`"logits"`, or the top-k fields).
            self._teacher_column_names = {
                name: teacher_columns(self.head.cache_layout, _teacher_column(args.teacher_logits_column, name))
                for name in self._teacher_names
            }
            self.distillation_loss = self._resolve_distillation_loss(model, args)
            if args.uses_alignment:
                model = self._setup_alignment(model, args)
            # Every given teacher column is checked before any cache is built: a bad eval set fails first.
            for dataset in (train_dataset, *eval_datasets):
                if isinstance(dataset, datasets.Dataset):
                    self._check_teacher_columns(dataset, args)
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
        if self.head is None:
            return
        for teacher in self.teacher_models.values():  # placed lazily, but refused before any step
            check_teacher_placement(teacher, self.accelerator)
        # The losses below are sums divided by the whole optimizer step's counts (get_batch_samples), so Trainer
        # must not divide them by the accumulation steps; the student never needs num_items_in_batch.
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
                      for names in self._teacher_column_names.values() for key, column in names.items()}
            self.data_collator = TeacherColumnsCollator(
                self.data_collator, widths, self.head.length_column,
                getattr(processing_class, "padding_side", "right") or "right",
            )
        self._term_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._term_counts = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._step_totals = None
        self._keep_all_logits = False

    @property
    def teacher_model(self) -> nn.Module | None:
        """The (first) teacher."""
        return next(iter(self.teacher_models.values()), None)

    def _has_teacher_columns(self, dataset, args: DistillationTrainingArguments, name: str | None = None) -> bool:
        """Whether `dataset` holds the cache columns of teacher `name` (default: of every teacher)."""
        columns = getattr(dataset, "column_names", None) or []
        names = self._teacher_names if name is None else [name]
        return all(
            any(column in columns for layout in (DENSE, TOPK)
                for column in teacher_columns(layout, _teacher_column(args.teacher_logits_column, teacher)).values())
            for teacher in names
        )

    def _check_teacher_set(self, teachers: dict, args: DistillationTrainingArguments) -> None:
        """Refuse what several teachers cannot do (before any work)."""
        if args.teacher_weights is not None and len(args.teacher_weights) != len(teachers):
            raise ValueError(
                f"teacher_weights has {len(args.teacher_weights)} weights for {len(teachers)} teacher(s): give one "
                "weight per teacher, in the order of teacher_model."
            )
        if len(teachers) < 2:
            return
        if self.head.cache_layout == TOPK:
            raise ValueError(
                f"Several teachers are supported for heads with dense or per-token outputs, not for the "
                f"{self.head.name} head's top-k targets: distil from one teacher."
            )
        if args.uses_alignment:
            raise ValueError(
                "Intermediate-layer losses pair the student's layers with one teacher's: with several teachers, set "
                "the alignment weights to 0."
            )

    @property
    def student(self) -> nn.Module:
        """The student being trained, without the projections wrapper (a `PreTrainedModel` or a PEFT model)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.student if isinstance(model, DistillWrapper) else model

    @property
    def _student_config(self):
        return self.student.config

    def _resolve_distillation_loss(self, model: nn.Module, args: DistillationTrainingArguments) -> str:
        regression = self.head.cache_layout != TOPK and getattr(model_config(model), "num_labels", None) == 1
        if args.distillation_loss == "auto":
            return "mse" if regression else "kl"
        if args.distillation_loss == "mse" and self.head.cache_layout == TOPK:
            raise ValueError(
                "distillation_loss='mse' compares raw logits, but a language-model head distils from top-k "
                "log-probabilities: use 'kl', 'reverse_kl' or 'jsd' (or 'auto')."
            )
        return args.distillation_loss

    # ---- set-up ----

    def _setup_alignment(self, student: nn.Module, args: DistillationTrainingArguments) -> nn.Module:
        """Validate the alignment settings against both models; the student, wrapped when it needs projections."""
        student_config, teacher_config = student.config, self.teacher_model.config
        self.layer_map = resolve_layer_map(
            args.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers
        )
        logger.info(f"Aligning student layers with teacher layers {self.layer_map} (1-based).")
        if args.attention_loss_weight > 0 or args.attention_relation_loss_weight > 0:
            use_eager_attention(base_model(student), "student")
            use_eager_attention(self.teacher_model, "teacher")
        if args.value_relation_loss_weight > 0:
            heads = args.relation_heads or student_config.num_attention_heads
            for who, config in (("student", student_config), ("teacher", teacher_config)):
                if config.hidden_size % heads != 0:
                    raise ValueError(
                        f"DistillationTrainingArguments.relation_heads={heads} does not divide the {who}'s width "
                        f"{config.hidden_size}: set relation_heads to a common divisor of {student_config.hidden_size} "
                        f"and {teacher_config.hidden_size}."
                    )
            self._value_relation_heads = heads
            # Found once (and now, not at the first step, an architecture without one is refused); wrapping by
            # accelerate keeps these module objects.
            self._value_modules = (
                value_projections(student, list(self.layer_map), "student"),
                value_projections(self.teacher_model, list(self.layer_map.values()), "teacher"),
            )
        self._num_student_layers = student_config.num_hidden_layers
        self._num_teacher_layers = teacher_config.num_hidden_layers

        projected_layers = []
        if args.hidden_loss_weight > 0 or args.hidden_cosine_loss_weight > 0:
            projected_layers += list(self.layer_map)
        if args.embedding_loss_weight > 0:
            projected_layers.append(0)
        if not projected_layers or student_config.hidden_size == teacher_config.hidden_size:
            return student
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # the same projections on every rank and every run
            projections = HiddenStateProjection(
                student_config.hidden_size, teacher_config.hidden_size, projected_layers
            )
        logger.info(
            f"Student width {student_config.hidden_size} differs from the teacher's {teacher_config.hidden_size}: "
            f"training linear projections for hidden states {sorted(set(projected_layers))} with the student."
        )
        return DistillWrapper(student, projections)

    def _with_teacher_outputs(self, dataset, name: str, args: DistillationTrainingArguments, tokenizer):
        """Check the teacher columns of `dataset`, building them from the teacher's cache when they are missing."""
        if not isinstance(dataset, datasets.Dataset):
            return dataset
        if len(dataset) == 0:
            raise ValueError(f"The {name} dataset is empty: give it at least one example.")
        if self._has_teacher_columns(dataset, args):
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
        present = [column for names in self._teacher_column_names.values() for column in names.values()
                   if column in dataset.column_names]
        base = dataset.remove_columns(present) if present else dataset
        for teacher_name, teacher in self.teacher_models.items():
            if self._has_teacher_columns(dataset, args, teacher_name):
                continue
            new_columns = list(self._teacher_column_names[teacher_name].values())
            cached = self._cache_teacher(teacher, base, teacher_name, args, tokenizer).select_columns(new_columns)
            dataset = datasets.concatenate_datasets([dataset, cached], axis=1)
        return dataset

    def _cache_teacher(self, teacher, dataset, teacher_name: str, args, tokenizer):
        teacher.to(args.device)
        return cache_teacher_logits(
            teacher, dataset, tokenizer=tokenizer, column=_teacher_column(args.teacher_logits_column, teacher_name),
            device=args.device, head=self.head, **args.teacher_cache_kwargs(),
        )

    def _check_teacher_columns(self, dataset, args: DistillationTrainingArguments) -> None:
        """Check the cache columns `dataset` holds, teacher by teacher."""
        for name in self._teacher_names:
            if self._has_teacher_columns(dataset, args, name):
                check_teacher_columns(dataset, self.head, _teacher_column(args.teacher_logits_column, name),
                                      self._num_classes, self._top_k if self.head.cache_layout == TOPK else None)

    def _set_signature_columns_if_needed(self):
        if self.head is None:
            return super()._set_signature_columns_if_needed()
        if self._signature_columns is None:
            # The student's forward decides which columns reach the model, not the projections wrapper's.
            signature = inspect.signature(base_model(self.student).forward)
            self._signature_columns = list(signature.parameters) + list({"label", "label_ids", *self.label_names})
        teacher_columns_used = [column for names in self._teacher_column_names.values() for column in names.values()]
        for column in (*teacher_columns_used, self.args.sample_weight_column):
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

    def _pop_batch_fields(self, inputs: dict):
        """Take the teacher columns, sample weights and labels out of `inputs` (the student must not see them).

        The teacher columns come back as `{teacher name: {field: tensor}}` for the teachers cached in the batch.
        """
        cached = {
            teacher: {key: inputs.pop(column) for key, column in names.items() if column in inputs}
            for teacher, names in self._teacher_column_names.items()
        }
        cached = {teacher: columns for teacher, columns in cached.items() if columns}
        sample_weight = inputs.pop(self.args.sample_weight_column, None)
        labels = {name: inputs.pop(name) for name in self.label_names if name in inputs}
        return cached, sample_weight, labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted distillation loss of one micro-batch; each term is recorded for the logs."""
        if self.head is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        args, head = self.args, self.head
        inputs = dict(inputs)
        cached, sample_weight, labels = self._pop_batch_fields(inputs)
        inputs = head.prepare_inputs(inputs, labels, self.student)
        mode = "train" if model.training else "eval"
        units = head.units(inputs, labels)
        if args.uses_alignment:
            student_outputs, teacher_outputs, alignment_terms = self._aligned_forward(model, inputs)
            online = {self._teacher_names[0]: teacher_outputs}
        else:
            keep = {} if self._keep_all_logits else head.forward_kwargs(units, self._student_keeps_logits)
            student_outputs = model(**inputs, **keep)
            online = {name: self._online_teacher_outputs(inputs, units, name)
                      for name in self._teacher_names if name not in cached}
            alignment_terms = {}
        student_views = head.kd_logits(student_outputs, units, inputs)
        views_by_teacher = {}
        for name in self._teacher_names:
            if name in cached:
                views_by_teacher[name] = head.cached_targets(cached[name], units, inputs)
            else:
                views_by_teacher[name] = head.teacher_kd_logits(online[name], units, inputs)
                for view in views_by_teacher[name]:
                    check_teacher_logits_finite(view, self.teacher_models[name])
        teacher_views = self._combined_views(views_by_teacher)
        if args.online_top_k and not isinstance(teacher_views[0], TopKTarget):
            teacher_views = [TopKTarget(*sparse_target(teacher_views[0], args.sparse_target, self._top_k,
                                                       args.temperature))]

        row_weight = units.row_weights(sample_weight)
        if head.cache_layout == TOPK:  # one view of vocabulary-sized logits: one student log-softmax for both terms
            loss_kd_rows, loss_ce_rows, labelled_rows = self._vocabulary_rows(student_views[0], teacher_views[0], units)
        else:
            loss_kd_rows = torch.stack(
                [self._divergence_rows(student, teacher) for student, teacher in zip(student_views, teacher_views)]
            ).mean(0)
            loss_ce_rows, labelled_rows = self._label_rows(student_outputs, units, inputs)
        kd_weight, ce_weight = row_weight.sum(), (row_weight * labelled_rows).sum()
        kd_total, ce_total, examples_share = self._step_normalisers(mode, kd_weight, ce_weight, units)
        kd_sum = (row_weight * loss_kd_rows).sum()
        ce_sum = (row_weight * labelled_rows * loss_ce_rows).sum()
        self._record_term(mode, "loss_kd", kd_sum.detach(), kd_weight)
        self._record_term(mode, "loss_ce", ce_sum.detach(), ce_weight)
        logits_loss = args.alpha * kd_sum / kd_total + (1.0 - args.alpha) * ce_sum / ce_total
        loss = args.logits_loss_weight * logits_loss
        for name, (weight, value) in alignment_terms.items():
            self._record_term(mode, name, value.detach(), 1)
            loss = loss + weight * value * examples_share
        if mode == "eval" and self.distillation_loss != "mse":
            self._record_agreement("teacher_agreement", student_views, teacher_views, row_weight)
            if len(views_by_teacher) > 1:
                for name, views in views_by_teacher.items():
                    self._record_agreement(f"teacher_agreement_{name}", student_views, views, row_weight)
        return (loss, head.predictions(student_outputs)) if return_outputs else loss

    def _vocabulary_rows(self, student_logits: torch.Tensor, target, units: Units):
        """Distillation and label loss per row `(rows,)` of vocabulary-sized logits against a top-k target (cached)
        or the teacher's logits (online), with one student log-softmax for both when the student's temperature is
        1; and which rows are labelled."""
        args = self.args
        labelled_rows = units.labelled[units.kd].float()
        if units.label_targets is None:
            label_targets = torch.full(labelled_rows.shape, -100, dtype=torch.long, device=labelled_rows.device)
        else:
            label_targets = units.label_targets[units.kd]

        def rows(logits, targets, *teacher):
            student_log_probs = tempered_log_softmax(logits, args.student_temperature)
            if len(teacher) == 3:
                kd = sparse_divergence_from_log_probs(student_log_probs, *teacher, self.distillation_loss,
                                                      args.topk_tail, args.jsd_beta)
            else:
                kd = divergence_from_log_probs(student_log_probs, tempered_log_softmax(teacher[0], args.temperature),
                                               self.distillation_loss, args.jsd_beta)
            kd = kd * (args.temperature * args.student_temperature)
            label_log_probs = (
                student_log_probs if args.student_temperature == 1.0 else tempered_log_softmax(logits, 1.0)
            )
            labelled = targets >= 0
            ce = -label_log_probs.gather(-1, targets.clamp_min(0).long()[:, None]).squeeze(-1)
            return torch.stack([kd, torch.where(labelled, ce, torch.zeros_like(ce))], dim=-1)

        if not isinstance(target, TopKTarget) and self.distillation_loss == "kl":
            def fused(logits, targets, teacher_logits):
                kd, ce = forward_kl_and_cross_entropy_per_row(logits, teacher_logits, targets, args.temperature,
                                                              args.student_temperature)
                return torch.stack([kd, ce], dim=-1)

            both = chunked_per_row(fused, student_logits, label_targets, target,
                                   chunk_size=self._chunk_rows(student_logits))
            return both[:, 0], both[:, 1], labelled_rows
        teacher = (target.ids, target.log_probs, target.rest_probs) if isinstance(target, TopKTarget) else (target,)
        both = chunked_per_row(rows, student_logits, label_targets, *teacher,
                               chunk_size=self._chunk_rows(student_logits))
        return both[:, 0], both[:, 1], labelled_rows

    @staticmethod
    def _chunk_rows(logits: torch.Tensor) -> int:
        return max(1, LOSS_CHUNK_ELEMENTS // max(1, logits.shape[-1]))

    def _divergence_rows(self, student_logits: torch.Tensor, target) -> torch.Tensor:
        """The distillation loss of every row `(rows,)` against a dense `(rows, classes)` target."""
        args = self.args
        if self.distillation_loss == "mse":
            return mse_per_row(student_logits, target)

        def rows(logits, teacher_logits):
            return divergence_per_row(logits, teacher_logits, self.distillation_loss, args.temperature,
                                      args.student_temperature, args.jsd_beta)

        return chunked_per_row(rows, student_logits, target, chunk_size=self._chunk_rows(student_logits))

    def _label_rows(self, student_outputs, units: Units, inputs: dict):
        """`(loss per row, labelled per row)` of the label term over the `kd` rows, averaged over the views."""
        labelled_rows = units.labelled[units.kd].float()
        if units.label_targets is None or not bool(labelled_rows.any()):
            return torch.zeros_like(labelled_rows), labelled_rows
        losses = []
        for logits, targets in self.head.label_views(student_outputs, units, inputs):
            def rows(view_logits, view_targets):
                return label_loss_per_row(view_logits, view_targets)

            losses.append(chunked_per_row(rows, logits, targets, chunk_size=self._chunk_rows(logits)))
        return torch.stack(losses).mean(0), labelled_rows

    def _combined_views(self, views_by_teacher: dict[str, list]) -> list:
        """One target per view: the teacher's, or the ensemble of several (`args.teacher_ensemble`)."""
        if len(views_by_teacher) == 1:
            return next(iter(views_by_teacher.values()))
        args = self.args
        weights = args.teacher_weights or [1.0] * len(views_by_teacher)
        mode = "mean_logits" if self.distillation_loss == "mse" else args.teacher_ensemble
        return [
            ensemble_logits(list(views), weights, args.temperature, mode) for views in zip(*views_by_teacher.values())
        ]

    def _record_agreement(self, term: str, student_views, teacher_views, row_weight) -> None:
        agreement = []
        for student, teacher in zip(student_views, teacher_views):
            teacher_top = teacher.ids[:, 0] if isinstance(teacher, TopKTarget) else teacher.argmax(-1)
            agreement.append((student.argmax(-1) == teacher_top).float())
        agreed = (torch.stack(agreement).mean(0) * row_weight).sum()
        self._record_term("eval", term, agreed, row_weight.sum())

    def _step_normalisers(self, mode: str, kd_weight, ce_weight, units: Units):
        """Divisors of this micro-batch's sums, and its examples' share of the step for per-batch-mean terms.

        In training the step's loss is `sum(w * loss) / sum(w)` over every counted position of every micro-batch
        and process (`get_batch_samples` adds them up). DDP averages gradients over processes, so each process
        divides by the total over `num_processes`. In evaluation each micro-batch is its own mean.
        """
        tiny = torch.finfo(torch.float32).tiny
        if mode != "train" or self._step_totals is None:
            return kd_weight.clamp_min(tiny), ce_weight.clamp_min(tiny), 1.0
        processes = self.accelerator.num_processes
        kd_total, ce_total, examples_total = self._step_totals / processes
        examples_share = units.kd.shape[0] / examples_total.clamp_min(tiny)
        return kd_total.clamp_min(tiny), ce_total.clamp_min(tiny), examples_share

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.head is None:
            return batch_samples, num_items_in_batch
        # The counts of the whole optimizer step (all its micro-batches, all processes): see _step_normalisers.
        self._step_totals = None
        if batch_samples:
            counts = [self._batch_counts(batch) for batch in batch_samples]
            self._step_totals = self.accelerator.reduce(torch.stack(counts).sum(0).to(device), reduction="sum")
        return batch_samples, num_items_in_batch

    def _batch_counts(self, batch: dict) -> torch.Tensor:
        """`(kd weight, label weight, examples)` of one micro-batch, from its masks only."""
        labels = {name: batch[name] for name in self.label_names if name in batch}
        inputs = {name: value for name, value in batch.items() if name not in labels}
        units = self.head.units(inputs, labels)
        row_weight = units.row_weights(batch.get(self.args.sample_weight_column))
        labelled = units.labelled[units.kd].float()
        return torch.stack([row_weight.sum(), (row_weight * labelled).sum(),
                            torch.tensor(float(units.kd.shape[0]), device=row_weight.device)])

    def _aligned_forward(self, model, inputs: dict):
        """Run student and teacher with the intermediate outputs the losses need.

        Returns:
            `(student_outputs, teacher_outputs, {term name: (weight, loss)})`, each loss averaged over the paired
            layers.
        """
        args = self.args
        want_hidden = max(args.hidden_loss_weight, args.embedding_loss_weight, args.hidden_cosine_loss_weight) > 0
        want_attentions = max(args.attention_loss_weight, args.attention_relation_loss_weight) > 0
        want_values = args.value_relation_loss_weight > 0
        flags = {"output_hidden_states": want_hidden, "output_attentions": want_attentions}
        capture_student = capture_teacher = nullcontext({})
        if want_values:
            capture_student, capture_teacher = (capture_outputs(modules) for modules in self._value_modules)
        with capture_teacher as teacher_values:
            teacher_outputs = self._online_teacher_outputs(inputs, **flags)
        with capture_student as student_values:
            student_outputs = model(**inputs, **flags)

        if want_attentions:
            for who, outputs, num_layers in (
                ("student", student_outputs, self._num_student_layers),
                ("teacher", teacher_outputs, self._num_teacher_layers),
            ):
                if not outputs.attentions or len(outputs.attentions) != num_layers:
                    raise RuntimeError(
                        f"The {who} returned {len(outputs.attentions or ())} attention maps for {num_layers} layers: "
                        "its attention implementation does not return them. Load it with attn_implementation='eager'."
                    )
        mask = inputs.get("attention_mask")
        if mask is None:  # every position counts: tokens without padding, or image patches
            states = (student_outputs.hidden_states or student_outputs.attentions)[0]
            mask = torch.ones(states.shape[0], states.shape[-2] if states.dim() == 4 else states.shape[1],
                              dtype=torch.long, device=states.device)
        pairs = list(self.layer_map.items())

        def over_pairs(loss_fn, student_tensors, teacher_tensors, offset=0):
            losses = [loss_fn(student_tensors[s - offset], teacher_tensors[t - offset], mask) for s, t in pairs]
            return torch.stack(losses).mean()

        weighted = {
            "loss_hidden": (args.hidden_loss_weight, lambda: over_pairs(
                hidden_mse_loss, student_outputs.hidden_states, teacher_outputs.hidden_states)),
            "loss_embedding": (args.embedding_loss_weight, lambda: hidden_mse_loss(
                student_outputs.hidden_states[0], teacher_outputs.hidden_states[0], mask)),
            "loss_hidden_cosine": (args.hidden_cosine_loss_weight, lambda: over_pairs(
                hidden_cosine_loss, student_outputs.hidden_states, teacher_outputs.hidden_states)),
            "loss_attention": (args.attention_loss_weight, lambda: over_pairs(
                attention_mse_loss, student_outputs.attentions, teacher_outputs.attentions, offset=1)),
            "loss_attention_relation": (args.attention_relation_loss_weight, lambda: over_pairs(
                attention_relation_loss, student_outputs.attentions, teacher_outputs.attentions, offset=1)),
            "loss_value_relation": (args.value_relation_loss_weight, lambda: over_pairs(
                lambda s, t, m: value_relation_loss(s, t, m, self._value_relation_heads),
                student_values, teacher_values)),
        }
        terms = {name: (weight, compute()) for name, (weight, compute) in weighted.items() if weight > 0}
        return student_outputs, teacher_outputs, terms

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

    def _record_term(self, mode: str, name: str, value_sum: torch.Tensor, count: int) -> None:
        self._term_sums[mode][name] = self._term_sums[mode][name] + value_sum
        self._term_counts[mode][name] += count

    def _pop_term_averages(self, mode: str) -> dict[str, float]:
        """Averages of the recorded terms over all processes since the last call, then reset."""
        names = sorted(self._term_sums[mode])
        if not names:
            return {}
        device = self.args.device
        sums = torch.stack([torch.as_tensor(self._term_sums[mode][name], device=device).float() for name in names])
        counts = torch.stack([torch.as_tensor(self._term_counts[mode][name], device=device).float() for name in names])
        sums = self.accelerator.reduce(sums, reduction="sum")
        counts = self.accelerator.reduce(counts, reduction="sum")
        self._term_sums[mode].clear()
        self._term_counts[mode].clear()
        # A term of weight 0 (no labelled example since the last log) has no average.
        return {
            name: round(total / count, 6)
            for name, total, count in zip(names, sums.tolist(), counts.tolist())
            if count > 0
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.head is not None and "loss" in logs:
            logs.update(self._pop_term_averages("train"))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if self.head is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        self._term_sums["eval"].clear()
        self._term_counts["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._pop_term_averages("eval").items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    # ---- the model card ----

    def distillation_settings(self) -> dict:
        """What the student was distilled with: head, temperatures, alpha, losses and weights, layer map, student
        initialisation and the teacher's cache settings (the card's `distillation` metadata)."""
        args = self.args
        settings = {
            "head": self.head.name,
            "temperature": args.temperature,
            "student_temperature": args.student_temperature,
            "alpha": args.alpha,
            "distillation_loss": self.distillation_loss,
        }
        if self.distillation_loss == "jsd":
            settings["jsd_beta"] = args.jsd_beta
        if len(self._teacher_names) > 1:
            settings["teachers"] = self._teacher_names
            settings["teacher_weights"] = args.teacher_weights or [1.0] * len(self._teacher_names)
            settings["teacher_ensemble"] = args.teacher_ensemble
        settings["loss_weights"] = {
            name: getattr(args, name) for name in ("logits_loss_weight", *ALIGNMENT_WEIGHTS) if getattr(args, name)
        }
        if self.layer_map:
            settings["layer_map"] = self.layer_map
        settings.update(num_train_epochs=args.num_train_epochs, learning_rate=args.learning_rate)
        init_layers = getattr(self._student_config, "hf_distill_init_layers", None)
        if init_layers is not None:
            settings["student_init"] = {"from_teacher_layers": init_layers}
        cached = self._has_teacher_columns(self.train_dataset, args)
        settings["teacher_outputs"] = {"cached": cached, "layout": self.head.cache_layout}
        if cached:
            settings["teacher_outputs"]["dtype"] = args.teacher_cache_dtype
            if args.teacher_cache_bf16:
                settings["teacher_outputs"]["teacher_autocast"] = "bfloat16"
        if self.head.cache_layout == TOPK and (cached or args.online_top_k):
            settings["teacher_outputs"].update(top_k=self._top_k, topk_tail=args.topk_tail)
            if args.sparse_target != "top_k":
                settings["teacher_outputs"]["sparse_target"] = args.sparse_target
        return settings

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
        teacher = teacher_model_name or [
            getattr(model_config(model), "_name_or_path", None) or f"teacher {name}".strip()
            for name, model in self.teacher_models.items()
        ] or "an unnamed teacher"
        if isinstance(teacher, list) and len(teacher) == 1:
            teacher = teacher[0]
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        config = self._student_config
        id2label = {int(key): value for key, value in (getattr(config, "id2label", None) or {}).items()}
        names_labels = self.head.pipeline_tag in ("text-classification", "token-classification", "image-classification")
        card = build_model_card(
            student_id_or_path_base=finetuned_from or getattr(config, "_name_or_path", None),
            teacher_model_id=teacher,
            task=dataset_args if isinstance(dataset_args, str) else None,
            dataset_id=(dataset[0] if isinstance(dataset, list) else dataset) or "local data",
            dataset_config=dataset_args if isinstance(dataset_args, str) else None,
            model_name=model_name or self.args.hub_model_id or os.path.basename(os.path.abspath(output_dir)),
            eval_results=eval_results or {},
            distillation_settings={**self.distillation_settings(), **(extra_settings or {})},
            report_markdown=report_markdown,
            chart_path=chart_path,
            license=license or "apache-2.0",
            extra_tags=tags,
            dataset_split=dataset_split,
            pipeline_tag=self.head.pipeline_tag,
            id2label=id2label if names_labels and named_labels(config) else None,
            example_inputs=example_inputs,
        )
        os.makedirs(output_dir, exist_ok=True)
        card.save(os.path.join(output_dir, "README.md"))
        return card

    # ---- saving: the student alone is exported; checkpoints add the projections ----

    @contextmanager
    def _model_swapped(self, module: nn.Module):
        """Let a Trainer method see `module` as `self.model` (the student inside the wrapper)."""
        model = self.model
        self.model = module
        try:
            yield
        finally:
            self.model = model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        wrapper = self.accelerator.unwrap_model(self.model)
        if not isinstance(wrapper, DistillWrapper):
            return super()._save(output_dir, state_dict)
        if state_dict is not None:
            state_dict = {
                name.removeprefix("student."): value for name, value in state_dict.items()
                if name.startswith("student.")
            }
        with self._model_swapped(wrapper.student):
            super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        # The projections go first: Trainer rotates old checkpoints out at the end of its save, and writes
        # trainer_state.json (what makes a checkpoint complete, see last_complete_checkpoint) just before.
        wrapper = self.accelerator.unwrap_model(self.model)
        if isinstance(wrapper, DistillWrapper) and self.args.should_save:
            checkpoint_dir = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(checkpoint_dir, exist_ok=True)
            state = {name: value.detach().contiguous() for name, value in wrapper.projections.state_dict().items()}
            save_file(state, os.path.join(checkpoint_dir, PROJECTIONS_FILE))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        if resume_from_checkpoint is True:  # Trainer would take the newest folder, even one a kill left half-written
            needs_projections = isinstance(self.accelerator.unwrap_model(self.model), DistillWrapper)
            resume_from_checkpoint = last_complete_checkpoint(
                self.args.output_dir, (PROJECTIONS_FILE,) if needs_projections else ()
            ) or resume_from_checkpoint
        return super().train(resume_from_checkpoint, trial, **kwargs)

    def _load_projections(self, checkpoint_dir: str, wrapper: DistillWrapper) -> None:
        path = os.path.join(checkpoint_dir, PROJECTIONS_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"The checkpoint {checkpoint_dir} has no {PROJECTIONS_FILE}: its save was interrupted, or it was not "
                "written by a DistillationTrainer with the same width projections, so resuming would restart them "
                "from scratch. Resume from an earlier, complete checkpoint of this run (resume_from_checkpoint=True "
                "finds it), or start a new run."
            )
        wrapper.projections.load_state_dict(load_file(path, device=str(next(wrapper.parameters()).device)))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapper = model if model is not None else self.model
        if not isinstance(wrapper, DistillWrapper):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        super()._load_from_checkpoint(resume_from_checkpoint, wrapper.student)
        self._load_projections(resume_from_checkpoint, wrapper)

    def _load_best_model(self) -> None:
        wrapper = self.model
        if not isinstance(wrapper, DistillWrapper):
            return super()._load_best_model()
        with self._model_swapped(wrapper.student):
            super()._load_best_model()
        self._load_projections(self.state.best_model_checkpoint, wrapper)
