"""Vocabulary-sized losses that never hold the logits: the last hidden states and the output layer, projected and
reduced one chunk of rows at a time.

A causal or seq2seq LM's logits are `(rows, vocabulary)`: at 152k entries, 1,024 rows are 622 MB in float32, and a
distillation step would hold several such tensors (student logits, their gradient, the teacher's, both softmaxes).
Here the model's forward runs with its output layer skipped (`capture_output_layer_input`), and
`fused_vocabulary_loss` projects `(chunk, hidden)` rows through the output layer, computes the per-row terms of the
unfused path on that chunk, and writes the gradients of the hidden states and the output layer in the forward pass
(as Liger Kernel's chunked losses do): no `(rows, vocabulary)` tensor exists outside one chunk.
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from .heads import TopKTarget, Units

logger = logging.get_logger(__name__)

# Logits per fused chunk (rows x classes): each float32 intermediate of a chunk is 64 MiB; at 152k classes a chunk
# is 110 rows, enough for the matmuls to run at full speed on CPU.
FUSED_CHUNK_ELEMENTS = 2**24
# Rows on which a model's output layer is checked against its own logits, at its first batch.
CHECKED_ROWS = 16


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`a @ b` with both in `dtype` (AMX / tensor cores for bfloat16), returned in float32."""
    with torch.autocast(a.device.type, enabled=False):
        return (a.to(dtype) @ b.to(dtype)).float()


