"""`DistillationTrainer`: a drop-in `transformers.Trainer` whose loss distils a teacher into the student."""

import inspect
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import datasets
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer
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
from .arguments import DistillationTrainingArguments
from .cache import MODEL_INPUT_COLUMNS, cache_teacher_logits, check_teacher_logits
from .checkpoints import last_complete_checkpoint
from .hooks import capture_outputs, value_projections
from .losses import kl_divergence_loss, label_loss, labelled_mask, logit_mse_loss
from .teacher import check_teacher_logits_finite, freeze_teacher, place_teacher, use_eager_attention
from .validation import check_distillation_inputs
from .wrapper import PROJECTIONS_FILE, DistillWrapper

logger = logging.get_logger(__name__)


def check_label_spaces(student: nn.Module, teacher: nn.Module) -> None:
    """Raise `ValueError` when teacher and student disagree on labels or vocabulary."""
    student_config, teacher_config = student.config, teacher.config
    if student_config.num_labels != teacher_config.num_labels:
        raise ValueError(
            f"The teacher has num_labels={teacher_config.num_labels} but the student has "
            f"num_labels={student_config.num_labels}. Distillation needs one label space: build the student with "
            f"num_labels={teacher_config.num_labels} (and the teacher's id2label)."
        )
    student_labels, teacher_labels = _named_labels(student_config), _named_labels(teacher_config)
    if student_labels and teacher_labels and student_labels != teacher_labels:
        raise ValueError(
            f"The teacher's id2label {teacher_labels} differs from the student's {student_labels}: the logits would "
            "be matched class by class in the wrong order. Build the student with the teacher's id2label."
        )
    student_vocab = getattr(student_config, "vocab_size", None)
    teacher_vocab = getattr(teacher_config, "vocab_size", None)
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        raise ValueError(
            f"The teacher's vocabulary has {teacher_vocab} tokens but the student's has {student_vocab}: both read the "
            "same input_ids, so they must share a tokenizer. Use a student built with the teacher's tokenizer."
        )


