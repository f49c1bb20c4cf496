"""Intermediate-layer alignment: layer maps, width projections and per-layer losses (TinyBERT, DistilBERT, MiniLM).

Layer indices are 1-based transformer-layer indices: `hidden_states[i]` of a Hugging Face model run with
`output_hidden_states=True` is the output of layer `i`, and `hidden_states[0]` is the embedding output, which the
embedding loss handles and which is never part of a layer map. Attentions are 0-based in the model output
(`attentions[i - 1]` belongs to layer `i`).

Every loss is a pure function of tensors. It is computed in float32, whatever dtype its inputs arrive in, and
ignores padding through `attention_mask` `(batch, seq_len)` with 1 for a real token: padded positions may hold any
finite values without changing the loss or its gradients. Each loss is averaged over the real positions of each
example, then over the examples that have a real token, so every example counts equally whatever its length. That
makes the losses means over examples, like the logit losses: a batch split across processes (DDP) or accumulation
steps into equal parts gives exactly the full batch's loss and gradient. A batch without a real token gives 0,
still connected to the inputs' graph.

Shapes: hidden states and values are `(batch, seq_len, hidden_size)`; attentions are the post-softmax probabilities
`(batch, num_heads, seq_len, seq_len)` that eager attention returns (SDPA and flash attention return none).
"""

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

_LAYER_MAP_HELP = (
    "use 'uniform', 'last', or a dict {student_layer: teacher_layer} with 1-based layers "
    "(hidden_states[i] is the output of layer i; the embeddings, index 0, are not part of the map)"
)


def resolve_layer_map(
    layer_map: str | dict[int | str, int | str], num_student_layers: int, num_teacher_layers: int
) -> dict[int, int]:
    """Turn a layer-map specification into a validated `{student_layer: teacher_layer}` dict of 1-based layers.

    Args:
        layer_map: one of
            - `"uniform"` (TinyBERT): student layer `i` ↔ teacher layer `i * k` with `k = num_teacher // num_student`
              when the teacher's depth is a multiple of the student's (12 → 4 gives {1: 3, 2: 6, 3: 9, 4: 12}).
              Otherwise teacher layer `round(i * num_teacher / num_student)` with ties rounded up
              (12 → 5 gives {1: 2, 2: 5, 3: 7, 4: 10, 5: 12}); both rules put the last layers together.
            - `"last"`: `{num_student: num_teacher}`, the last layers only.
            - a dict `{student_layer: teacher_layer}`; keys and values may be ints or digit strings, as JSON and
              the command line give them.
            - a JSON string of such a dict, e.g. `'{"1": 3, "2": 6}'`.
        num_student_layers: the student's number of transformer layers.
        num_teacher_layers: the teacher's number of transformer layers.

    Returns:
        `{student_layer: teacher_layer}`, sorted by student layer.

    Raises:
        ValueError: for an unknown name, ill-formed JSON, a non-integer entry, an empty map, or a layer out of range.
    """
    if isinstance(layer_map, str):
        name = layer_map.strip()
        if name == "uniform":
            return {
                # Integer form of round-half-up(i * T / S); equals i * T // S exactly when S divides T.
                i: max(1, (2 * i * num_teacher_layers + num_student_layers) // (2 * num_student_layers))
                for i in range(1, num_student_layers + 1)
            }
        if name == "last":
            return {num_student_layers: num_teacher_layers}
        try:
            layer_map = json.loads(name)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"layer_map {name!r} is neither 'uniform', 'last' nor a JSON dict ({error}); "
                f"{_LAYER_MAP_HELP}."
            ) from None
    if not isinstance(layer_map, dict):
        raise ValueError(
            f"layer_map must be a str or a dict, got {type(layer_map).__name__} {layer_map!r}; "
            f"{_LAYER_MAP_HELP}."
        )
    if not layer_map:
        raise ValueError(f"layer_map is empty; {_LAYER_MAP_HELP}.")

    resolved = {}
    for student_entry, teacher_entry in layer_map.items():
        student_layer = _as_layer_index(student_entry, student_entry, teacher_entry)
        teacher_layer = _as_layer_index(teacher_entry, student_entry, teacher_entry)
        if not 1 <= student_layer <= num_student_layers:
            raise ValueError(
                f"layer_map entry {student_entry}→{teacher_entry}: student layer {student_layer} is out of range "
                f"1..{num_student_layers} (the student has {num_student_layers} layers); {_LAYER_MAP_HELP}."
            )
        if not 1 <= teacher_layer <= num_teacher_layers:
            raise ValueError(
                f"layer_map entry {student_entry}→{teacher_entry}: teacher layer {teacher_layer} is out of range "
                f"1..{num_teacher_layers} (the teacher has {num_teacher_layers} layers); {_LAYER_MAP_HELP}."
            )
        if student_layer in resolved:
            raise ValueError(f"layer_map maps student layer {student_layer} twice; give each student layer once.")
        resolved[student_layer] = teacher_layer
    return dict(sorted(resolved.items()))


