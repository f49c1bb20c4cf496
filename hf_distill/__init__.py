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
from .heads import DistillationHead, head_for
from .losses import (
    divergence_per_row,
    ensemble_logits,
    kl_divergence_loss,
    label_loss,
    logit_mse_loss,
    sparse_divergence_per_row,
)
from .student_init import init_student_from_teacher, select_teacher_layers
from .trainer import DistillationTrainer
from .wrapper import DistillWrapper

__version__ = "0.1.0"

__all__ = [
    "DistillWrapper",
    "DistillationHead",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "HiddenStateProjection",
    "attention_mse_loss",
    "attention_relation_loss",
    "augment_dataset",
    "cache_teacher_logits",
    "divergence_per_row",
    "ensemble_logits",
    "head_for",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "init_student_from_teacher",
    "kl_divergence_loss",
    "label_loss",
    "logit_mse_loss",
    "resolve_layer_map",
    "select_teacher_layers",
    "sparse_divergence_per_row",
    "value_relation_loss",
]