@dataclass
class OutputLayer:
    """How a model turns last hidden states `(rows, hidden)` into logits: `softcap(scale * (h @ weight.T + bias))`
    (Cohere's `logit_scale`, Granite's `1 / logits_scaling`, Falcon-H1's `lm_head_multiplier`, Gemma's
    `final_logit_softcapping`, BART's `final_logits_bias`), over the first `num_classes` rows of `weight`."""

    weight: torch.Tensor  # (vocabulary, hidden)
    bias: torch.Tensor | None = None  # (vocabulary,)
    scale: float = 1.0
    softcap: float | None = None
    num_classes: int | None = None

    def project(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32):
        """Float32 logits before the transform, `(rows, classes)`; `weight` and `bias` default to the layer's. The
        matmul runs in `dtype` (the autocast dtype the model's own output layer ran in), the rest in float32."""
        weight = self.classes(self.weight) if weight is None else weight
        if bias is None and self.bias is not None:
            bias = self.classes(self.bias).float()
        logits = matmul(hidden, weight.T, dtype)
        return logits if bias is None else logits + bias

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own transform of the projected logits (differentiable)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, hidden: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float32 logits `(rows, classes)` of hidden states `(rows, hidden)`, the matmul in `dtype`."""
        return self.transform(self.project(hidden, dtype=dtype))

    def classes(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.num_classes is None else tensor[: self.num_classes]


def output_layer_of(model: nn.Module, num_classes: int | None = None) -> OutputLayer | None:
    """The output layer of a transformers LM (not a PEFT wrapper), or None when it is not a plain `nn.Linear` (a
    LoRA adapter on it, a quantised layer): those take the unfused path."""
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(linear) is not nn.Linear:
        return None
    config = model.config
    scale = float(getattr(model, "logit_scale", 1.0) or 1.0)  # Cohere
    if getattr(config, "logits_scaling", None):  # Granite
        scale /= float(config.logits_scaling)
    inner = getattr(model, "model", None)
    if getattr(inner, "lm_head_multiplier", None) is not None:  # Falcon-H1
        scale *= float(inner.lm_head_multiplier)
    bias = linear.bias
    final_bias = getattr(model, "final_logits_bias", None)  # BART, Marian, Pegasus
    if isinstance(final_bias, torch.Tensor):
        bias = final_bias.reshape(-1) if bias is None else bias + final_bias.reshape(-1)
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputLayer(linear.weight, bias, scale, float(softcap) if softcap else None, num_classes)


@contextmanager
def capture_output_layer_input(model: nn.Module, skip: bool):
    """Within the block, `captured[0]` is the input of `model`'s output layer at its latest forward, `(rows, hidden)`
    or `(batch, seq_len, hidden)`, and `captured[1]` the dtype that layer's matmul runs in there (the autocast
    dtype inside a forward that accelerate wraps in autocast, else float32). With `skip=True` the layer is given zero
    rows instead, so the model's logits are empty and never computed."""
    captured: list = []

    def hook(_module, args):
        device = args[0].device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        captured[:] = [args[0], dtype]
        if skip:
            return (args[0][..., :0, :],)
        return None

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@dataclass
class ProjectedRows:
    """A vocabulary-sized view that is not materialised: hidden states `(rows, hidden)` and their output layer."""

    hidden: torch.Tensor
    layer: OutputLayer
    dtype: torch.dtype = torch.float32  # of the output layer's matmul (the model's autocast dtype)

    def logits(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.layer.logits(self.hidden[start:stop], self.dtype)


def target_rows(target, start: int, stop: int):
    """Rows `start:stop` of a teacher target: dense logits, a `TopKTarget`, or `ProjectedRows` (projected now)."""
    if isinstance(target, ProjectedRows):
        return target.logits(start, stop)
    if isinstance(target, TopKTarget):
        return TopKTarget(target.ids[start:stop], target.log_probs[start:stop], target.rest_probs[start:stop])
    return target[start:stop]


def chunk_rows(num_classes: int) -> int:
    return max(1, FUSED_CHUNK_ELEMENTS // max(1, num_classes))


class _FusedVocabularyLoss(torch.autograd.Function):
    """`sum(kd_weights * kd + ce_weights * ce)` over rows, with the gradients of the hidden states, the output
    weight and bias computed chunk by chunk in the forward pass and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, layer, dtype, target, label_targets, kd_weights, ce_weights, row_terms,
                rows_per_chunk, needs_grad, on_teacher_chunk):
        rows = hidden.shape[0]
        classes_weight = layer.classes(weight).detach().float()
        matmul_weight = classes_weight.to(dtype)  # cast once, not per chunk
        classes_bias = None if bias is None else layer.classes(bias).detach().float()
        num_classes = classes_weight.shape[0]
        kd_rows = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        ce_rows, student_top = torch.zeros_like(kd_rows), torch.zeros(rows, dtype=torch.long, device=hidden.device)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_grad else None
        grad_weight = torch.zeros_like(classes_weight) if needs_grad else None
        grad_bias = torch.zeros(num_classes, dtype=torch.float32, device=hidden.device) if needs_grad else None
        for start in range(0, rows, rows_per_chunk):
            stop = min(rows, start + rows_per_chunk)
            chunk_hidden = hidden[start:stop].detach().float()
            teacher = target_rows(target, start, stop)
            if on_teacher_chunk is not None:
                on_teacher_chunk(teacher)
            teacher = (teacher.ids, teacher.log_probs, teacher.rest_probs) if isinstance(teacher, TopKTarget) else (
                teacher,)
            with torch.enable_grad():
                projected = layer.project(chunk_hidden, matmul_weight, classes_bias, dtype).requires_grad_(needs_grad)
                logits = layer.transform(projected)
                terms = row_terms(logits, label_targets[start:stop], *teacher)
                if needs_grad:
                    total = (terms[:, 0] * kd_weights[start:stop]).sum() + (terms[:, 1] * ce_weights[start:stop]).sum()
                    (grad_logits,) = torch.autograd.grad(total, projected)
            kd_rows[start:stop], ce_rows[start:stop] = terms[:, 0].detach(), terms[:, 1].detach()
            if not needs_grad:  # evaluation: the top-1 agreement with the teacher is logged
                student_top[start:stop] = logits.argmax(-1)
            if needs_grad:
                grad_hidden[start:stop] = matmul(grad_logits, matmul_weight, dtype)
                if dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, chunk_hidden)
                else:
                    grad_weight += matmul(grad_logits.T, chunk_hidden, dtype)
                grad_bias += grad_logits.sum(0)
        total = (kd_rows * kd_weights).sum() + (ce_rows * ce_weights).sum()
        if needs_grad:
            if num_classes < weight.shape[0]:  # padded embedding rows are not compared: no gradient
                grad_weight = torch.cat([grad_weight, grad_weight.new_zeros(weight.shape[0] - num_classes,
                                                                            weight.shape[1])])
                grad_bias = torch.cat([grad_bias, grad_bias.new_zeros(weight.shape[0] - num_classes)])
            # Not saved tensors: backward scales them in place, once.
            ctx.grads = (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                         None if bias is None else grad_bias.to(bias.dtype))
        ctx.mark_non_differentiable(kd_rows, ce_rows, student_top)
        return total, kd_rows, ce_rows, student_top

    @staticmethod
    def backward(ctx, grad_total, *_):
        grads, ctx.grads = ctx.grads, None
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_total.to(grad.dtype))
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def fused_vocabulary_loss(
    student: ProjectedRows,
    target,
    label_targets: torch.Tensor,
    kd_weights: torch.Tensor,
    ce_weights: torch.Tensor,
    row_terms: Callable,
    rows_per_chunk: int | None = None,
    on_teacher_chunk: Callable | None = None,
):
    """The weighted distillation and label terms of vocabulary-sized rows, without their `(rows, classes)` logits.

    Args:
        student: the student's hidden states at the counted rows and its output layer.
        target: the teacher's rows: `ProjectedRows` (an online teacher, projected chunk by chunk under no grad), a
            `TopKTarget`, or dense `(rows, classes)` logits.
        label_targets: `(rows,)` gold next tokens, -100 where unlabelled.
        kd_weights, ce_weights: `(rows,)` each row's coefficient in the total (its weight over the step's total).
        row_terms: `(logits (chunk, classes), targets (chunk,), *teacher chunk) -> (chunk, 2)` divergence and label
            loss per row: the unfused path's own function, so both paths compute the same values.
        rows_per_chunk: rows projected at once (default: `FUSED_CHUNK_ELEMENTS // classes`).
        on_teacher_chunk: called with each chunk of the teacher's rows (a finiteness check).

    Returns:
        `(total, kd_rows, ce_rows, student_top1)`: the scalar `sum(kd_weights * kd + ce_weights * ce)`, which carries
        the gradient of the hidden states and the output layer; the per-row terms `(rows,)` (detached, for the logs)
        and the student's top-1 class per row.
    """
    layer = student.layer
    num_classes = layer.classes(layer.weight).shape[0]
    needs_grad = torch.is_grad_enabled() and (student.hidden.requires_grad or layer.weight.requires_grad)
    with torch.no_grad():
        kd_weights, ce_weights = kd_weights.detach().float(), ce_weights.detach().float()
    return _FusedVocabularyLoss.apply(
        student.hidden, layer.weight, layer.bias, layer, student.dtype, target, label_targets, kd_weights, ce_weights,
        row_terms,
        rows_per_chunk or chunk_rows(num_classes), needs_grad, on_teacher_chunk,
    )


class FusedForward:
    """Runs one model (the student, or an online teacher) for a fused vocabulary loss.

    At its first batch the model runs once more, without gradients, on the example with the most counted rows (its
    first `CHECKED_ROWS` counted rows where the model takes `logits_to_keep`), and the output layer's transform
    (`output_layer_of`) is checked against the model's own logits there; from then on
    the model runs with its output layer skipped and its view is `ProjectedRows`. An output layer that is not
    recognised, or a mismatch, keeps the unfused path, with one log line: never a silently different loss.

    Args:
        who: `"student"` or `"teacher ..."`, for the log lines.
        model: the transformers model (no PEFT or DDP wrapper) whose output layer is read.
        num_classes: classes compared (padded embedding rows excluded), or None for all.
    """

    def __init__(self, who: str, model: nn.Module, num_classes: int | None):
        self.who, self.model_class = who, type(model).__name__
        self.layer = output_layer_of(model, num_classes)
        self.path = "unverified" if self.layer is not None else "unfused"
        if self.layer is None:
            logger.warning(f"The {who}'s output layer ({type(model.get_output_embeddings()).__name__}) is not a plain "
                           "nn.Linear (a LoRA adapter or a quantised layer?): its vocabulary loss is not fused.")

    def __call__(self, model: nn.Module, forward: Callable, batch: dict, units: Units):
        """`(outputs, ProjectedRows or None)` of `forward(batch)`, which runs `model` on the batch's tensors (its
        `logits_to_keep` mask included); None: use `outputs.logits`."""
        if self.path == "unverified":
            self._check(model, forward, batch, units)
        if self.path == "unfused":
            return forward(batch), None
        with capture_output_layer_input(model, skip=True) as captured:
            outputs = forward(batch)
        hidden = captured[0] if captured[0].dim() == 2 else captured[0][units.kd]
        return outputs, ProjectedRows(hidden, self.layer, captured[1])

    def _check(self, model: nn.Module, forward: Callable, batch: dict, units: Units) -> None:
        counted = units.kd.reshape(units.kd.shape[0], -1).sum(1)
        if not bool(counted.any()):
            return  # nothing to compare on: the next batch checks
        example = int(counted.argmax())
        one = {name: value[example:example + 1] if isinstance(value, torch.Tensor) else value
               for name, value in batch.items()}
        keep = one.get("logits_to_keep")
        if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:  # a few rows: the check holds no big logits
            kept = keep.flatten().nonzero().squeeze(-1)[:CHECKED_ROWS]
            one["logits_to_keep"] = torch.zeros_like(keep).flatten().index_fill_(0, kept, True).view_as(keep)
        with torch.no_grad(), capture_output_layer_input(model, skip=False) as captured:
            logits = forward(one).logits
        hidden = captured[0].reshape(-1, captured[0].shape[-1])
        logits = logits.reshape(-1, logits.shape[-1])
        with torch.no_grad():
            expected = self.layer.classes(logits.T).T.float()
            projected = self.layer.logits(hidden, captured[1])
        # float32 models agree to rounding; bf16/fp16 ones, or any under autocast, to that precision.
        exact = logits.dtype == torch.float32 and captured[1] == torch.float32
        tolerance = 1e-4 if exact else 3e-2
        scale = expected.abs().max().item() + 1.0
        if expected.shape == projected.shape and (expected - projected).abs().max().item() <= tolerance * scale:
            self.path = "fused"
            logger.info(f"Fused vocabulary loss for the {self.who} ({self.model_class}): its logits are projected "
                        "a chunk of rows at a time and never held whole.")
        else:
            self.path = "unfused"
            logger.warning(f"The {self.who}'s output layer ({self.model_class}) applies a transform hf_distill does "
                           "not recognise (its logits differ from hidden states x output weight): its vocabulary "
                           "loss is not fused.")
