"""hf_distill: knowledge distillation for Hugging Face Transformers."""

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
from .augment import augment_dataset
from .cache import cache_teacher_logits
from .losses import kl_divergence_loss, label_loss, logit_mse_loss
from .student_init import init_student_from_teacher, select_teacher_layers
from .trainer import DistillationTrainer
from .wrapper import DistillWrapper

__version__ = "0.1.0"

__all__ = [
    "DistillWrapper",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "HiddenStateProjection",
    "attention_mse_loss",
    "attention_relation_loss",
    "augment_dataset",
    "cache_teacher_logits",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "init_student_from_teacher",
    "kl_divergence_loss",
    "label_loss",
    "logit_mse_loss",
    "resolve_layer_map",
    "select_teacher_layers",
    "value_relation_loss",
]
