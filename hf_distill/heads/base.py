"""The head protocol and the sequence-level head every other head builds on."""


from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

DENSE, PER_TOKEN, TOPK = "dense", "per_token", "topk"


@dataclass
class Units:
    """The positions of one batch that count: boolean masks of one shape, `(batch,)` or `(batch, seq_len)`.

    `label_targets`, of the same shape, holds the gold label of every position (shifted for causal LMs).
    """

    kd: torch.Tensor
    labelled: torch.Tensor
    label_targets: torch.Tensor | None = None

    def row_weights(self, sample_weight: torch.Tensor | None) -> torch.Tensor:
        """The weight of every `kd` row, `(rows,)`: its example's sample weight, or 1."""
        if sample_weight is None:
            return torch.ones(int(self.kd.sum()), device=self.kd.device)
        return sample_weight.float().to(self.kd.device)[self.example_index]

    def without_labels(self, rows: torch.Tensor | None) -> "Units":
        """These units with the label term off in `rows` `(batch,)` bool, their `kd` positions kept (on-policy rows:
        the labels mark the generated tokens, which are no gold targets). `None` changes nothing."""
        if rows is None:
            return self
        gold = ~rows.to(self.kd.device).view(-1, *([1] * (self.kd.dim() - 1)))
        label_targets = None if self.label_targets is None else self.label_targets.masked_fill(~gold, -100)
        return Units(self.kd, self.labelled & gold, label_targets)

    @property
    def example_index(self) -> torch.Tensor:
        """The example of every `kd` row, `(rows,)`: sample weights are per example."""
        rows = torch.arange(self.kd.shape[0], device=self.kd.device)
        if self.kd.dim() > 1:
            rows = rows[:, None].expand_as(self.kd)
        return rows[self.kd]


@dataclass
class TopKTarget:
    """A sparse teacher distribution per row: its k most likely classes and the probability left outside them."""

    ids: torch.Tensor  # (rows, k) int
    log_probs: torch.Tensor  # (rows, k), at the temperature the cache was built with
    rest_probs: torch.Tensor  # (rows,)


class DistillationHead:
    """Sequence-level base: one distribution `(batch, num_labels)` in `outputs.logits` per example."""

    name: ClassVar[str] = "sequence_classification"
    #: `"dense"` `(num_labels,)` per example, `"per_token"` `(length, classes)`, or `"topk"` `(length, k)`.
    cache_layout: ClassVar[str] = DENSE
    #: Batch fields the teacher is given (those its forward accepts).
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
    #: Column whose per-example length is the length of a per-token cache row.
    length_column: ClassVar[str] = "input_ids"
    #: Class-name endings this head serves.
    class_suffixes: ClassVar[tuple[str, ...]] = ("ForSequenceClassification",)
    #: The Hub pipeline of a student with this head (its model card's `pipeline_tag`).
    pipeline_tag: ClassVar[str] = "text-classification"
    #: Whether positions are tokens (sums are then over tokens, not examples).
    token_level: ClassVar[bool] = False
    #: The head whose cache this head's cache equals, when not its own (the record then matches across them).
    cache_name: ClassVar[str | None] = None
    #: Label fields when the model class declares none (`transformers.utils.find_labels` finds none).
    default_label_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_classes: int | None = None):
        #: Classes compared; vocabulary heads compare the first `len(tokenizer)` logits when embeddings are padded.
        self.num_classes = num_classes

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__.endswith(cls.class_suffixes)

    # ---- positions ----

    def units(self, inputs: dict, labels: dict[str, torch.Tensor]) -> Units:
        """The counted positions of a batch; `labels` holds the batch's label fields by name (maybe none)."""
        label = single_label(labels)
        kd = torch.ones(_batch_size(inputs, label), dtype=torch.bool, device=_device(inputs, label))
        labelled = torch.zeros_like(kd) if label is None else labelled_examples(label)
        return Units(kd, labelled, label)

    # ---- student and online teacher ----

    def prepare_inputs(self, inputs: dict, labels: dict[str, torch.Tensor], model: nn.Module) -> dict:
        """The model inputs once the labels are popped (seq2seq models need `decoder_input_ids` from them)."""
        return inputs

    def forward_kwargs(self, units: Units, keeps_logits: bool) -> dict:
        """Extra forward arguments that limit the outputs to the counted positions (`keeps_logits`: the model's
        forward takes `logits_to_keep`)."""
        return {}

    def kd_logits(self, outputs, units: Units, inputs: dict) -> list[torch.Tensor]:
        """The distribution-carrying logits at the `kd` units: one `(rows, classes)` tensor per view."""
        return [self._classes(outputs.logits[units.kd])]

    def teacher_kd_logits(self, teacher_outputs, units: Units, inputs: dict) -> list[torch.Tensor]:
        """The online teacher's views, matching `kd_logits` and what `cache_values` stores."""
        return self.kd_logits(teacher_outputs, units, inputs)

    def label_views(self, outputs, units: Units, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(logits (rows, classes), targets (rows,))` per view, over the `kd` units."""
        return [(self._classes(outputs.logits[units.kd]), units.label_targets[units.kd])]

    def predictions(self, outputs):
        """What `compute_metrics` receives, as `Trainer` would pass it."""
        return outputs.logits

    def teacher_inputs(self, inputs: dict) -> dict:
        return {name: inputs[name] for name in self.input_names if name in inputs}

    # ---- cache ----

    def cached_targets(self, columns: dict[str, torch.Tensor], units: Units, inputs: dict) -> list:
        """The teacher's views from the collated cache columns (`"logits"`, or `"ids"`/`"log_probs"`/`"rest"`)."""
        return [columns["logits"][units.kd]]

    def cache_values(self, teacher_outputs, inputs: dict) -> dict[str, torch.Tensor]:
        """What the cache stores for a batch: `{"logits": (batch, num_labels)}`."""
        return {"logits": self._classes(teacher_outputs.logits)}

    def _classes(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.num_classes is None else logits[..., : self.num_classes]


def single_label(labels: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The one label field of heads that have one, or None."""
    return next(iter(labels.values())) if len(labels) == 1 else None


def labelled_examples(labels: torch.Tensor) -> torch.Tensor:
    """`True` where a label is gold: not NaN (float regression labels), not -100 and not negative."""
    if labels.is_floating_point():
        return ~torch.isnan(labels)
    return labels >= 0


def _batch_size(inputs: dict, labels) -> int:
    for value in (*inputs.values(), labels):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("The batch holds no tensor: cannot tell its size.")


def _device(inputs: dict, labels) -> torch.device:
    for value in (*inputs.values(), labels):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
