"""hf_distill: knowledge distillation for Hugging Face Transformers."""

from .arguments import DistillationTrainingArguments
from .cache import cache_teacher_logits
from .losses import kl_divergence_loss, label_loss, logit_mse_loss
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "cache_teacher_logits",
    "kl_divergence_loss",
    "label_loss",
    "logit_mse_loss",
]
