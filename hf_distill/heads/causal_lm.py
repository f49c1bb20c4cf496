"""Causal language models (`*ForCausalLM`, `*LMHeadModel`): the next-token distribution at every counted position."""

import torch

from .base import TOPK, DistillationHead, TopKTarget, Units, single_label
from .token import token_mask


class CausalLMHead(DistillationHead):
    """Distils `logits[:, t]` (the distribution of token t + 1) where the shifted label is not -100, or, in a row
    without any label, wherever tokens t and t + 1 are real.

    Student and teacher are asked for logits at the counted positions only (`logits_to_keep` as a boolean mask),
    so full-vocabulary logits are never materialised where nothing is learned. The cache keeps the teacher's top-k.
    """

    name = "causal_lm"
    cache_layout = TOPK
    input_names = ("input_ids", "attention_mask")
    class_suffixes = ("ForCausalLM", "LMHeadModel")
    pipeline_tag = "text-generation"
    token_level = True

    def units(self, inputs: dict, labels: dict[str, torch.Tensor]) -> Units:
        real = token_mask(inputs)
        next_real = torch.zeros_like(real)
        next_real[:, :-1] = real[:, 1:] & real[:, :-1]
        label = single_label(labels)
        if label is None:
            return Units(next_real, torch.zeros_like(real), None)
        next_labels = torch.full_like(label, -100)
        next_labels[:, :-1] = label[:, 1:]
        labelled = next_labels != -100
        row_has_labels = labelled.any(dim=1, keepdim=True)
        kd = torch.where(row_has_labels, labelled, next_real)
        return Units(kd, labelled, next_labels)

    def forward_kwargs(self, units: Units, keeps_logits: bool) -> dict:
        return {"logits_to_keep": units.kd} if keeps_logits else {}

    def _at_units(self, logits: torch.Tensor, units: Units) -> torch.Tensor:
        # `logits_to_keep` already returned the counted rows, flattened to (rows, vocab).
        return self._classes(logits if logits.dim() == 2 else logits[units.kd])

    def kd_logits(self, outputs, units: Units, inputs: dict) -> list[torch.Tensor]:
        return [self._at_units(outputs.logits, units)]

    def label_views(self, outputs, units: Units, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self._at_units(outputs.logits, units), units.label_targets[units.kd])]

    def cached_targets(self, columns: dict[str, torch.Tensor], units: Units, inputs: dict) -> list:
        return [TopKTarget(columns["ids"][units.kd], columns["log_probs"][units.kd], columns["rest"][units.kd])]
