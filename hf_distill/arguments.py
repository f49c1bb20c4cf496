"""`DistillationTrainingArguments`: `TrainingArguments` plus the knobs of knowledge distillation."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

DISTILLATION_LOSSES = ("auto", "kl", "mse")
CACHE_DTYPES = ("float16", "float32")


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    r"""
    Arguments for [`DistillationTrainer`]. Every [`~transformers.TrainingArguments`] field is accepted as well.

    The training loss is `alpha * loss_kd + (1 - alpha) * loss_ce`, plus the weighted alignment terms.

    Parameters that control the distillation loss:
        temperature (`float`, defaults to `2.0`):
            Temperature T that softens the teacher's distribution. Must be > 0.
        student_temperature (`float` or `None`, defaults to `None`):
            Temperature T_s applied to the student's logits; `None` uses `temperature`.
        alpha (`float`, defaults to `0.5`):
            Weight of the distillation term in [0, 1]; the label loss gets `1 - alpha`.
        distillation_loss (`str`, defaults to `"auto"`):
            `"kl"`: KL(teacher || student) on softened distributions, times `T * T_s` (T² when equal);
            `"mse"`: mean squared error between raw logits; `"auto"`: `"mse"` for regression heads
            (`num_labels == 1`), `"kl"` otherwise.

    Parameters that control the teacher's logits:
        teacher_logits_column (`str`, defaults to `"teacher_logits"`):
            Dataset column holding the teacher's logits, shape `(num_labels,)` per example.
        sample_weight_column (`str`, defaults to `"sample_weight"`):
            Optional dataset column of per-example loss weights; ignored when absent.
        use_teacher_cache (`bool`, defaults to `True`):
            When a `teacher_model` is given and a dataset lacks `teacher_logits_column`, compute the teacher's
            logits once and store them with the dataset instead of running the teacher every step.
        teacher_cache_dir (`str` or `None`, defaults to `None`):
            Folder of the logit caches. `None` uses `$HF_DATASETS_CACHE/hf_distill`.
        teacher_cache_dtype (`str`, defaults to `"float16"`):
            Storage dtype of cached logits: `"float16"` or `"float32"`.
        teacher_cache_batch_size (`int`, defaults to `256`):
            Batch size of the teacher pass that builds the cache.
        overwrite_teacher_cache (`bool`, defaults to `False`):
            Rebuild a cache that another teacher, tokenizer or dtype produced instead of refusing it.
    """

    # Parameters that control the distillation loss
    temperature: float = field(
        default=2.0, metadata={"help": "Temperature that softens the teacher's distribution (> 0)."}
    )
    student_temperature: float | None = field(
        default=None, metadata={"help": "Temperature of the student's logits; defaults to `temperature`."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the distillation term in [0, 1]; the label loss gets 1 - alpha."},
    )
    distillation_loss: str = field(
        default="auto",
        metadata={
            "help": "Distillation loss on logits: 'kl' (T²-scaled KL), 'mse', or 'auto' (mse for regression heads).",
            "choices": list(DISTILLATION_LOSSES),
        },
    )

    # Parameters that control the teacher's logits
    teacher_logits_column: str = field(
        default="teacher_logits", metadata={"help": "Dataset column holding the teacher's logits."}
    )
    sample_weight_column: str = field(
        default="sample_weight", metadata={"help": "Optional dataset column of per-example loss weights."}
    )
    use_teacher_cache: bool = field(
        default=True,
        metadata={"help": "Compute the teacher's logits once and store them with the dataset."},
    )
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder of the teacher-logit caches (default: $HF_DATASETS_CACHE/hf_distill)."}
    )
    teacher_cache_dtype: str = field(
        default="float16",
        metadata={"help": "Storage dtype of cached teacher logits.", "choices": list(CACHE_DTYPES)},
    )
    teacher_cache_batch_size: int = field(
        default=256, metadata={"help": "Batch size of the teacher pass that builds the cache."}
    )
    overwrite_teacher_cache: bool = field(
        default=False,
        metadata={"help": "Rebuild a teacher-logit cache that other inputs produced instead of refusing it."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.student_temperature is None:
            self.student_temperature = self.temperature
        _check(self.temperature > 0, "temperature", self.temperature, "> 0")
        _check(self.student_temperature > 0, "student_temperature", self.student_temperature, "> 0")
        _check(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "in [0, 1]")
        _check(self.distillation_loss in DISTILLATION_LOSSES, "distillation_loss", self.distillation_loss,
               f"one of {DISTILLATION_LOSSES}")
        _check(self.teacher_cache_dtype in CACHE_DTYPES, "teacher_cache_dtype", self.teacher_cache_dtype,
               f"one of {CACHE_DTYPES}")
        _check(self.teacher_cache_batch_size >= 1, "teacher_cache_batch_size", self.teacher_cache_batch_size, ">= 1")


def _check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"DistillationTrainingArguments.{name}={value!r} is invalid: it must be {allowed}.")
