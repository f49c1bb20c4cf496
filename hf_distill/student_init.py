"""Student initialisation from a subset of the teacher's layers (DistilBERT, TinyBERT practice).

The student is the teacher's architecture with fewer transformer layers: every weight outside the layer stack
(embeddings, pooler, heads, a causal LM's final norm and output embeddings) is copied, and each student layer is a
copy of one chosen teacher layer. A narrower student (smaller hidden size) cannot be initialised this way and is out
of scope.

Layer indices here are 0-based positions in the layer stack (`model.bert.encoder.layer[i]`), unlike the 1-based
`hidden_states` indices of `hf_distill.alignment`.
"""

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

_STRATEGY_HELP = "use 'uniform', 'first', or an explicit list of 0-based teacher layer indices, one per student layer"


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the model's stack of transformer layers without architecture-specific names.

    The stack is the outermost `nn.ModuleList` whose length equals `config.num_hidden_layers` (which DistilBERT's
    config maps to `n_layers`).

    Returns:
        The stack's dotted attribute path (e.g. `"bert.encoder.layer"`, `"distilbert.transformer.layer"`) and the
        `nn.ModuleList` itself.

    Raises:
        ValueError: when no module list, or more than one, has that length.
    """
    num_layers = model.config.num_hidden_layers
    candidates = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    # A list nested inside another candidate (e.g. per-head modules when num_heads == num_layers) is not the stack.
    outermost = [
        (path, module)
        for path, module in candidates
        if not any(path.startswith(other + ".") for other, _ in candidates if other != path)
    ]
    if len(outermost) != 1:
        found = ", ".join(path for path, _ in outermost) or "none"
        raise ValueError(
            f"{type(model).__name__}: expected exactly one nn.ModuleList of config.num_hidden_layers={num_layers} "
            f"transformer layers, found {found}. Student initialisation from teacher layers supports models with a "
            "single layer stack; initialise this student yourself and pass it to the trainer."
        )
    return outermost[0]


def select_teacher_layers(
    num_teacher_layers: int, num_student_layers: int, strategy: str | list[int] = "uniform"
) -> list[int]:
    """The 0-based teacher layers whose weights initialise student layers 0..num_student_layers-1.

    Args:
        num_teacher_layers: T, the teacher's depth.
        num_student_layers: S, the student's depth, 1 <= S <= T.
        strategy:
            - `"uniform"`: student layer j copies teacher layer round(j * (T - 1) / (S - 1)), ties rounded up, so
              the first and last teacher layers are both kept (12 → 6 gives [0, 2, 4, 7, 9, 11], DistilBERT's
              choice; 6 → 3 gives [0, 3, 5]). With S == 1 the last teacher layer, [T - 1].
            - `"first"`: [0, 1, ..., S - 1].
            - a list of S teacher indices in 0..T-1, used as given (order and repeats are allowed).

    Raises:
        ValueError: for S outside 1..T, an unknown strategy, or an invalid list.
    """
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ValueError(
            f"num_student_layers={num_student_layers} must be between 1 and the teacher's {num_teacher_layers} "
            "layers: the student copies a subset of the teacher's layers."
        )
    if isinstance(strategy, str):
        if strategy == "uniform":
            if num_student_layers == 1:
                return [num_teacher_layers - 1]
            span, steps = num_teacher_layers - 1, num_student_layers - 1
            # Integer round-half-up of j * span / steps, free of float and banker's-rounding surprises.
            return [(2 * j * span + steps) // (2 * steps) for j in range(num_student_layers)]
        if strategy == "first":
            return list(range(num_student_layers))
        raise ValueError(f"Unknown teacher-layer strategy {strategy!r}; {_STRATEGY_HELP}.")
    layers = list(strategy)
    if len(layers) != num_student_layers:
        raise ValueError(
            f"Teacher layers {layers} give {len(layers)} layers but the student has {num_student_layers}; "
            f"{_STRATEGY_HELP}."
        )
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_teacher_layers:
            raise ValueError(
                f"Teacher layer {layer!r} in {layers} is not an index in 0..{num_teacher_layers - 1} (the teacher "
                f"has {num_teacher_layers} layers); {_STRATEGY_HELP}."
            )
    return layers


def init_student_from_teacher(
    teacher: PreTrainedModel, num_student_layers: int, layers: str | list[int] = "uniform"
) -> PreTrainedModel:
    """Build a shallower copy of `teacher` whose layers are copies of chosen teacher layers.

    The student has the teacher's class, config (with `num_hidden_layers` set to `num_student_layers`), dtype,
    device and train/eval mode. Everything outside the layer stack is copied by state-dict key; student layer j
    copies teacher layer `select_teacher_layers(...)[j]`. The chosen layers are recorded in the student's config
    as `hf_distill_init_layers` (0-based), so they are saved in `config.json`. Per-layer config lists (Qwen2's
    `layer_types`) follow the chosen layers.

    Only the depth changes: a student narrower than the teacher cannot be initialised from its weights.

    Args:
        teacher: a `PreTrainedModel` with a single layer stack: encoders (BERT, RoBERTa, DistilBERT, ELECTRA, ...)
            and decoder-only LMs (Llama, Qwen2, GPT-2, ...). Tied input and output embeddings stay tied.
        num_student_layers: the student's depth, 1..teacher depth.
        layers: `"uniform"`, `"first"` or an explicit list; see `select_teacher_layers`.

    Raises:
        ValueError: for an invalid depth or layer choice, or when a student weight has no teacher counterpart.
    """
    stack_path, teacher_stack = find_layer_stack(teacher)
    teacher_layers = select_teacher_layers(len(teacher_stack), num_student_layers, layers)

    student_config = copy.deepcopy(teacher.config)
    student_config.num_hidden_layers = num_student_layers
    for name, values in _per_layer_settings(teacher.config, len(teacher_stack)).items():
        setattr(student_config, name, [values[layer] for layer in teacher_layers])
    student_config.hf_distill_init_layers = teacher_layers
    student = type(teacher)(student_config).to(device=teacher.device, dtype=teacher.dtype)

    teacher_state = teacher.state_dict()
    stack_prefix = stack_path + "."
    student_state = {}
    for key in student.state_dict():
        teacher_key = key
        if key.startswith(stack_prefix):
            student_layer, rest = key[len(stack_prefix):].split(".", 1)
            teacher_key = f"{stack_prefix}{teacher_layers[int(student_layer)]}.{rest}"
        if teacher_key not in teacher_state:
            raise ValueError(
                f"Student weight {key!r} has no teacher counterpart {teacher_key!r}: the {type(teacher).__name__} "
                "teacher and its shallower copy differ in more than depth. Initialise this student yourself."
            )
        student_state[key] = teacher_state[teacher_key]
    with torch.no_grad():
        student.load_state_dict(student_state, strict=True)
    student.train(teacher.training)
    return student


def _per_layer_settings(config, num_layers: int) -> dict[str, list]:
    """Config lists with one entry per layer (`layer_types` of Qwen2, Gemma, ...: sliding or full attention), which
    the student takes from its chosen teacher layers rather than keeping the teacher's first entries."""
    return {
        name: list(value)
        for name, value in config.to_dict().items()
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == num_layers
    }