def _as_layer_index(value: object, student_entry: object, teacher_entry: object) -> int:
    """`value` as an int layer index, accepting ints and digit strings but not bools or floats."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(
        f"layer_map entry {student_entry!r}→{teacher_entry!r}: {value!r} is not an integer layer index; "
        f"{_LAYER_MAP_HELP}."
    )


class HiddenStateProjection(nn.Module):
    """Learned linear maps from the student's hidden width to the teacher's, one per aligned student layer (TinyBERT).

    Only needed when the widths differ: with equal widths the hidden-state losses compare the states directly and
    this module should not be created (an extra trainable map would let the student's states drift from the
    teacher's). Layer `0` stands for the embedding output; include it in `layers` when an embedding loss is used.

    The linear maps live in `self.projections`, an `nn.ModuleDict` keyed by `str(layer)`.
    """

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, layers: list[int]):
        super().__init__()
        if not layers:
            raise ValueError(
                "HiddenStateProjection needs at least one layer; pass the student layers of the layer "
                "map, plus 0 for the embeddings."
            )
        self.student_hidden_size = student_hidden_size
        self.teacher_hidden_size = teacher_hidden_size
        self.projections = nn.ModuleDict(
            {str(layer): nn.Linear(student_hidden_size, teacher_hidden_size) for layer in sorted(set(layers))}
        )

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Project the student's `hidden` `(batch, seq_len, student_hidden_size)` of `layer` (0 = embeddings).

        Returns `(batch, seq_len, teacher_hidden_size)` in the projection's dtype.
        """
        key = str(layer)
        if key not in self.projections:
            raise ValueError(
                f"HiddenStateProjection has no projection for layer {layer}; it was built for layers "
                f"{sorted(int(k) for k in self.projections)}. Build it with every aligned student layer."
            )
        projection = self.projections[key]
        return projection(hidden.to(projection.weight.dtype))


def _real_token_mask(attention_mask: torch.Tensor, batch_shape: torch.Size, name: str) -> torch.Tensor:
    """`attention_mask` `(batch, seq_len)` as a bool tensor, after checking it matches `batch_shape`."""
    if attention_mask.shape != batch_shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but {name} needs "
            f"(batch, seq_len) = {tuple(batch_shape)}; pass the batch's attention_mask."
        )
    return attention_mask.bool()


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"Student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} differ in "
            "shape; project the student's states to the teacher's width (HiddenStateProjection) first."
        )


def _mean_over_examples(per_example_sum: torch.Tensor, per_example_count: torch.Tensor) -> torch.Tensor:
    """Mean over examples of `sum / count` `(batch,)`, skipping examples whose count is 0."""
    has_real = per_example_count > 0
    per_example = per_example_sum / per_example_count.clamp_min(1)
    return torch.where(has_real, per_example, 0.0).sum() / has_real.sum().clamp_min(1)


