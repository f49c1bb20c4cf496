"""The step's objective: the heads' views in, the weighted total and its logged terms out.

`DistillationObjective` composes the pure losses of `losses.py` over the positions a head counts: the distillation
term against one teacher or the teachers' mixture, the label term, the intermediate-layer terms, each sum divided by
the optimizer step's total (`step_counts` over every micro-batch and process). It knows neither `Trainer` nor the
models: `DistillationTrainer.compute_loss` runs the forwards and hands it the views.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .arguments import DistillationTrainingArguments
from .fused_vocabulary import ProjectedRows, chunk_rows, fused_vocabulary_loss
from .heads import TOPK, DistillationHead, TopKTarget, Units
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
from .on_policy import ON_POLICY

# Logits per loss chunk (rows x classes): bounds the float32 softmax intermediates kept for backward (~256 MiB
# each); a batch that fits is computed in one piece, without the recomputation in backward.
LOSS_CHUNK_ELEMENTS = 2**26


@dataclass
class StepLoss:
    """One micro-batch's loss and what to log: `terms[name] = (sum over the batch, weight)`, averaged over the
    logging window as `sum of sums / sum of weights`."""

    loss: torch.Tensor
    terms: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)


def resolve_distillation_loss(head: DistillationHead, config, requested: str) -> str:
    """The divergence `requested` (`args.distillation_loss`) means for this head: `"auto"` is MSE on logits for a
    regression head (`num_labels == 1`), KL otherwise."""
    regression = head.cache_layout != TOPK and getattr(config, "num_labels", None) == 1
    if requested == "auto":
        return "mse" if regression else "kl"
    if requested == "mse" and head.cache_layout == TOPK:
        raise ValueError(
            "distillation_loss='mse' compares raw logits, but a language-model head distils from top-k "
            "log-probabilities: use 'kl', 'reverse_kl' or 'jsd' (or 'auto')."
        )
    return requested


def step_counts(head: DistillationHead, batch: dict, label_names: list[str], sample_weight_column: str):
    """`(kd weight, label weight, examples)` of one collated micro-batch, from its masks only: summed over the
    step's micro-batches and processes, they are the divisors of `DistillationObjective`."""
    labels = {name: batch[name] for name in label_names if name in batch}
    inputs = {name: value for name, value in batch.items() if name not in labels}
    units = head.units(inputs, labels).without_labels(batch.get(ON_POLICY))
    row_weight = units.row_weights(batch.get(sample_weight_column))
    labelled = units.labelled[units.kd].float()
    return torch.stack([row_weight.sum(), (row_weight * labelled).sum(),
                        torch.tensor(float(units.kd.shape[0]), device=row_weight.device)])