def _named_labels(config) -> dict[int, str] | None:
    """`id2label` with int keys, or None when it holds only the generic LABEL_i names."""
    id2label = {int(key): value for key, value in (config.id2label or {}).items()}
    if all(value == f"LABEL_{key}" for key, value in id2label.items()):
        return None
    return id2label


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that trains the student on the teacher's outputs as well as the labels.

    The loss is `logits_loss_weight * (alpha * loss_kd + (1 - alpha) * loss_ce) + sum_i weight_i * loss_i` over the
    intermediate-layer alignment losses that have a weight > 0 (see [`DistillationTrainingArguments`]).

    The teacher's logits come from the dataset column `args.teacher_logits_column` when it is present (the fast
    path: a distillation step then costs a plain training step). Given a `teacher_model` and a dataset without that
    column, the trainer builds the column once with [`cache_teacher_logits`] (`args.use_teacher_cache=True`, the
    default) or runs the frozen teacher on every batch (`use_teacher_cache=False`, or any alignment loss on).

    When an alignment loss compares hidden states of different widths, `self.model` is a [`DistillWrapper`] of the
    student and its learned projections; `self.student` is always the student, and `save_model` exports it alone.

    Args:
        model: the student (a `PreTrainedModel` or a PEFT model).
        args: [`DistillationTrainingArguments`].
        teacher_model: optional teacher sharing the student's label space and tokenizer. It is frozen (a PEFT
            teacher is merged first, in place: the `PeftModel` passed in loses its adapter), placed by accelerate,
            never wrapped in DDP and never saved.
        Every other argument is [`~transformers.Trainer`]'s.
    """

    # Losses are per-micro-batch means: Trainer must divide them by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model=None,
        args: DistillationTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_model: nn.Module | None = None,
        **kwargs,
    ):
        if args is None:
            args = DistillationTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(
                f"DistillationTrainer needs DistillationTrainingArguments, got {type(args).__name__}: build the "
                "arguments with hf_distill.DistillationTrainingArguments (it accepts every TrainingArguments field)."
            )
        if args.n_gpu > 1:
            raise ValueError(
                f"{args.n_gpu} GPUs are visible to one process, which would run the student under DataParallel; "
                "DistillationTrainer supports distributed data parallel only. Launch with `accelerate launch` or "
                "`torchrun`, or restrict CUDA_VISIBLE_DEVICES to one GPU."
            )
        if model is not None:
            check_distillation_inputs(model, teacher_model, args, train_dataset, eval_dataset, processing_class)
        if model is not None and teacher_model is not None:
            check_label_spaces(model, teacher_model)
        if teacher_model is not None:
            teacher_model = freeze_teacher(teacher_model)
        self.teacher_model = teacher_model
        self._teacher_prepared = False
        self.layer_map: dict[int, int] = {}
        self._value_relation_heads = self._value_modules = None
        if model is not None:
            # Everything is checked, and caches built, before Trainer.__init__ creates output_dir: bad input writes
            # nothing.
            if args.uses_alignment:
                model = self._setup_alignment(model, args)
            student_config = model.config
            train_dataset = self._with_teacher_logits(train_dataset, "train", args, student_config, processing_class)
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    name: self._with_teacher_logits(dataset, f"eval '{name}'", args, student_config, processing_class)
                    for name, dataset in eval_dataset.items()
                }
            else:
                eval_dataset = self._with_teacher_logits(eval_dataset, "eval", args, student_config, processing_class)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The student's forward ignores num_items_in_batch; skipping it avoids a per-step gather.
        self.model_accepts_loss_kwargs = False
        if isinstance(self.model, DistillWrapper) and args.label_names is None:
            # Trainer read the label names off the wrapper's class, which declares none.
            student_class = _base_model(self.model.student).__class__
            self.label_names = find_labels(student_class)
        # Read once: unwrap_model walks every module, which costs ~1% of a step if done per batch.
        self._num_labels = num_labels = self._student_config.num_labels
        self._num_student_layers = self._student_config.num_hidden_layers
        self.distillation_loss = args.distillation_loss
        if self.distillation_loss == "auto":
            self.distillation_loss = "mse" if num_labels == 1 else "kl"
        self._term_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._term_counts = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._step_loss_weights = None

    @property
    def student(self) -> nn.Module:
        """The student being trained, without the projections wrapper (a `PreTrainedModel` or a PEFT model)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.student if isinstance(model, DistillWrapper) else model

    @property
    def _student_config(self):
        return self.student.config

    # ---- set-up ----

    def _setup_alignment(self, student: nn.Module, args: DistillationTrainingArguments) -> nn.Module:
        """Validate the alignment settings against both models; return the student, wrapped when it needs projections."""
        if self.teacher_model is None:
            raise ValueError(
                "Intermediate-layer losses (hidden/embedding/attention/relation weights > 0) compare the student with "
                "the teacher's layers, so they need the teacher online: pass teacher_model=... to DistillationTrainer, "
                "or set those weights to 0 to distil from cached logits only."
            )
        student_config, teacher_config = student.config, self.teacher_model.config
        self.layer_map = resolve_layer_map(
            args.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers
        )
        logger.info(f"Aligning student layers with teacher layers {self.layer_map} (1-based).")
        if args.attention_loss_weight > 0 or args.attention_relation_loss_weight > 0:
            use_eager_attention(_base_model(student), "student")
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

    def _with_teacher_logits(self, dataset, name: str, args: DistillationTrainingArguments, student_config, tokenizer):
        """Check the teacher column of `dataset`, building it from the teacher's cache when it is missing."""
        if not isinstance(dataset, datasets.Dataset):
            return dataset
        if len(dataset) == 0:
            raise ValueError(f"The {name} dataset is empty: give it at least one example.")
        column = args.teacher_logits_column
        num_labels = student_config.num_labels
        if column in dataset.column_names:
            check_teacher_logits(dataset.select_columns([column]), column, num_labels)
            return dataset
        if self.teacher_model is None:
            raise ValueError(
                f"The {name} dataset has no '{column}' column and no teacher_model was given. Pass "
                "teacher_model=... to DistillationTrainer, or add the column with "
                "hf_distill.cache_teacher_logits(teacher, dataset)."
            )
        if not args.use_teacher_cache or args.uses_alignment:  # the teacher runs on every batch anyway
            return dataset
        self.teacher_model.to(args.device)
        return cache_teacher_logits(
            self.teacher_model,
            dataset,
            tokenizer=tokenizer,
            column=column,
            cache_dir=args.teacher_cache_dir,
            dtype=args.teacher_cache_dtype,
            batch_size=args.teacher_cache_batch_size,
            overwrite=args.overwrite_teacher_cache,
            device=args.device,
            show_progress=not args.disable_tqdm,
        )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            # The student's forward decides which columns reach the model, not the projections wrapper's.
            signature = inspect.signature(_base_model(self.student).forward)
            self._signature_columns = list(signature.parameters) + list({"label", "label_ids", *self.label_names})
        for column in (self.args.teacher_logits_column, self.args.sample_weight_column):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _prepared_teacher(self) -> nn.Module:
        """The teacher placed by accelerate on first use (lazily, so evaluate() before train() keeps autocast)."""
        if not self._teacher_prepared:
            self.teacher_model = place_teacher(self.teacher_model, self.accelerator)
            self._teacher_prepared = True
        return self.teacher_model

    # ---- the loss ----

    def _online_teacher_outputs(self, inputs: dict, **output_flags):
        """Teacher outputs from a no-grad forward on the student's inputs (`logits` `(batch, num_labels)`)."""
        if self.teacher_model is None:
            raise ValueError(
                f"The batch has no '{self.args.teacher_logits_column}' and no teacher_model was given: pass "
                "teacher_model=... or add the column with hf_distill.cache_teacher_logits."
            )
        teacher = self._prepared_teacher()
        teacher_inputs = {name: inputs[name] for name in MODEL_INPUT_COLUMNS if name in inputs}
        with torch.no_grad():
            outputs = teacher(**teacher_inputs, **output_flags)
        check_teacher_logits_finite(outputs.logits, teacher)
        return outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted distillation loss of one micro-batch; each term is recorded for the logs."""
        args = self.args
        cached_teacher_logits = inputs.pop(args.teacher_logits_column, None)
        sample_weight = inputs.pop(args.sample_weight_column, None)
        labels = [inputs.pop(name, None) for name in self.label_names]
        labels = labels[0] if len(labels) == 1 else None
        mode = "train" if model.training else "eval"

        if args.uses_alignment:
            student_logits, teacher_logits, alignment_terms = self._aligned_forward(model, inputs)
        else:
            student_logits = model(**inputs).logits
            teacher_logits = cached_teacher_logits
            if teacher_logits is None:
                teacher_logits = self._online_teacher_outputs(inputs).logits
            alignment_terms = {}

        if self.distillation_loss == "kl":
            loss_kd = kl_divergence_loss(
                student_logits, teacher_logits, args.temperature, args.student_temperature, sample_weight
            )
        else:
            loss_kd = logit_mse_loss(student_logits, teacher_logits, sample_weight)
        kd_weight, ce_weight = self._micro_batch_loss_weights(sample_weight, labels, student_logits)
        kd_share, ce_share = self._shares_of_the_step(mode, kd_weight, ce_weight)
        self._record_term(mode, "loss_kd", loss_kd.detach() * kd_weight, kd_weight)
        logits_loss = args.alpha * loss_kd * kd_share
        if labels is not None:
            loss_ce = label_loss(student_logits, labels, sample_weight)
            self._record_term(mode, "loss_ce", loss_ce.detach() * ce_weight, ce_weight)
            logits_loss = logits_loss + (1.0 - args.alpha) * loss_ce * ce_share
        loss = args.logits_loss_weight * logits_loss
        for name, (weight, value) in alignment_terms.items():
            self._record_term(mode, name, value.detach(), 1)
            loss = loss + weight * value
        if mode == "eval" and self.distillation_loss == "kl":
            agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
            self._record_term(mode, "teacher_agreement", agreement, student_logits.shape[0])
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # The loss weights of the whole optimizer step (all its micro-batches, all processes): see _shares_of_the_step.
        self._step_loss_weights = None
        if batch_samples:
            weights = [
                torch.stack(self._micro_batch_loss_weights(
                    batch.get(self.args.sample_weight_column),
                    batch.get(self.label_names[0]) if len(self.label_names) == 1 else None,
                    batch[self.args.teacher_logits_column] if self.args.teacher_logits_column in batch
                    else next(iter(batch.values())),
                ))
                for batch in batch_samples
            ]
            self._step_loss_weights = self.accelerator.reduce(torch.stack(weights).sum(0).to(device), reduction="sum")
        return batch_samples, num_items_in_batch

    def _micro_batch_loss_weights(self, sample_weight, labels, reference: torch.Tensor):
        """Total weight of the distillation term and of the label term in one micro-batch of `len(reference)`."""
        weight = torch.ones(reference.shape[0], device=reference.device)
        if sample_weight is not None:
            weight = sample_weight.float()
        if labels is None:
            return weight.sum(), torch.zeros((), device=weight.device)
        labelled = labelled_mask(labels, self._num_labels).to(weight.dtype)
        return weight.sum(), (weight * labelled).sum()

    def _shares_of_the_step(self, mode: str, kd_weight, ce_weight):
        """Factors turning this micro-batch's weighted means into its shares of the optimizer step's weighted means.

        The step's loss is `sum(w * loss) / sum(w)` over every example of every micro-batch and process. Trainer
        divides each micro-batch loss by the accumulation steps and DDP averages gradients over processes, so a
        micro-batch of weight `w_m` must contribute `mean_m * w_m / W * steps * processes`. Without this, a
        micro-batch with fewer labelled examples (transfer data, label -1) or lighter sample weights would count as
        much as any other, and 2 processes x 4 would not train like 1 process x 8.
        """
        if mode != "train" or self._step_loss_weights is None:
            return 1.0, 1.0
        tiny = torch.finfo(torch.float32).tiny
        scale = self.current_gradient_accumulation_steps * self.accelerator.num_processes
        kd_total, ce_total = self._step_loss_weights
        return kd_weight / kd_total.clamp_min(tiny) * scale, ce_weight / ce_total.clamp_min(tiny) * scale

    def _aligned_forward(self, model, inputs: dict):
        """Run student and teacher with the intermediate outputs the losses need.

        Returns:
            `(student_logits, teacher_logits, {term name: (weight, loss)})`, each loss averaged over the paired layers.
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
        if mask is None:
            mask = torch.ones(inputs["input_ids"].shape, dtype=torch.long, device=student_outputs.logits.device)
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
        return student_outputs.logits, teacher_outputs.logits, terms

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluate through `compute_loss`, so `eval_loss` is the distillation loss with or without labels."""
        inputs = self._prepare_inputs(inputs)
        labels = [inputs.get(name) for name in self.label_names]
        labels = None if not labels or any(label is None for label in labels) else labels
        if labels is not None:
            labels = labels[0].detach() if len(labels) == 1 else tuple(label.detach() for label in labels)
        has_teacher_signal = self.args.teacher_logits_column in inputs or self.teacher_model is not None
        with torch.no_grad():
            if has_teacher_signal:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach()
            else:
                student_inputs = {
                    key: value
                    for key, value in inputs.items()
                    if key not in (*self.label_names, self.args.sample_weight_column)
                }
                loss, outputs = None, model(**student_inputs)
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs["logits"].detach(), labels

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
        if "loss" in logs:
            logs.update(self._pop_term_averages("train"))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._term_sums["eval"].clear()
        self._term_counts["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._pop_term_averages("eval").items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

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
            )
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
