"""Intermediate-layer distillation for one student–teacher pair: what is paired, what each forward must return, and
the weighted terms (TinyBERT / DistilBERT / MiniLM losses of `alignment.py`) over the paired layers."""

from contextlib import nullcontext

import torch
from torch import nn
from transformers.utils import logging

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
from .hooks import capture_outputs, value_projections
from .teacher import base_model, use_eager_attention
from .wrapper import DistillWrapper

logger = logging.get_logger(__name__)


class LayerAlignment:
    """The settings of `args` checked against both models, with the student wrapped when widths need projections.

    Args:
        student, teacher: the models (the teacher frozen).
        args: the alignment weights, `layer_map`, `relation_heads` and `seed` (the projections' initialisation).

    Attributes:
        layer_map: `{student layer: teacher layer}`, 1-based.
        student: the student, or a `DistillWrapper` of it and the projections (what the trainer trains).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, args: DistillationTrainingArguments):
        student_config, teacher_config = student.config, teacher.config
        self.args = args
        self.layer_map = resolve_layer_map(
            args.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers
        )
        logger.info(f"Aligning student layers with teacher layers {self.layer_map} (1-based).")
        self.num_layers = {"student": student_config.num_hidden_layers, "teacher": teacher_config.num_hidden_layers}
        if self.wants_attentions:
            use_eager_attention(base_model(student), "student")
            use_eager_attention(teacher, "teacher")
        self.relation_heads = self.value_modules = None
        if args.value_relation_loss_weight > 0:
            heads = args.relation_heads or student_config.num_attention_heads
            for who, config in (("student", student_config), ("teacher", teacher_config)):
                if config.hidden_size % heads != 0:
                    raise ValueError(
                        f"DistillationTrainingArguments.relation_heads={heads} does not divide the {who}'s width "
                        f"{config.hidden_size}: set relation_heads to a common divisor of {student_config.hidden_size} "
                        f"and {teacher_config.hidden_size}."
                    )
            self.relation_heads = heads
            # Found once (and now, not at the first step, an architecture without one is refused); wrapping by
            # accelerate keeps these module objects.
            self.value_modules = (
                value_projections(student, list(self.layer_map), "student"),
                value_projections(teacher, list(self.layer_map.values()), "teacher"),
            )
        self.student = self._with_projections(student, student_config.hidden_size, teacher_config.hidden_size)

    @property
    def wants_hidden(self) -> bool:
        args = self.args
        return max(args.hidden_loss_weight, args.embedding_loss_weight, args.hidden_cosine_loss_weight) > 0

    @property
    def wants_attentions(self) -> bool:
        return max(self.args.attention_loss_weight, self.args.attention_relation_loss_weight) > 0

    def _with_projections(self, student: nn.Module, student_width: int, teacher_width: int) -> nn.Module:
        args = self.args
        projected_layers = []
        if args.hidden_loss_weight > 0 or args.hidden_cosine_loss_weight > 0:
            projected_layers += list(self.layer_map)
        if args.embedding_loss_weight > 0:
            projected_layers.append(0)
        if not projected_layers or student_width == teacher_width:
            return student
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # the same projections on every rank and every run
            projections = HiddenStateProjection(student_width, teacher_width, projected_layers)
        logger.info(
            f"Student width {student_width} differs from the teacher's {teacher_width}: training linear projections "
            f"for hidden states {sorted(set(projected_layers))} with the student."
        )
        return DistillWrapper(student, projections)

    def forward(self, student_forward, teacher_forward, attention_mask: torch.Tensor | None):
        """Run both models with the intermediate outputs the losses need.

        Args:
            student_forward, teacher_forward: `**flags -> outputs` (the teacher's under `no_grad`).
            attention_mask: `(batch, seq_len)` real positions, or None when every position counts.

        Returns:
            `(student_outputs, teacher_outputs, {term name: (weight, loss)})`, each loss averaged over the paired
            layers.
        """
        flags = {"output_hidden_states": self.wants_hidden, "output_attentions": self.wants_attentions}
        capture_student = capture_teacher = nullcontext({})
        if self.value_modules is not None:
            capture_student, capture_teacher = (capture_outputs(modules) for modules in self.value_modules)
        with capture_teacher as teacher_values:
            teacher_outputs = teacher_forward(**flags)
        with capture_student as student_values:
            student_outputs = student_forward(**flags)
        if self.wants_attentions:
            for who, outputs in (("student", student_outputs), ("teacher", teacher_outputs)):
                if not outputs.attentions or len(outputs.attentions) != self.num_layers[who]:
                    raise RuntimeError(
                        f"The {who} returned {len(outputs.attentions or ())} attention maps for "
                        f"{self.num_layers[who]} layers: its attention implementation does not return them. Load it "
                        "with attn_implementation='eager'."
                    )
        terms = self.terms(student_outputs, teacher_outputs, student_values, teacher_values, attention_mask)
        return student_outputs, teacher_outputs, terms

    def terms(self, student_outputs, teacher_outputs, student_values: dict, teacher_values: dict,
              attention_mask: torch.Tensor | None) -> dict[str, tuple[float, torch.Tensor]]:
        """`{term name: (weight, loss)}` of every term with a weight > 0, each averaged over the paired layers."""
        args = self.args
        mask = attention_mask
        if mask is None:  # every position counts: tokens without padding, or image patches
            states = (student_outputs.hidden_states or student_outputs.attentions)[0]
            mask = torch.ones(states.shape[0], states.shape[-2] if states.dim() == 4 else states.shape[1],
                              dtype=torch.long, device=states.device)
        pairs = list(self.layer_map.items())

        def over_pairs(loss_fn, student_tensors, teacher_tensors, offset=0):
            losses = [loss_fn(student_tensors[s - offset], teacher_tensors[t - offset], mask) for s, t in pairs]
            return torch.stack(losses).mean()

        weighted = {
            "loss_hidden": (args.hidden_loss_weight, lambda: over_pairs(
                hidden_mse_loss, student_outputs.hidden_states, teacher_outputs.hidden_states)),
            "loss_embedding": (args.embedding_loss_weight, lambda: hidden_mse_loss(
                student_outputs.hidden_states[0], teacher_outputs.hidden_states[0], mask)),
            "loss_hidden_cosine": (args.hidden_cosine_loss_weight, lambda: over_pairs(
                hidden_cosine_loss, student_outputs.hidden_states, teacher_outputs.hidden_states)),
            "loss_attention": (args.attention_loss_weight, lambda: over_pairs(
                attention_mse_loss, student_outputs.attentions, teacher_outputs.attentions, offset=1)),
            "loss_attention_relation": (args.attention_relation_loss_weight, lambda: over_pairs(
                attention_relation_loss, student_outputs.attentions, teacher_outputs.attentions, offset=1)),
            "loss_value_relation": (args.value_relation_loss_weight, lambda: over_pairs(
                lambda s, t, m: value_relation_loss(s, t, m, self.relation_heads), student_values, teacher_values)),
        }
        return {name: (weight, compute()) for name, (weight, compute) in weighted.items() if weight > 0}
