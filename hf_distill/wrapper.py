"""`DistillWrapper`: the student plus the learned width projections of intermediate-layer distillation.

The wrapper exists only when projections do (student and teacher widths differ and a hidden-state loss is on), so
that DDP, DeepSpeed and FSDP own the projections like any student parameter: they are in the optimizer, their
gradients are synchronised, and they are checkpointed. `DistillationTrainer` exports the student alone.
"""

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from .alignment import HiddenStateProjection

PROJECTIONS_FILE = "_distill_projections.safetensors"


@dataclass
class DistillWrapperOutput(ModelOutput):
    """The student's outputs, with the hidden states of projected layers in the teacher's width.

    DDP rebuilds dataclass outputs field by field, so the wrapper returns its own class declaring every field.
    """

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class DistillWrapper(nn.Module):
    """`student` plus `projections`; attributes it does not define are the student's (`config`, `model_tags`, ...).

    Args:
        student: the student model (a `PreTrainedModel` or a PEFT model).
        projections: maps the student's hidden states `(batch, seq_len, student_width)` of each listed layer
            (0 = embeddings) to the teacher's width.
    """

    def __init__(self, student: nn.Module, projections: HiddenStateProjection):
        super().__init__()
        self.student = student
        self.projections = projections

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("student"), name)

    def forward(self, **inputs) -> DistillWrapperOutput:
        """Run the student on `inputs`; with `output_hidden_states=True`, project the layers that have a projection."""
        outputs = self.student(**inputs)
        hidden_states = outputs.hidden_states
        if hidden_states:
            hidden_states = tuple(
                self.projections(layer, state) if str(layer) in self.projections.projections else state
                for layer, state in enumerate(hidden_states)
            )
        return DistillWrapperOutput(
            logits=outputs.logits, hidden_states=hidden_states, attentions=outputs.attentions or None
        )

    def save_projections(self, checkpoint_dir: str) -> None:
        """Write the projections to `<checkpoint_dir>/_distill_projections.safetensors` (the student is saved by
        `Trainer`)."""
        os.makedirs(checkpoint_dir, exist_ok=True)
        state = {name: value.detach().contiguous() for name, value in self.projections.state_dict().items()}
        save_file(state, os.path.join(checkpoint_dir, PROJECTIONS_FILE))

    def load_projections(self, checkpoint_dir: str) -> None:
        """Read back what `save_projections` wrote; a checkpoint without it is refused (resuming would restart the
        projections from scratch)."""
        path = os.path.join(checkpoint_dir, PROJECTIONS_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"The checkpoint {checkpoint_dir} has no {PROJECTIONS_FILE}: its save was interrupted, or it was not "
                "written by a DistillationTrainer with the same width projections, so resuming would restart them "
                "from scratch. Resume from an earlier, complete checkpoint of this run (resume_from_checkpoint=True "
                "finds it), or start a new run."
            )
        self.projections.load_state_dict(load_file(path, device=str(next(self.parameters()).device)))
