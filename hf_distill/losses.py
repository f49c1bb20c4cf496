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

Divergences (`divergence_per_row`, `sparse_divergence_per_row`), each per row of `(rows, classes)` logits:
- `"kl"`: forward KL(teacher || student), the classic KD loss;
- `"reverse_kl"`: KL(student || teacher), mode-seeking;
- `"jsd"`: generalized Jensen-Shannon of TRL's GKD, `beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)` with
  `m = beta * p_T + (1 - beta) * p_S`; `beta=0` is forward KL and `beta=1` reverse KL (TRL's convention).
Classes where a distribution is 0 (a `-inf` logit, a masked class) contribute 0·log 0 = 0.

Top-k targets (`sparse_divergence_per_row`): the teacher's k most likely classes with their log-probabilities
and the probability left outside them. `tail="rest"` (default) compares the (k+1)-bucket distributions
`[p_1 .. p_k, p_rest]` and `[q_1 .. q_k, q_rest]` (q over the student's full vocabulary): a true divergence that
equals the dense one when k covers the vocabulary. `tail="renormalise"` compares both distributions restricted to
the k classes and renormalised (DistillKit's "zero" treats the teacher this way).

A top-k target is biased: the student never learns the teacher's tail. A sampled target (`sampled_target`,
Random-Sampling KD of Anshumann et al., ACL 2025) stores the classes of n draws from the teacher's distribution,
each at its share of the draws, rest 0: its forward KL to the student, over the student's full vocabulary, has in
expectation the gradient of the full distribution's. Keeping the most likely classes exact and drawing only from
the rest is unbiased too, with less variance. All come in the same `(ids, log_probs, rest)` layout.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("kl", "reverse_kl", "jsd")
TEACHER_ENSEMBLES = ("mean_probs", "mean_logits")
TOPK_TAILS = ("rest", "renormalise")
SPARSE_TARGETS = ("top_k", "sampled", "top_k_and_sampled")


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
    per_example = divergence_per_row(student_logits, teacher_logits, "kl", temperature, student_temperature)
    return _weighted_mean(per_example, sample_weight, mask)


def _check_same_shape(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: teacher and student must share the label space."
        )


def _kl_from_log_probs(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities; classes with p = 0 contribute 0."""
    # Masking the operands, not the product, keeps the gradient of the p = 0 classes at 0 instead of NaN.
    support = p_log > -torch.inf
    zeros = torch.zeros_like(p_log)
    log_ratio = torch.where(support, p_log - torch.where(support, q_log, zeros), zeros)
    return (torch.where(support, p_log, zeros).exp() * support * log_ratio).sum(dim=-1)


def divergence_from_log_probs(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, kind: str = "kl", beta: float = 0.5
) -> torch.Tensor:
    """The divergence `kind` between two distributions given as log-probabilities `(*rows, classes)`; `(*rows)`."""
    if kind == "kl" or (kind == "jsd" and beta == 0.0):
        return _kl_from_log_probs(teacher_log_probs, student_log_probs)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_from_log_probs(student_log_probs, teacher_log_probs)
    if kind != "jsd":
        raise ValueError(f"Unknown divergence {kind!r}: use one of {DIVERGENCES}.")
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + math.log(1.0 - beta), teacher_log_probs + math.log(beta)]), dim=0
    )
    return beta * _kl_from_log_probs(teacher_log_probs, mixture_log_probs) + (1.0 - beta) * _kl_from_log_probs(
        student_log_probs, mixture_log_probs
    )


def divergence_per_row(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "kl",
    temperature: float = 1.0,
    student_temperature: float | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Divergence `kind` of softened distributions, times `T * T_s`, per row.

    Args:
        student_logits: `(*rows, num_classes)`.
        teacher_logits: `(*rows, num_classes)`.

    Returns:
        float32 `(*rows)`.
    """
    _check_same_shape(student_logits, teacher_logits)
    if student_temperature is None:
        student_temperature = temperature
    student_log_probs = tempered_log_softmax(student_logits, student_temperature)
    teacher_log_probs = tempered_log_softmax(teacher_logits, temperature)
    divergence = divergence_from_log_probs(student_log_probs, teacher_log_probs, kind, beta)
    return divergence * (temperature * student_temperature)


def sparse_divergence_per_row(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_rest_probs: torch.Tensor,
    kind: str = "kl",
    tail: str = "rest",
    temperature: float = 1.0,
    student_temperature: float | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Divergence between the student and the teacher's top-k distribution, times `T * T_s`, per row.

    Args:
        student_logits: `(rows, vocab)` raw logits.
        teacher_topk_ids: `(rows, k)` class ids of the teacher's k most likely classes.
        teacher_topk_log_probs: `(rows, k)` their log-probabilities, taken at temperature `temperature`.
        teacher_rest_probs: `(rows,)` the teacher's probability outside the top k.
        tail: `"rest"` or `"renormalise"` (module docstring).

    Returns:
        float32 `(rows,)`.
    """
    if student_temperature is None:
        student_temperature = temperature
    student_log_probs = tempered_log_softmax(student_logits, student_temperature)
    divergence = sparse_divergence_from_log_probs(
        student_log_probs, teacher_topk_ids, teacher_topk_log_probs, teacher_rest_probs, kind, tail, beta
    )
    return divergence * (temperature * student_temperature)


def sparse_divergence_from_log_probs(
    student_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_rest_probs: torch.Tensor,
    kind: str = "kl",
    tail: str = "rest",
    beta: float = 0.5,
) -> torch.Tensor:
    """`sparse_divergence_per_row` from the student's log-probabilities `(rows, vocab)`, without the `T * T_s`
    factor (so that one log-softmax can serve the label term too)."""
    if tail not in TOPK_TAILS:
        raise ValueError(f"Unknown top-k tail handling {tail!r}: use one of {TOPK_TAILS}.")
    ids = teacher_topk_ids.long()
    student_topk = student_log_probs.gather(-1, ids)
    teacher_topk = teacher_topk_log_probs.float()
    if tail == "renormalise":
        student_buckets = student_topk - torch.logsumexp(student_topk, dim=-1, keepdim=True)
        teacher_buckets = teacher_topk - torch.logsumexp(teacher_topk, dim=-1, keepdim=True)
    else:
        student_rest = _log_rest(student_log_probs, student_topk, ids)
        student_buckets = torch.cat([student_topk, student_rest.unsqueeze(-1)], dim=-1)
        teacher_rest = teacher_rest_probs.float().clamp_min(0.0).unsqueeze(-1)
        teacher_buckets = torch.cat([teacher_topk, torch.log(teacher_rest)], dim=-1)
        # float16 storage rounds the k log-probabilities: renormalise so the buckets sum to exactly 1.
        teacher_buckets = teacher_buckets - torch.logsumexp(teacher_buckets, dim=-1, keepdim=True)
    return divergence_from_log_probs(student_buckets, teacher_buckets, kind, beta)


def ensemble_logits(
    teacher_logits: list[torch.Tensor], weights: list[float], temperature: float = 1.0, mode: str = "mean_probs"
) -> torch.Tensor:
    """One target from several teachers' logits `(*rows, classes)`, as logits for the usual losses.

    `"mean_probs"`: the weighted mean of the temperature-softened distributions, `sum_i w_i softmax(t_i / T)`,
    returned as `T * log(...)` so that `softmax(result / T)` is exactly that mixture. `"mean_logits"`: the weighted
    mean of the raw logits (TextBrewer's choice; a geometric mean of the distributions, sharper than the mixture).
    Weights are normalised to sum to 1.
    """
    if mode not in TEACHER_ENSEMBLES:
        raise ValueError(f"Unknown teacher ensemble {mode!r}: use one of {TEACHER_ENSEMBLES}.")
    total = float(sum(weights))
    if mode == "mean_logits":
        return sum(weight / total * logits.float() for weight, logits in zip(weights, teacher_logits))
    log_probs = torch.stack([
        tempered_log_softmax(logits, temperature) + math.log(weight / total)
        for weight, logits in zip(weights, teacher_logits)
    ])
    return temperature * torch.logsumexp(log_probs, dim=0)


def _softmax_and_log_normaliser(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(softmax (rows, classes), logsumexp (rows,))` of float32 scores, in one new tensor; rows of -inf stay 0."""
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.sub(scores, row_max).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    return probs, (row_max + total.log()).squeeze(-1)


class _ForwardKLAndCrossEntropy(torch.autograd.Function):
    """Forward KL to a dense teacher and cross-entropy, per row, with the gradient written out.

    On vocabulary-sized rows a fresh `(rows, classes)` tensor costs more than the arithmetic on it (the allocator
    hands large blocks back to the system, so each one is page-faulted in again): this allocates two, the student's
    and the teacher's softmax, and writes the gradient into the first. With p = softmax(t), q = softmax(s):
    KL(p || q) = p·t − p·s − logsumexp(t) + logsumexp(s).
    """

    @staticmethod
    def forward(ctx, logits, teacher_logits, targets, temperature, student_temperature):
        scores = logits.float() if student_temperature == 1.0 else logits.float() / student_temperature
        teacher_scores = teacher_logits.float() if temperature == 1.0 else teacher_logits.float() / temperature
        student_probs, student_normaliser = _softmax_and_log_normaliser(scores)
        teacher_probs, teacher_normaliser = _softmax_and_log_normaliser(teacher_scores)
        teacher_dot = torch.linalg.vecdot(teacher_probs, teacher_scores)
        masked = torch.isnan(teacher_dot)  # a masked teacher class: 0 * -inf; it contributes nothing
        if bool(masked.any()):
            rows = teacher_scores[masked]
            teacher_dot[masked] = torch.linalg.vecdot(
                teacher_probs[masked], torch.where(torch.isneginf(rows), torch.zeros_like(rows), rows))
        kd = teacher_dot - torch.linalg.vecdot(teacher_probs, scores) - teacher_normaliser + student_normaliser
        labelled = targets >= 0
        index = targets.clamp_min(0).long()[:, None]
        if student_temperature == 1.0:
            label_normaliser = student_normaliser
        else:
            label_normaliser = torch.logsumexp(logits.float(), dim=-1)
        ce = label_normaliser - logits.float().gather(-1, index).squeeze(-1)
        ctx.save_for_backward(student_probs, teacher_probs, targets, logits)
        ctx.temperatures = (temperature, student_temperature)
        return kd * (temperature * student_temperature), torch.where(labelled, ce, torch.zeros_like(ce))

    @staticmethod
    def backward(ctx, kd_grad, ce_grad):
        # One backward per forward: the gradient is written into the saved student softmax (a second backward
        # would be refused by autograd's version check, not computed wrong).
        student_probs, teacher_probs, targets, logits = ctx.saved_tensors
        temperature, student_temperature = ctx.temperatures
        # d(T Ts KL(p || softmax(s / Ts))) / ds = T (q - p); d(CE) / ds = softmax(s) - onehot(target).
        kd_weight = (kd_grad * temperature)[:, None]
        ce_weight = torch.where(targets >= 0, ce_grad, torch.zeros_like(ce_grad))[:, None]
        if student_temperature == 1.0:
            grad = student_probs.mul_(kd_weight + ce_weight)
        else:
            grad = student_probs.mul_(kd_weight)
            grad.add_(torch.softmax(logits.float(), dim=-1).mul_(ce_weight))
        grad.addcmul_(teacher_probs, kd_weight, value=-1.0)
        grad.scatter_add_(-1, targets.clamp_min(0).long()[:, None], -ce_weight)
        return grad, None, None, None, None


def tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(logits / temperature)` over the last dimension, in float32."""
    # No division at temperature 1: on vocabulary-sized rows every elementwise pass counts.
    return F.log_softmax(logits.float() if temperature == 1.0 else logits.float() / temperature, dim=-1)


def forward_kl_and_cross_entropy_per_row(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    student_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL(teacher_T || student_Ts) x T Ts and the label cross-entropy of the same rows, in one pass.

    Args:
        student_logits: `(rows, vocab)`; the only input that gets a gradient.
        teacher_logits: `(rows, vocab)`.
        targets: `(rows,)` gold class ids; negative (-100) for unlabelled rows, whose cross-entropy is 0.

    Returns:
        float32 `(rows,)` distillation and label losses. Equal to `divergence_per_row(..., "kl")` and
        `label_loss_per_row`, with the same gradients.
    """
    if student_temperature is None:
        student_temperature = temperature
    return _ForwardKLAndCrossEntropy.apply(
        student_logits, teacher_logits.detach(), targets, float(temperature), float(student_temperature)
    )


# Above this top-k mass, log(1 - mass) loses precision in float32: those rows sum the rest exactly.
_EXACT_REST_ABOVE = 1.0 - 1e-3


def _log_rest(
    log_probs: torch.Tensor, topk_log_probs: torch.Tensor, ids: torch.Tensor, log_normaliser: torch.Tensor | None = None
) -> torch.Tensor:
    """`log(1 - sum of the probabilities at ids)` per row `(rows,)`.

    `log1p(-mass)` costs nothing beside the softmax; where the k classes hold almost all the mass it would cancel,
    so those rows (only) sum the probabilities outside the k classes instead, over the whole row. `log_probs` are
    `(rows, classes)` log-probabilities, or logits when `log_normaliser` `(rows, 1)` gives their log-sum-exp.
    """
    mass = topk_log_probs.double().exp().sum(-1)
    rest = torch.log1p(-mass.clamp(max=_EXACT_REST_ABOVE)).to(log_probs.dtype)
    near_one = torch.nonzero(mass > _EXACT_REST_ABOVE).squeeze(-1)
    if near_one.numel():
        exact = log_probs[near_one] if log_normaliser is None else log_probs[near_one] - log_normaliser[near_one]
        outside = exact.scatter(-1, ids[near_one], -torch.inf)
        rest = rest.index_put((near_one,), torch.logsumexp(outside, dim=-1))
    return rest


# Rows of logits per step of `top_k_target`: a few MB of a vocabulary-sized block stays in cache across its passes.
TOP_K_TARGET_ROWS = 32


def top_k_target(logits: torch.Tensor, top_k: int, temperature: float = 1.0):
    """A teacher's top-k target from its logits `(..., classes)`: `(ids (..., k) long, log_probs (..., k) float32
    at temperature, rest_probs (...))`, the probability outside the k classes (0 when k covers the classes).

    The k classes are the top k of the raw logits (a positive temperature keeps their order) and their log-probabilities
    are those logits less one log-sum-exp per row, so no full log-softmax is written; rows go `TOP_K_TARGET_ROWS` at a
    time.
    """
    rows = logits.flatten(0, -2)
    k = min(top_k, rows.shape[-1])
    ids, log_probs, rest = [], [], []
    for block in rows.split(TOP_K_TARGET_ROWS):
        block = block.float()
        scaled = block if temperature == 1.0 else block / temperature
        block_top, block_ids = scaled.topk(k, dim=-1)
        log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
        block_log_probs = block_top - log_normaliser
        ids.append(block_ids)
        log_probs.append(block_log_probs)
        rest.append(_log_rest(scaled, block_log_probs, block_ids, log_normaliser).exp())
    leading = logits.shape[:-1]
    return torch.cat(ids).view(*leading, k), torch.cat(log_probs).view(*leading, k), torch.cat(rest).view(leading)


def sampled_target(logits: torch.Tensor, num_samples: int, temperature: float = 1.0,
                   generator: torch.Generator | None = None, exact_top: int = 0):
    """A teacher's sampled target from its logits `(..., classes)`, in `top_k_target`'s layout `(ids (..., n) long,
    log_probs (..., n) float32, rest (...))`, rest 0: the distribution at `temperature` estimated from draws.

    The `exact_top` most likely classes keep their probabilities; `num_samples - exact_top` draws from the rest of
    the distribution give each drawn class its share of the draws times the rest's mass. Slots are distinct classes:
    the exact ones, the drawn ones (most drawn first), then the most likely classes not drawn at log 0 = -inf.
    """
    rows = logits.flatten(0, -2)
    num_draws = num_samples - exact_top
    num_slots = min(num_samples, rows.shape[-1])
    ids, log_probs = [], []
    for block in rows.split(TOP_K_TARGET_ROWS):
        probs = torch.softmax(block.float() if temperature == 1.0 else block.float() / temperature, dim=-1)
        exact_probs, exact_ids = probs.topk(exact_top, dim=-1)
        tail = probs.scatter(-1, exact_ids, 0.0)
        tail_mass = tail.sum(-1, keepdim=True)
        # A row whose mass the exact classes hold entirely draws (weight 0) from the other classes alike.
        weights = torch.where(tail_mass > 0, tail, torch.ones_like(tail).scatter(-1, exact_ids, 0.0))
        draws = torch.multinomial(weights, num_draws, replacement=True, generator=generator)
        counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
        # Probabilities are < 1, so they order the classes of equal count (the undrawn ones) without reordering.
        _, tail_ids = (counts + tail).scatter(-1, exact_ids, -torch.inf).topk(num_slots - exact_top, dim=-1)
        ids.append(torch.cat([exact_ids, tail_ids], dim=-1))
        tail_probs = counts.gather(-1, tail_ids) * (tail_mass / num_draws)
        log_probs.append(torch.log(torch.cat([exact_probs, tail_probs], dim=-1)))
    leading = logits.shape[:-1]
    rest = logits.new_zeros(leading, dtype=torch.float32)
    return torch.cat(ids).view(*leading, num_slots), torch.cat(log_probs).view(*leading, num_slots), rest


def sparse_target(logits: torch.Tensor, kind: str, size: int, temperature: float = 1.0,
                  generator: torch.Generator | None = None):
    """A target of `size` classes per row, by `kind` (one of `SPARSE_TARGETS`): `top_k_target`, `sampled_target`
    (`"sampled"`: `size` draws), or `sampled_target` with the `size // 2` most likely classes exact
    (`"top_k_and_sampled"`)."""
    if kind == "top_k":
        return top_k_target(logits, size, temperature)
    if kind in ("sampled", "top_k_and_sampled"):
        return sampled_target(logits, size, temperature, generator, exact_top=size // 2 if kind != "sampled" else 0)
    raise ValueError(f"Unknown sparse target {kind!r}: use one of {SPARSE_TARGETS}.")


def chunked_per_row(function, *row_tensors: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """`function(*row_tensors)` evaluated `chunk_size` rows at a time, each chunk recomputed in backward; in one
    piece (no recomputation) when the rows fit in one chunk.

    For vocabulary-sized rows: only the inputs are kept for backward, not the float32 softmax intermediates of
    every row, so peak memory is bounded by one chunk.
    """
    rows = row_tensors[0].shape[0]
    if rows <= chunk_size:
        return function(*row_tensors)
    needs_grad = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in row_tensors)
    chunks = []
    for start in range(0, rows, chunk_size):
        pieces = [tensor[start : start + chunk_size] for tensor in row_tensors]
        if needs_grad:
            chunks.append(checkpoint(function, *pieces, use_reentrant=False))
        else:
            chunks.append(function(*pieces))
    return torch.cat(chunks)


def logit_mse_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between raw logits `(*batch, num_labels)`, averaged over labels then examples.

    This is the distillation loss for regression heads (`num_labels == 1`), where a softmax is meaningless.
    """
    return _weighted_mean(mse_per_row(student_logits, teacher_logits), sample_weight, mask)


def mse_per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits `(*rows, num_labels)` over the labels; float32 `(*rows)`."""
    _check_same_shape(student_logits, teacher_logits)
    return (student_logits.float() - teacher_logits.float()).pow(2).mean(dim=-1)


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
    per_example = label_loss_per_row(student_logits, labels, ignore_index)
    return _weighted_mean(per_example, sample_weight, labelled_mask(labels, student_logits.shape[-1], ignore_index))


def label_loss_per_row(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy (or squared error for float labels of a 1-logit head) per row, 0 where unlabelled.

    Args:
        student_logits: `(*rows, num_labels)`.
        labels: `(*rows)` integer class ids (`ignore_index` or negative: unlabelled), or float regression targets
            (NaN: unlabelled).

    Returns:
        float32 `(*rows)`.
    """
    logits = student_logits.float()
    labelled = labelled_mask(labels, logits.shape[-1], ignore_index)
    if logits.shape[-1] == 1 and labels.is_floating_point():
        targets = torch.where(labelled, labels, torch.zeros_like(labels)).float()
        per_row = (logits.squeeze(-1) - targets).pow(2)
    else:
        targets = torch.where(labelled, labels, torch.zeros_like(labels)).long()
        per_row = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        per_row = per_row.reshape(targets.shape)
    return torch.where(labelled, per_row, torch.zeros_like(per_row))


def labelled_mask(labels: torch.Tensor, num_labels: int, ignore_index: int = -100) -> torch.Tensor:
    """`True` where an example has a gold label: not NaN for regression (`num_labels == 1`, float labels), else
    neither `ignore_index` nor negative (the GLUE recipe marks transfer examples with -1)."""
    if num_labels == 1 and labels.is_floating_point():
        return ~torch.isnan(labels)
    return (labels != ignore_index) & (labels >= 0)