def hidden_mse_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error between hidden states over real tokens and features (TinyBERT).

    Args:
        student_hidden: `(batch, seq_len, hidden_size)`, already projected to the teacher's width if needed.
        teacher_hidden: `(batch, seq_len, hidden_size)`.
        attention_mask: `(batch, seq_len)`, 1 for real tokens.

    Returns:
        float32 scalar: per example, squared errors summed over real tokens / (its real tokens * hidden_size);
        then the mean over examples.
    """
    _check_same_shape(student_hidden, teacher_hidden, "hidden states")
    real = _real_token_mask(attention_mask, student_hidden.shape[:2], "hidden_mse_loss")[..., None]
    # Zeroing padding before the arithmetic keeps garbage (even inf) out of both the loss and its gradient.
    student = torch.where(real, student_hidden.float(), 0.0)
    teacher = torch.where(real, teacher_hidden.float(), 0.0)
    squared_error_sums = (student - teacher).square().sum(dim=(1, 2))
    return _mean_over_examples(squared_error_sums, real.sum(dim=(1, 2)) * student_hidden.shape[-1])


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean of 1 − cos(student, teacher) over real tokens, then examples: DistilBERT's cosine loss with target 1.

    Args:
        student_hidden: `(batch, seq_len, hidden_size)`, already projected to the teacher's width if needed.
        teacher_hidden: `(batch, seq_len, hidden_size)`.
        attention_mask: `(batch, seq_len)`, 1 for real tokens.

    Returns:
        float32 scalar.
    """
    _check_same_shape(student_hidden, teacher_hidden, "hidden states")
    real = _real_token_mask(attention_mask, student_hidden.shape[:2], "hidden_cosine_loss")
    student = torch.where(real[..., None], student_hidden.float(), 0.0)
    teacher = torch.where(real[..., None], teacher_hidden.float(), 0.0)
    cosine_distance = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    return _mean_over_examples(torch.where(real, cosine_distance, 0.0).sum(dim=1), real.sum(dim=1))