class TermLog:
    """The logged terms' sums and weights since the last log, on one process."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.counts: dict[str, torch.Tensor | float] = defaultdict(float)

    def add(self, name: str, value_sum, count) -> None:
        self.sums[name] = self.sums[name] + value_sum
        self.counts[name] += count

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def pop_averages(self, device, reduce_sum) -> dict[str, float]:
        """`sum / weight` of every term over the processes (`reduce_sum` sums a tensor over them), then reset; a
        term of weight 0 (no labelled example since the last log) has no average."""
        names = sorted(self.sums)
        if not names:
            return {}
        sums = reduce_sum(torch.stack([torch.as_tensor(self.sums[name], device=device).float() for name in names]))
        counts = reduce_sum(torch.stack([torch.as_tensor(self.counts[name], device=device).float() for name in names]))
        self.clear()
        return {name: round(total / count, 6) for name, total, count in zip(names, sums.tolist(), counts.tolist())
                if count > 0}


class DistillationObjective:
    """`logits_loss_weight * (alpha * loss_kd + (1 - alpha) * loss_ce) + sum_i weight_i * loss_i` of a micro-batch.

    Args:
        head: the student's head (which views exist, which rows count).
        args: the run's settings (temperatures, alpha, divergence parameters, ensemble, sparse target).
        distillation_loss: the resolved divergence, `"kl"`, `"reverse_kl"`, `"jsd"` or `"mse"`.
        top_k: the width of a top-k target (`online_top_k`).
    """

    def __init__(self, head: DistillationHead, args: DistillationTrainingArguments, distillation_loss: str,
                 top_k: int, check_teacher_chunk=None):
        self.head, self.args, self.distillation_loss, self.top_k = head, args, distillation_loss, top_k
        #: Called with each chunk of an online teacher's logits projected inside the fused loss (a finiteness check).
        self.check_teacher_chunk = check_teacher_chunk

    def __call__(self, student_outputs, student_views: list, views_by_teacher: dict[str, list], units: Units,
                 inputs: dict, sample_weight: torch.Tensor | None = None, alignment_terms: dict | None = None,
                 step_totals: torch.Tensor | None = None, evaluating: bool = False) -> StepLoss:
        """The loss of one micro-batch.

        Args:
            student_outputs: the student's forward outputs (the label views come from them).
            student_views: `head.kd_logits(...)`, one `(rows, classes)` tensor per view.
            views_by_teacher: each teacher's views by name, `(rows, classes)` logits or `TopKTarget`s.
            units: the batch's counted positions; `inputs`: the student's inputs.
            sample_weight: `(batch,)` example weights, or None.
            alignment_terms: `{name: (weight, loss)}` of the intermediate-layer losses (batch means).
            step_totals: this process's share of the step's `step_counts` (the total over micro-batches and
                processes, divided by the number of processes); None divides each sum by the batch's own weight.
            evaluating: add the top-1 agreement with the teacher(s) to the logged terms.
        """
        args = self.args
        teacher_views = self.target_views(views_by_teacher)
        row_weight = units.row_weights(sample_weight)
        if isinstance(student_views[0], ProjectedRows):
            return self._fused_vocabulary_loss(student_views[0], teacher_views[0], units, row_weight, step_totals,
                                               evaluating)
        teacher_views = [view.logits() if isinstance(view, ProjectedRows) else view for view in teacher_views]
        if self.head.cache_layout == TOPK:  # one vocabulary-sized view: one student log-softmax for both terms
            loss_kd_rows, loss_ce_rows, labelled_rows = self.vocabulary_rows(student_views[0], teacher_views[0], units)
        else:
            loss_kd_rows = torch.stack(
                [self.divergence_rows(student, teacher) for student, teacher in zip(student_views, teacher_views)]
            ).mean(0)
            loss_ce_rows, labelled_rows = self.label_rows(student_outputs, units, inputs)
        kd_weight, ce_weight = row_weight.sum(), (row_weight * labelled_rows).sum()
        kd_total, ce_total, examples_share = _normalisers(kd_weight, ce_weight, units, step_totals)
        kd_sum = (row_weight * loss_kd_rows).sum()
        ce_sum = (row_weight * labelled_rows * loss_ce_rows).sum()
        terms = {"loss_kd": (kd_sum.detach(), kd_weight), "loss_ce": (ce_sum.detach(), ce_weight)}
        logits_loss = args.alpha * kd_sum / kd_total + (1.0 - args.alpha) * ce_sum / ce_total
        loss = args.logits_loss_weight * logits_loss
        for name, (weight, value) in (alignment_terms or {}).items():
            terms[name] = (value.detach(), 1)
            loss = loss + weight * value * examples_share
        if evaluating and self.distillation_loss != "mse":
            terms["teacher_agreement"] = _agreement(student_views, teacher_views, row_weight)
            if len(views_by_teacher) > 1:
                for name, views in views_by_teacher.items():
                    terms[f"teacher_agreement_{name}"] = _agreement(student_views, views, row_weight)
        return StepLoss(loss, terms)

    def _fused_vocabulary_loss(self, student: ProjectedRows, target, units: Units, row_weight: torch.Tensor,
                               step_totals: torch.Tensor | None, evaluating: bool) -> StepLoss:
        """The vocabulary head's loss from the student's hidden states and output layer (`fused_vocabulary`): the
        same total and terms as the unfused path, without `(rows, vocabulary)` logits."""
        args = self.args
        labelled_rows, label_targets = self._label_targets(units)
        kd_weight, ce_weight = row_weight.sum(), (row_weight * labelled_rows).sum()
        kd_total, ce_total, _ = _normalisers(kd_weight, ce_weight, units, step_totals)
        kd_weights = args.logits_loss_weight * args.alpha * row_weight / kd_total
        ce_weights = args.logits_loss_weight * (1.0 - args.alpha) * row_weight * labelled_rows / ce_total
        teacher_top = []

        def on_teacher_chunk(chunk):
            if self.check_teacher_chunk is not None and isinstance(target, ProjectedRows):
                self.check_teacher_chunk(chunk)
            if evaluating:
                teacher_top.append(chunk.ids[:, 0] if isinstance(chunk, TopKTarget) else chunk.argmax(-1))

        loss, kd_rows, ce_rows, student_top = fused_vocabulary_loss(
            student, target, label_targets, kd_weights, ce_weights, self._vocabulary_row_function(target),
            on_teacher_chunk=on_teacher_chunk,
        )
        terms = {"loss_kd": ((row_weight * kd_rows).sum(), kd_weight),
                 "loss_ce": ((row_weight * labelled_rows * ce_rows).sum(), ce_weight)}
        if evaluating:
            agreed = (student_top == torch.cat(teacher_top)).float()
            terms["teacher_agreement"] = ((agreed * row_weight).sum(), row_weight.sum())
        return StepLoss(loss, terms)

    def target_views(self, views_by_teacher: dict[str, list]) -> list:
        """One target per view: the teacher's, or the mixture of several (`args.teacher_ensemble`), made sparse by
        `online_top_k`."""
        args = self.args
        if len(views_by_teacher) == 1:
            views = next(iter(views_by_teacher.values()))
        else:
            weights = args.teacher_weights or [1.0] * len(views_by_teacher)
            mode = "mean_logits" if self.distillation_loss == "mse" else args.teacher_ensemble
            views = [ensemble_logits(list(per_view), weights, args.temperature, mode)
                     for per_view in zip(*views_by_teacher.values())]
        if args.online_top_k and isinstance(views[0], ProjectedRows):  # the teacher's top k, chunk by chunk
            rows, step = views[0].hidden.shape[0], chunk_rows(views[0].layer.weight.shape[0])
            parts = [sparse_target(views[0].logits(start, start + step), args.sparse_target, self.top_k,
                                   args.temperature) for start in range(0, rows, step)]
            views = [TopKTarget(*(torch.cat(fields) for fields in zip(*parts)))]
        elif args.online_top_k and not isinstance(views[0], TopKTarget):
            views = [TopKTarget(*sparse_target(views[0], args.sparse_target, self.top_k, args.temperature))]
        return views

    def vocabulary_rows(self, student_logits: torch.Tensor, target, units: Units):
        """Distillation and label loss per row `(rows,)` of vocabulary-sized logits against a top-k target (cached)
        or the teacher's logits (online), with one student log-softmax for both when the student's temperature is
        1; and which rows are labelled."""
        labelled_rows, label_targets = self._label_targets(units)
        teacher = (target.ids, target.log_probs, target.rest_probs) if isinstance(target, TopKTarget) else (target,)
        both = chunked_per_row(self._vocabulary_row_function(target), student_logits, label_targets, *teacher,
                               chunk_size=_chunk_rows(student_logits))
        return both[:, 0], both[:, 1], labelled_rows

    @staticmethod
    def _label_targets(units: Units) -> tuple[torch.Tensor, torch.Tensor]:
        """`(labelled (rows,) float, next-token targets (rows,), -100 where unlabelled)` over the `kd` rows."""
        labelled_rows = units.labelled[units.kd].float()
        if units.label_targets is None:
            return labelled_rows, torch.full(labelled_rows.shape, -100, dtype=torch.long, device=labelled_rows.device)
        return labelled_rows, units.label_targets[units.kd]

    def _vocabulary_row_function(self, target):
        """`(logits, targets, *teacher) -> (rows, 2)` divergence and label loss of vocabulary rows: forward KL to
        dense logits with its gradient written out, or the general expression."""
        args = self.args
        if isinstance(target, TopKTarget) or self.distillation_loss != "kl":
            return self._vocabulary_row_terms

        def forward_kl_and_cross_entropy(logits, targets, teacher_logits):
            kd, ce = forward_kl_and_cross_entropy_per_row(logits, teacher_logits, targets, args.temperature,
                                                          args.student_temperature)
            return torch.stack([kd, ce], dim=-1)

        return forward_kl_and_cross_entropy

    def _vocabulary_row_terms(self, logits: torch.Tensor, targets: torch.Tensor, *teacher) -> torch.Tensor:
        """`(rows, 2)`: the divergence (× T·Ts) and the label cross-entropy (0 where unlabelled) of a row chunk."""
        args = self.args
        student_log_probs = tempered_log_softmax(logits, args.student_temperature)
        if len(teacher) == 3:
            kd = sparse_divergence_from_log_probs(student_log_probs, *teacher, self.distillation_loss,
                                                  args.topk_tail, args.jsd_beta)
        else:
            kd = divergence_from_log_probs(student_log_probs, tempered_log_softmax(teacher[0], args.temperature),
                                           self.distillation_loss, args.jsd_beta)
        kd = kd * (args.temperature * args.student_temperature)
        label_log_probs = student_log_probs if args.student_temperature == 1.0 else tempered_log_softmax(logits, 1.0)
        labelled = targets >= 0
        ce = -label_log_probs.gather(-1, targets.clamp_min(0).long()[:, None]).squeeze(-1)
        return torch.stack([kd, torch.where(labelled, ce, torch.zeros_like(ce))], dim=-1)

    def divergence_rows(self, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The distillation loss of every row `(rows,)` against a dense `(rows, classes)` target."""
        args = self.args
        if self.distillation_loss == "mse":
            return mse_per_row(student_logits, target)

        def rows(logits, teacher_logits):
            return divergence_per_row(logits, teacher_logits, self.distillation_loss, args.temperature,
                                      args.student_temperature, args.jsd_beta)

        return chunked_per_row(rows, student_logits, target, chunk_size=_chunk_rows(student_logits))

    def label_rows(self, student_outputs, units: Units, inputs: dict):
        """`(loss per row, labelled per row)` of the label term over the `kd` rows, averaged over the views."""
        labelled_rows = units.labelled[units.kd].float()
        if units.label_targets is None or not bool(labelled_rows.any()):
            return torch.zeros_like(labelled_rows), labelled_rows
        losses = [chunked_per_row(label_loss_per_row, logits, targets, chunk_size=_chunk_rows(logits))
                  for logits, targets in self.head.label_views(student_outputs, units, inputs)]
        return torch.stack(losses).mean(0), labelled_rows


