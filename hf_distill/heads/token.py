"""Token classification (`*ForTokenClassification`): one distribution `(num_labels,)` per real token."""

import torch

from .base import PER_TOKEN, DistillationHead, Units, single_label


def token_mask(inputs: dict) -> torch.Tensor:
    """`True` at real tokens `(batch, seq_len)`: the attention mask, or every position when there is none."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones(inputs["input_ids"].shape, dtype=torch.bool, device=inputs["input_ids"].device)
    return mask.bool()


class TokenClassificationHead(DistillationHead):
    """Distils `logits` `(batch, seq_len, num_labels)` over real tokens; the label term over labels != -100.

    The distillation mask (real tokens) is separate from the label mask, so unlabelled rows (all labels -100) get
    the distillation term only.
    """

    name = "token_classification"
    cache_layout = PER_TOKEN
    class_suffixes = ("ForTokenClassification",)
    pipeline_tag = "token-classification"
    token_level = True

    def units(self, inputs: dict, labels: dict[str, torch.Tensor]) -> Units:
        kd = token_mask(inputs)
        label = single_label(labels)
        if label is None:
            return Units(kd, torch.zeros_like(kd), None)
        labelled = label != -100
        return Units(kd | labelled, labelled, label)
