"""Extractive question answering (`*ForQuestionAnswering`): start and end distributions over the positions."""

import torch

from .base import PER_TOKEN, DistillationHead, Units
from .token import token_mask


def _mask_padding(position_logits: torch.Tensor, inputs: dict) -> torch.Tensor:
    """`(batch, seq_len)` logits with padding positions at a large negative: no probability, no NaN."""
    mask = token_mask(inputs)[:, : position_logits.shape[1]]
    return position_logits.float().masked_fill(~mask, torch.finfo(torch.float32).min / 4)


class QuestionAnsweringHead(DistillationHead):
    """Two views per example, `start_logits` and `end_logits` `(batch, seq_len)`, each a distribution over the real
    tokens; the distillation and label terms average them, as the models' own loss does.

    The cache stores `(seq_len, 2)` per example: start and end logits of every token.
    """

    name = "question_answering"
    cache_layout = PER_TOKEN
    class_suffixes = ("ForQuestionAnswering",)
    pipeline_tag = "question-answering"

    def units(self, inputs: dict, labels: dict[str, torch.Tensor]) -> Units:
        kd = torch.ones(inputs["input_ids"].shape[0], dtype=torch.bool, device=inputs["input_ids"].device)
        start, end = labels.get("start_positions"), labels.get("end_positions")
        if start is None or end is None:
            return Units(kd, torch.zeros_like(kd), None)
        positions = torch.stack([start.reshape(-1), end.reshape(-1)], dim=-1).long()
        # An answer outside the example's real tokens (truncated away) gets no label term, as in transformers'
        # ForQuestionAnsweringLoss; at a padding position its logit is masked, so its cross-entropy would be ~1e37.
        real = token_mask(inputs)
        inside = (positions >= 0) & (positions < real.shape[1])
        at_token = real.gather(1, positions.clamp(0, real.shape[1] - 1)) & inside
        labelled = at_token.all(dim=-1)
        return Units(kd, labelled, positions.masked_fill(~labelled[:, None], -100))

    def kd_logits(self, outputs, units: Units, inputs: dict) -> list[torch.Tensor]:
        return [_mask_padding(logits, inputs)[units.kd] for logits in (outputs.start_logits, outputs.end_logits)]

    def label_views(self, outputs, units: Units, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        views = []
        for index, logits in enumerate((outputs.start_logits, outputs.end_logits)):
            positions = units.label_targets[units.kd][:, index]  # -100 where units() found no answer
            views.append((_mask_padding(logits, inputs)[units.kd], positions))
        return views

    def predictions(self, outputs):
        return outputs.start_logits, outputs.end_logits

    def cached_targets(self, columns: dict[str, torch.Tensor], units: Units, inputs: dict) -> list:
        logits = columns["logits"]  # (batch, seq_len, 2)
        return [_mask_padding(logits[..., index], inputs)[units.kd] for index in (0, 1)]

    def cache_values(self, teacher_outputs, inputs: dict) -> dict[str, torch.Tensor]:
        return {"logits": torch.stack([teacher_outputs.start_logits, teacher_outputs.end_logits], dim=-1)}
