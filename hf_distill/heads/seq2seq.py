"""Sequence-to-sequence LMs (`*ForConditionalGeneration`: T5, BART, Marian): decoder logits aligned with labels."""

import torch
from torch import nn

from .base import TOPK, DistillationHead, TopKTarget, Units, single_label


class Seq2SeqLMHead(DistillationHead):
    """Distils the decoder's `logits[:, t]` wherever `labels[:, t] != -100` (no shift: the decoder reads the
    labels shifted right). Student and teacher get the same `decoder_input_ids`, built from the labels when the
    collator did not provide them. The cache keeps the teacher's top-k per label position.
    """

    name = "seq2seq_lm"
    cache_layout = TOPK
    input_names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    length_column = "labels"
    class_suffixes = ("ForConditionalGeneration",)
    pipeline_tag = "text2text-generation"
    token_level = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return super().matches(model) and getattr(getattr(model, "config", None), "is_encoder_decoder", False)

    def units(self, inputs: dict, labels: dict[str, torch.Tensor]) -> Units:
        label = single_label(labels)
        if label is None:
            raise ValueError(
                "A seq2seq batch has no 'labels': the decoder positions to distil are the label positions. Give "
                "every example its target tokens (the teacher's own generations for unlabelled text)."
            )
        labelled = label != -100
        return Units(labelled, labelled, label)

    def prepare_inputs(self, inputs: dict, labels: dict[str, torch.Tensor], model: nn.Module) -> dict:
        label = single_label(labels)
        if "decoder_input_ids" in inputs or label is None:
            return inputs
        return {**inputs, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=label)}

    def cached_targets(self, columns: dict[str, torch.Tensor], units: Units, inputs: dict) -> list:
        return [TopKTarget(columns["ids"][units.kd], columns["log_probs"][units.kd], columns["rest"][units.kd])]
