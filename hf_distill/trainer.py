"""`DistillationTrainer`: a drop-in `transformers.Trainer` whose loss distils a teacher into the student."""

from collections import defaultdict

import datasets
import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .arguments import DistillationTrainingArguments
from .cache import MODEL_INPUT_COLUMNS, cache_teacher_logits, check_teacher_logits
from .losses import kl_divergence_loss, label_loss, logit_mse_loss

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


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that trains the student on `alpha * loss_kd + (1 - alpha) * loss_ce`.

    The teacher's logits come from the dataset column `args.teacher_logits_column` when it is present (the fast
    path: a distillation step then costs a plain training step). Given a `teacher_model` and a dataset without that
    column, the trainer builds the column once with [`cache_teacher_logits`] (`args.use_teacher_cache=True`, the
    default) or runs the frozen teacher on every batch (`use_teacher_cache=False`).

    Args:
        model: the student.
        args: [`DistillationTrainingArguments`].
        teacher_model: optional frozen teacher sharing the student's label space and tokenizer.
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
        if model is not None and teacher_model is not None:
            check_label_spaces(model, teacher_model)
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
        self.teacher_model = teacher_model
        self._teacher_prepared = False
        if model is not None:
            # Checked and cached before Trainer.__init__, which creates output_dir: bad input writes nothing.
            train_dataset = self._with_teacher_logits(train_dataset, "train", args, model.config, processing_class)
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    name: self._with_teacher_logits(
                        dataset, f"eval '{name}'", args, model.config, processing_class
                    )
                    for name, dataset in eval_dataset.items()
                }
            else:
                eval_dataset = self._with_teacher_logits(eval_dataset, "eval", args, model.config, processing_class)

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
        num_labels = self._student_config.num_labels
        self.distillation_loss = args.distillation_loss
        if self.distillation_loss == "auto":
            self.distillation_loss = "mse" if num_labels == 1 else "kl"
        self._term_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._term_counts = {"train": defaultdict(int), "eval": defaultdict(int)}

    @property
    def _student_config(self):
        return self.accelerator.unwrap_model(self.model).config

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
        if not args.use_teacher_cache:
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
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (self.args.teacher_logits_column, self.args.sample_weight_column):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _prepared_teacher(self) -> nn.Module:
        """The teacher placed by accelerate on first use, outside the optimizer and never wrapped in DDP."""
        if not self._teacher_prepared:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise NotImplementedError(
                    "Running the teacher online under DeepSpeed or FSDP is not supported yet: cache the teacher's "
                    "logits (use_teacher_cache=True) or train without DeepSpeed/FSDP."
                )
            self.teacher_model = self.accelerator.prepare_model(self.teacher_model, evaluation_mode=True)
            # prepare_model registers the teacher; evaluation_loop prepares the student only while none is registered.
            self.accelerator._models.remove(self.teacher_model)
            self._teacher_prepared = True
        return self.teacher_model

    def _online_teacher_logits(self, inputs: dict) -> torch.Tensor:
        """Teacher logits `(batch, num_labels)` from a no-grad forward on the student's inputs."""
        if self.teacher_model is None:
            raise ValueError(
                f"The batch has no '{self.args.teacher_logits_column}' and no teacher_model was given: pass "
                "teacher_model=... or add the column with hf_distill.cache_teacher_logits."
            )
        teacher = self._prepared_teacher()
        teacher_inputs = {name: inputs[name] for name in MODEL_INPUT_COLUMNS if name in inputs}
        with torch.no_grad():
            return teacher(**teacher_inputs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`alpha * loss_kd + (1 - alpha) * loss_ce` for one micro-batch; each term is recorded for the logs."""
        teacher_logits = inputs.pop(self.args.teacher_logits_column, None)
        sample_weight = inputs.pop(self.args.sample_weight_column, None)
        labels = [inputs.pop(name, None) for name in self.label_names]
        labels = labels[0] if len(labels) == 1 else None
        student_logits = model(**inputs).logits
        if teacher_logits is None:
            teacher_logits = self._online_teacher_logits(inputs)

        args = self.args
        if self.distillation_loss == "kl":
            loss_kd = kl_divergence_loss(
                student_logits, teacher_logits, args.temperature, args.student_temperature, sample_weight
            )
        else:
            loss_kd = logit_mse_loss(student_logits, teacher_logits, sample_weight)
        mode = "train" if model.training else "eval"
        terms = {"loss_kd": loss_kd}
        loss = args.alpha * loss_kd
        if labels is not None:
            loss_ce = label_loss(student_logits, labels, sample_weight)
            terms["loss_ce"] = loss_ce
            loss = loss + (1.0 - args.alpha) * loss_ce
        for name, value in terms.items():
            self._record_term(mode, name, value.detach(), 1)
        if mode == "eval" and self.distillation_loss == "kl":
            agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
            self._record_term(mode, "teacher_agreement", agreement, student_logits.shape[0])
        return (loss, {"logits": student_logits}) if return_outputs else loss

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
        counts = torch.tensor([self._term_counts[mode][name] for name in names], device=device, dtype=torch.float)
        sums = self.accelerator.reduce(sums, reduction="sum")
        counts = self.accelerator.reduce(counts, reduction="sum")
        self._term_sums[mode].clear()
        self._term_counts[mode].clear()
        return {name: round(value, 6) for name, value in zip(names, (sums / counts).tolist())}

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
