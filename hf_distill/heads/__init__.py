"""Heads: for one family of models, where the teacher's distribution lives and which positions count.

The trainer and the cache ask a head; neither names a task. A head answers, for one batch:
- `units(inputs, labels)`: the positions that count, `(batch,)` for sequence-level heads or `(batch, seq_len)` for
  token-level ones: `kd` (the distillation term) and `labelled` (the label term, a subset of `kd`);
- `kd_logits(outputs, units, inputs)`: the tensors that carry a distribution, one or more *views*, each
  `(rows, classes)` over the `kd` units in row-major order (two views, start and end, for extractive QA);
- `teacher_kd_logits(teacher_outputs, units, inputs)`: the online teacher's views (`kd_logits` unless the student's
  distribution sits elsewhere, as DeiT's distillation token);
- `label_views(outputs, labels, units, inputs)`: `(logits, targets)` pairs over the same rows for the label term;
- `cached_targets(columns, units)`: the teacher's views read back from the cache columns;
- `cache_values(teacher_outputs, inputs)`: what the cache stores per example.

`head_for(model)` picks the head from the model's class, first match wins; `DistillationTrainingArguments.
distillation_head` overrides it. Heads import only torch and transformers.
"""

from torch import nn

from .base import DENSE, PER_TOKEN, TOPK, DistillationHead, TopKTarget, Units
from .causal_lm import CausalLMHead
from .image import DeiTWithTeacherHead, ImageClassificationHead
from .seq2seq import Seq2SeqLMHead
from .span import QuestionAnsweringHead
from .token import TokenClassificationHead

#: First match wins: the more specific classes first.
HEADS: tuple[type[DistillationHead], ...] = (
    DeiTWithTeacherHead,
    ImageClassificationHead,
    QuestionAnsweringHead,
    TokenClassificationHead,
    Seq2SeqLMHead,
    CausalLMHead,
    DistillationHead,
)
HEADS_BY_NAME = {head.name: head for head in HEADS}


def head_for(model: nn.Module, name: str | None = None) -> DistillationHead:
    """The head serving `model` (a transformers model, or a PEFT model around one), or the head called `name`."""
    if name is not None:
        if name not in HEADS_BY_NAME:
            raise ValueError(f"Unknown distillation_head {name!r}: use one of {sorted(HEADS_BY_NAME)}.")
        return HEADS_BY_NAME[name]()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for head in HEADS:
        if head.matches(base):
            return head()
    raise ValueError(
        f"Cannot tell which outputs of {type(base).__name__} carry the teacher's distribution: it is none of "
        f"{[suffix for head in HEADS for suffix in head.class_suffixes]}. Pass distillation_head= one of "
        f"{sorted(HEADS_BY_NAME)} in DistillationTrainingArguments."
    )


__all__ = [
    "DENSE",
    "HEADS",
    "PER_TOKEN",
    "TOPK",
    "CausalLMHead",
    "DeiTWithTeacherHead",
    "DistillationHead",
    "ImageClassificationHead",
    "QuestionAnsweringHead",
    "Seq2SeqLMHead",
    "TokenClassificationHead",
    "TopKTarget",
    "Units",
    "head_for",
]