def _match_heads(student_attention: torch.Tensor, teacher_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both attentions in float32, averaged over heads to `(batch, 1, seq_len, seq_len)` when head counts differ."""
    student, teacher = student_attention.float(), teacher_attention.float()
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            "Attentions must be (batch, num_heads, seq_len, seq_len), got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}; pass one layer's attentions."
        )
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    if student.shape != teacher.shape:
        raise ValueError(
            f"Student attention {tuple(student_attention.shape)} and teacher attention "
            f"{tuple(teacher_attention.shape)} differ in batch or sequence length; run both models on "
            "the same batch."
        )
    return student, teacher


def attention_mse_loss(
    student_attention: torch.Tensor, teacher_attention: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error between attention probabilities over (real query, real key) pairs (TinyBERT).

    Padded query rows and key columns are excluded, so adding padding to a batch changes nothing. When the head
    counts differ both attentions are averaged over heads to `(batch, 1, seq_len, seq_len)` first.

    Args:
        student_attention: `(batch, student_heads, seq_len, seq_len)` post-softmax probabilities.
        teacher_attention: `(batch, teacher_heads, seq_len, seq_len)` post-softmax probabilities.
        attention_mask: `(batch, seq_len)`, 1 for real tokens.

    Returns:
        float32 scalar: per example, squared error summed over real pairs and heads / (its real pairs * num heads
        compared); then the mean over examples.
    """
    student, teacher = _match_heads(student_attention, teacher_attention)
    real = _real_token_mask(attention_mask, student.shape[:1] + student.shape[2:3], "attention_mse_loss")
    real_pairs = (real[:, :, None] & real[:, None, :])[:, None]
    squared_error_sums = torch.where(real_pairs, student - teacher, 0.0).square().sum(dim=(1, 2, 3))
    return _mean_over_examples(squared_error_sums, real_pairs.sum(dim=(1, 2, 3)) * student.shape[1])


def _row_kl_over_real_keys(
    teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """KL(teacher ∥ student) per real query row, averaged over heads and real query rows, then over examples.

    Log-probabilities are `(batch, heads, seq_len, seq_len)` over keys; `real` is the bool `(batch, seq_len)` mask.
    """
    real_keys = real[:, None, None, :]
    per_key = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)
    per_row = torch.where(real_keys, per_key, 0.0).sum(dim=-1)
    real_rows = real[:, None, :]
    per_example_sums = torch.where(real_rows, per_row, 0.0).sum(dim=(1, 2))
    return _mean_over_examples(per_example_sums, real.sum(dim=1) * per_row.shape[1])


def _log_probs_over_real_keys(probs: torch.Tensor, real: torch.Tensor, floor: float) -> torch.Tensor:
    """Log of `probs` `(batch, heads, seq_len, seq_len)` renormalised over real keys, probabilities floored at
    `floor`.

    Renormalising makes each row a distribution again when attention dropout scaled it or padding was not masked.
    """
    real_probs = torch.where(real[:, None, None, :], probs, 0.0)
    row_sums = real_probs.sum(dim=-1, keepdim=True)
    return real_probs.clamp_min(floor).log() - row_sums.clamp_min(floor).log()


def _probability_floor(attention: torch.Tensor) -> float:
    """The smallest normal number of the maps' dtype: 6e-5 for float16, 1e-38 for bfloat16 and float32.

    The gradient of log p is 1/p, cast back to the maps' dtype; from float16 maps it overflows (inf) once p < 1.5e-5,
    and below 6e-5 float16 has lost precision anyway, so such probabilities count as the floor (zero gradient).
    """
    return torch.finfo(attention.dtype).tiny


def attention_relation_loss(
    student_attention: torch.Tensor, teacher_attention: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """MiniLM self-attention distribution transfer: KL(teacher ∥ student) per query row over real keys.

    Each row is renormalised over real keys (which undoes attention dropout's rescaling), and the KL is averaged
    over heads and real query positions, then over examples. When the head counts differ both attentions are
    averaged over heads first.
    MiniLM applies it to the last layer. Probabilities below the smallest normal number of their dtype count as
    that number, which keeps the gradient of float16 maps finite.

    Args:
        student_attention: `(batch, student_heads, seq_len, seq_len)` post-softmax probabilities.
        teacher_attention: `(batch, teacher_heads, seq_len, seq_len)` post-softmax probabilities.
        attention_mask: `(batch, seq_len)`, 1 for real tokens.

    Returns:
        float32 scalar.
    """
    student, teacher = _match_heads(student_attention, teacher_attention)
    real = _real_token_mask(attention_mask, student.shape[:1] + student.shape[2:3], "attention_relation_loss")
    return _row_kl_over_real_keys(
        _log_probs_over_real_keys(teacher, real, _probability_floor(teacher_attention)),
        _log_probs_over_real_keys(student, real, _probability_floor(student_attention)),
        real,
    )


def _relation_log_probs(values: torch.Tensor, real: torch.Tensor, num_relation_heads: int, who: str) -> torch.Tensor:
    """log softmax(V Vᵀ / sqrt(d_head)) over real keys, `(batch, num_relation_heads, seq_len, seq_len)`."""
    batch_size, seq_len, hidden_size = values.shape
    if hidden_size % num_relation_heads != 0:
        raise ValueError(
            f"value_relation_loss: the {who}'s width {hidden_size} is not divisible by "
            f"num_relation_heads={num_relation_heads}; choose a number of relation heads that divides "
            "both the student's and the teacher's width."
        )
    head_size = hidden_size // num_relation_heads
    heads = torch.where(real[..., None], values.float(), 0.0)
    heads = heads.view(batch_size, seq_len, num_relation_heads, head_size).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_size)
    # A finite fill keeps all-padding rows (which are excluded later) free of NaN.
    scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    return scores.log_softmax(dim=-1)


def value_relation_loss(
    student_values: torch.Tensor,
    teacher_values: torch.Tensor,
    attention_mask: torch.Tensor,
    num_relation_heads: int,
) -> torch.Tensor:
    """MiniLM value-relation transfer (v1) with multi-head relations (v2): KL between token-token relations.

    Each tensor is split into `num_relation_heads` heads; the relation is softmax(V Vᵀ / sqrt(d_head)) over real
    keys, `(batch, num_relation_heads, seq_len, seq_len)`, so student and teacher widths may differ. The loss is
    KL(teacher ∥ student) per real query row, averaged over relation heads and real query positions, then over
    examples.

    Args:
        student_values: `(batch, seq_len, student_width)`: a layer's values, or its input hidden states.
        teacher_values: `(batch, seq_len, teacher_width)`.
        attention_mask: `(batch, seq_len)`, 1 for real tokens.
        num_relation_heads: must divide both widths.

    Returns:
        float32 scalar.
    """
    if student_values.dim() != 3 or teacher_values.dim() != 3:
        raise ValueError(
            "value_relation_loss needs (batch, seq_len, width) tensors, got student "
            f"{tuple(student_values.shape)} and teacher {tuple(teacher_values.shape)}."
        )
    if student_values.shape[:2] != teacher_values.shape[:2]:
        raise ValueError(
            f"Student values {tuple(student_values.shape)} and teacher values "
            f"{tuple(teacher_values.shape)} differ in batch or sequence length; run both models on "
            "the same batch."
        )
    if num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be at least 1, got {num_relation_heads}.")
    real = _real_token_mask(attention_mask, student_values.shape[:2], "value_relation_loss")
    return _row_kl_over_real_keys(
        _relation_log_probs(teacher_values, real, num_relation_heads, "teacher"),
        _relation_log_probs(student_values, real, num_relation_heads, "student"),
        real,
    )
