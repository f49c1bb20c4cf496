"""Capturing the attention values of chosen layers with forward hooks (for MiniLM's value-relation loss).

Hidden states and attention probabilities come from the model's own outputs; the values `V = x W_v + b_v` do not,
so a hook records the output of each layer's value projection. The projection is found by name inside each layer
of the stack: `value` (BERT, RoBERTa, ELECTRA, MiniLM), `v_lin` (DistilBERT) or `v_proj` (most others).
"""

from contextlib import contextmanager

import torch
from torch import nn

from .student_init import find_layer_stack

VALUE_PROJECTION_NAMES = ("value", "v_lin", "v_proj")


def value_projections(model: nn.Module, layers: list[int], who: str) -> dict[int, nn.Module]:
    """`{layer: value projection module}` for the 1-based `layers` of `model`'s layer stack.

    Raises:
        ValueError: when a layer holds no module named one of `VALUE_PROJECTION_NAMES`, or several.
    """
    _, stack = find_layer_stack(model)
    found = {}
    for layer in layers:
        matches = [
            module
            for name, module in stack[layer - 1].named_modules()
            if name.rsplit(".", 1)[-1] in VALUE_PROJECTION_NAMES
        ]
        if len(matches) != 1:
            raise ValueError(
                f"The value-relation loss needs the attention values of the {who}'s layer {layer}, but "
                f"{len(matches)} modules named one of {VALUE_PROJECTION_NAMES} were found in it. Set "
                "value_relation_loss_weight=0 for this architecture."
            )
        found[layer] = matches[0]
    return found


@contextmanager
def capture_outputs(modules: dict[int, nn.Module]):
    """Within the block, `captured[layer]` holds the latest output `(batch, seq_len, width)` of `modules[layer]`."""
    captured: dict[int, torch.Tensor] = {}

    def recorder(layer):
        def hook(_module, _inputs, output):
            captured[layer] = output

        return hook

    handles = [module.register_forward_hook(recorder(layer)) for layer, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
