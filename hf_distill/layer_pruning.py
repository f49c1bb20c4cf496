"""Which teacher layers a shallower student keeps, chosen by measurement (ShortGPT, Minitron depth pruning).

Two measures on a few batches of the training data, both from the teacher alone:

- `block_influence`: ShortGPT's BI of each layer, 1 − the mean cosine similarity of its input and output hidden
  states over the counted tokens; a layer that barely turns the residual stream is a candidate for removal.
- `greedy_layer_removal`: remove, one at a time, the layer whose removal raises the model's own loss (e.g. the LM
  loss, so the perplexity) least, with the layers removed so far already skipped.

A skipped layer passes its input hidden states through (a forward hook), so the measures need no copy of the model.
The chosen layers (`kept_layers`) go to `init_student_from_teacher` as an explicit list.
"""

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .student_init import find_layer_stack


@contextmanager
def skipped_layers(model, layers):
    """Run `model` with the layers of its stack at 0-based indices `layers` replaced by the identity."""
    _, stack = find_layer_stack(model)
    handles = [stack[index].register_forward_hook(_pass_input_through, with_kwargs=True) for index in layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _pass_input_through(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.inference_mode()
def mean_loss(model, batches) -> float:
    """The mean of the model's own loss over `batches` (dicts with `labels`; equal-sized batches weigh alike)."""
    return sum(float(model(**batch).loss) for batch in batches) / len(batches)


@torch.inference_mode()
def block_influence(model, batches) -> list[float]:
    """ShortGPT's block influence of each layer of the stack, `(num_layers,)`: 1 − the mean cosine similarity of
    its input and output hidden states over the tokens whose `attention_mask` is 1 (all when there is none). Read
    by hooks on the layers themselves: `hidden_states[-1]` of many decoders is after the final norm. The model runs
    in eval mode; its mode is restored afterwards."""
    _, stack = find_layer_stack(model)
    similarity, count = torch.zeros(len(stack), dtype=torch.float64), 0
    mask = None

    def measure(index):
        def hook(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(inputs[mask].float(), outputs[mask].float(), dim=-1)
            similarity[index] += cosine.double().sum().cpu()
        return hook

    handles = [layer.register_forward_hook(measure(index), with_kwargs=True) for index, layer in enumerate(stack)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            input_ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
            model(**batch)
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return (1 - similarity / count).tolist()


def most_influential(influence: list[float], num_layers: int) -> list[int]:
    """The 0-based indices of the `num_layers` layers of highest `influence`, in order."""
    return sorted(sorted(range(len(influence)), key=lambda layer: -influence[layer])[:num_layers])


def greedy_layer_removal(model, batches, num_layers: int, show_progress: bool = True,
                         candidates: int | None = None) -> list[dict]:
    """Remove layers one at a time until `num_layers` are left, each time the one whose removal raises the loss on
    `batches` least (the layers removed before it skipped).

    Args:
        candidates: after the first round (every layer), try only this many layers a round: those whose removal
            cost least when last tried. None tries every remaining layer every round (exact greedy).

    Returns:
        One record a removal, in order: `{"layer": 0-based index, "loss": the loss without it and all before it,
        "tried": {layer: loss} of every layer tried that round}`, after a first record `{"layer": None, "loss": the
        full model's loss}`.
    """
    depth = len(find_layer_stack(model)[1])
    if not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers={num_layers} must be between 1 and the model's {depth} layers.")
    was_training = model.training
    model.eval()
    removed, records = [], [{"layer": None, "loss": mean_loss(model, batches)}]
    evaluations = sum(depth - step if step == 0 or candidates is None else min(candidates, depth - step)
                      for step in range(depth - num_layers))
    progress = tqdm(total=evaluations, desc="Layer removal", disable=not show_progress)
    latest = {}  # each layer's loss when last tried
    try:
        while len(removed) < depth - num_layers:
            remaining = [layer for layer in range(depth) if layer not in removed]
            if candidates is not None and latest:  # the cheapest removals when last measured
                remaining = sorted(sorted(remaining, key=latest.get)[:candidates])
            losses = {}
            for layer in remaining:
                with skipped_layers(model, [*removed, layer]):
                    losses[layer] = mean_loss(model, batches)
                progress.update()
            latest.update(losses)
            best = min(losses, key=losses.get)
            removed.append(best)
            records.append({"layer": best, "loss": losses[best], "tried": losses})
    finally:
        progress.close()
        model.train(was_training)
    return records


def kept_layers(num_layers_total: int, removed: list[int]) -> list[int]:
    """The 0-based layers left, in order, once `removed` are gone."""
    gone = set(removed)
    return [layer for layer in range(num_layers_total) if layer not in gone]


MEASURED_LAYER_CHOICES = ("greedy_removal", "block_influence")


def choose_layers(model, batches, num_layers: int, method: str, show_progress: bool = True,
                  candidates: int | None = None) -> dict:
    """The `num_layers` layers of `model` a shallower copy keeps, by `method` (one of `MEASURED_LAYER_CHOICES`)
    measured on `batches`; `candidates` as in `greedy_layer_removal`.

    Returns:
        `{"method", "kept": 0-based layers in order, "removed": in removal order (greedy) or of lowest influence
        first, "losses": the loss after each greedy removal, the full model's first | "influence": per layer}`.
    """
    depth = len(find_layer_stack(model)[1])
    if method == "greedy_removal":
        records = greedy_layer_removal(model, batches, num_layers, show_progress, candidates)
        removed = [record["layer"] for record in records[1:]]
        return {"method": method, "kept": kept_layers(depth, removed), "removed": removed,
                "losses": [record["loss"] for record in records]}
    if method == "block_influence":
        influence = block_influence(model, batches)
        kept = most_influential(influence, num_layers)
        removed = sorted(set(range(depth)) - set(kept), key=lambda layer: influence[layer])
        return {"method": method, "kept": kept, "removed": removed, "influence": influence}
    raise ValueError(f"Unknown layer choice {method!r}: use one of {MEASURED_LAYER_CHOICES}.")