def _chunk_rows(logits: torch.Tensor) -> int:
    return max(1, LOSS_CHUNK_ELEMENTS // max(1, logits.shape[-1]))


def _normalisers(kd_weight, ce_weight, units: Units, step_totals: torch.Tensor | None):
    """Divisors of a micro-batch's sums, and its examples' share of the step for per-batch-mean terms.

    In training the step's loss is `sum(w * loss) / sum(w)` over every counted position of every micro-batch and
    process. DDP averages gradients over processes, so each process divides by the total over `num_processes`
    (`step_totals`). In evaluation each micro-batch is its own mean.
    """
    tiny = torch.finfo(torch.float32).tiny
    if step_totals is None:
        return kd_weight.clamp_min(tiny), ce_weight.clamp_min(tiny), 1.0
    kd_total, ce_total, examples_total = step_totals
    examples_share = units.kd.shape[0] / examples_total.clamp_min(tiny)
    return kd_total.clamp_min(tiny), ce_total.clamp_min(tiny), examples_share


def _agreement(student_views, teacher_views, row_weight) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weighted count of rows whose top-1 class the student shares with the teacher, total weight)`."""
    agreement = []
    for student, teacher in zip(student_views, teacher_views):
        teacher_top = teacher.ids[:, 0] if isinstance(teacher, TopKTarget) else teacher.argmax(-1)
        agreement.append((student.argmax(-1) == teacher_top).float())
    return (torch.stack(agreement).mean(0) * row_weight).sum(), row_weight.sum()
