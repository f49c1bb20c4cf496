"""Distillation losses on logits: pure functions of tensors.

Shapes: logits are `(*batch, num_labels)` where `*batch` is `(batch,)` for sequence-level tasks and
`(batch, seq_len)` for token-level ones. `sample_weight` is `(batch,)` and broadcasts over the other batch
dimensions; `mask` has the shape of `*batch` and is `True` where an example (or token) counts.

Every loss is computed in float32, whatever dtype the logits arrive in, and reduces to a weighted mean over the
positions that count: `sum(w * loss) / sum(w)`. An empty selection gives 0, not NaN.

Temperature convention. `kl_divergence_loss` multiplies KL(teacher_T || student_T_s) by `T * T_s`, which is the
T² of Hinton et al. (2015) when both temperatures are equal. The gradient of the softened KL with respect to the
student's logits shrinks as 1/T²; the factor keeps its magnitude independent of T, so changing T does not silently
rescale `alpha`. DistilBERT, torchdistill and DistillKit use T²; TextBrewer, TinyBERT and TRL do not, so their
`alpha` values are not directly comparable with ours.
"""

import torch
import torch.nn.functional as F


def _weighted_mean(
    values: torch.Tensor, sample_weight: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean of `values` `(*batch)` with `sample_weight` `(batch,)` over positions where `mask` is True."""
    weights = torch.ones_like(values)
    if sample_weight is not None:
        sample_weight = sample_weight.to(values.dtype)
        weights = weights * sample_weight.reshape(sample_weight.shape + (1,) * (values.dim() - 1))
    if mask is not None:
        weights = weights * mask.to(values.dtype)
    total_weight = weights.sum()
    weighted_sum = (weights * values).sum()
    return weighted_sum / total_weight.clamp_min(torch.finfo(values.dtype).tiny)


def kl_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    student_temperature: float | None = None,
    sample_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T_s)) * T * T_s, averaged over examples.

    Args:
        student_logits: `(*batch, num_labels)`.
        teacher_logits: `(*batch, num_labels)`.
        temperature: T, applied to the teacher.
        student_temperature: T_s, applied to the student; `None` means T.
        sample_weight: optional `(batch,)` per-example weights.
        mask: optional boolean `(*batch)`; False positions are ignored.

    Returns:
        A float32 scalar.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: teacher and student must share the label space."
        )
    if student_temperature is None:
        student_temperature = temperature
    student_log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    teacher_probs = teacher_log_probs.exp()
    # A masked class (teacher logit -inf) has probability 0 and contributes 0 * log 0 = 0, not 0 * -inf = NaN.
    per_class = torch.where(teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
    per_example = per_class.sum(dim=-1)
    return _weighted_mean(per_example, sample_weight, mask) * (temperature * student_temperature)


def logit_mse_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between raw logits `(*batch, num_labels)`, averaged over labels then examples.

    This is the distillation loss for regression heads (`num_labels == 1`), where a softmax is meaningless.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: teacher and student must share the label space."
        )
    per_example = (student_logits.float() - teacher_logits.float()).pow(2).mean(dim=-1)
    return _weighted_mean(per_example, sample_weight, mask)


def label_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The ordinary supervised loss on gold labels, skipping unlabelled examples.

    Classification: `student_logits` `(*batch, num_labels)`, integer `labels` `(*batch)`; cross-entropy, and labels
    equal to `ignore_index` (or negative) are skipped. Regression (`num_labels == 1`): float `labels` `(batch,)`;
    squared error, and NaN labels are skipped.

    Returns:
        A float32 scalar; 0 when no example in the batch is labelled.
    """
    logits = student_logits.float()
    labelled = labelled_mask(labels, logits.shape[-1], ignore_index)
    if logits.shape[-1] == 1 and labels.is_floating_point():
        targets = torch.where(labelled, labels, torch.zeros_like(labels)).float()
        per_example = (logits.squeeze(-1) - targets).pow(2)
    else:
        targets = torch.where(labelled, labels, torch.zeros_like(labels)).long()
        per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        per_example = per_example.reshape(targets.shape)
    return _weighted_mean(per_example, sample_weight, labelled)


def labelled_mask(labels: torch.Tensor, num_labels: int, ignore_index: int = -100) -> torch.Tensor:
    """`True` where an example has a gold label: not NaN for regression (`num_labels == 1`, float labels), else
    neither `ignore_index` nor negative (the GLUE recipe marks transfer examples with -1)."""
    if num_labels == 1 and labels.is_floating_point():
        return ~torch.isnan(labels)
    return (labels != ignore_index) & (labels >= 0)
