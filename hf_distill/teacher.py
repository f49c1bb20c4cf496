"""Getting a frozen teacher ready: PEFT adapters merged, attention implementation, placement by accelerate, and
the checks that its outputs can be distilled (logits present, finite).

The teacher is never a submodule of the student: it is not in the optimizer, not wrapped in DDP, and never saved.
"""

import copy
import re

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Bare encoders (BertModel, RobertaModel, ...) return hidden states, no logits.
_BASE_MODEL_CLASSES = frozenset(
    name for names in MODEL_MAPPING_NAMES.values() for name in ((names,) if isinstance(names, str) else names)
)


def named_teachers(teacher_model) -> dict[str, nn.Module]:
    """The teachers by name: `{"": teacher}` for one, `{"0": ..., "1": ...}` for a list, a dict as given.

    The name suffixes each teacher's cache column (`teacher_logits_<name>`); the single teacher keeps the plain name.
    """
    if teacher_model is None:
        return {}
    if isinstance(teacher_model, nn.Module):
        return {"": teacher_model}
    teachers = dict(teacher_model) if isinstance(teacher_model, dict) else dict(enumerate(teacher_model))
    teachers = {str(name): teacher for name, teacher in teachers.items()}
    if not teachers or not all(isinstance(teacher, nn.Module) for teacher in teachers.values()):
        raise ValueError(
            "teacher_model must be a model, a non-empty list of models, or a dict {name: model}; got "
            f"{type(teacher_model).__name__}."
        )
    if any(not re.fullmatch(r"[A-Za-z0-9_-]+", name) for name in teachers):
        raise ValueError(f"Teacher names {list(teachers)} must be identifiers: they name the cache columns.")
    return teachers


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """The teacher in eval mode without gradients; a PEFT model (base + adapter) is merged into a plain model first.

    A merged teacher goes through DeepSpeed, FSDP and `prepare_model` like any model, and runs as fast as the base.
    The merge is in place, as PEFT's `merge_and_unload` does it: the `PeftModel` passed in loses its adapter (a copy
    would double the teacher's memory). Pass `copy.deepcopy(teacher)` to keep the adapter.
    """
    if hasattr(teacher, "merge_and_unload") and hasattr(teacher, "peft_config"):
        logger.warning(
            "The teacher is a PEFT model: merging its adapter into the base weights in place, so the PeftModel "
            "passed as teacher_model no longer has its adapter. Pass copy.deepcopy(teacher) to keep it."
        )
        teacher = teacher.merge_and_unload()
    return teacher.eval().requires_grad_(False)


def use_eager_attention(model: nn.Module, who: str) -> None:
    """Switch `model` to eager attention, the only implementation that returns attention probabilities.

    SDPA and flash attention silently return no attention maps in transformers 5.
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) == "eager":
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"An attention loss needs the {who}'s attention probabilities, but {type(model).__name__} cannot switch to "
            "eager attention: load it with attn_implementation='eager', or set the attention loss weights to 0."
        )
    logger.info(f"Attention losses are on: switching the {who} from {config._attn_implementation} to eager attention.")
    model.set_attn_implementation("eager")


def place_teacher(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Place the frozen teacher for inference under the accelerator's distributed setting.

    - DeepSpeed: its own engine, ZeRO stage 0 (replicated) unless the run uses ZeRO-3 (then sharded, so every rank
      must run the teacher on every step), without optimizer or scheduler sections.
    - FSDP: wrapped with the run's FSDP plugin settings, then eval mode.
    - otherwise (single process, DDP, mixed precision): `accelerator.prepare_model(evaluation_mode=True)`, which
      moves it to the device and adds autocast but never wraps it in DDP.
    The DeepSpeed and FSDP branches follow TRL's `prepare_deepspeed` / `prepare_fsdp` and are untested on GPUs here.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _place_with_deepspeed(teacher, accelerator.state.deepspeed_plugin)
    if accelerator.distributed_type == DistributedType.FSDP:
        return _place_with_fsdp(teacher, accelerator.state.fsdp_plugin, accelerator)
    teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    # prepare_model registers the teacher; Trainer.evaluation_loop prepares the student (autocast included) only
    # while no model is registered, so an evaluate() before train() would otherwise skip mixed precision.
    accelerator._models.remove(teacher)
    return teacher


def _place_with_deepspeed(teacher: nn.Module, deepspeed_plugin) -> nn.Module:
    import deepspeed

    config = copy.deepcopy(deepspeed_plugin.deepspeed_config)
    for section in ("optimizer", "scheduler"):
        config.pop(section, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage") == 3:
        hidden_size = getattr(teacher.config, "hidden_size", None)
        if hidden_size:
            zero.update(
                reduce_bucket_size=hidden_size * hidden_size,
                stage3_param_persistence_threshold=10 * hidden_size,
                stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
            )
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine.eval()


def _place_with_fsdp(teacher: nn.Module, fsdp_plugin, accelerator: Accelerator) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(teacher, FullyShardedDataParallel):
        return teacher.eval()
    fsdp_plugin.set_auto_wrap_policy(teacher)
    wrapped = FullyShardedDataParallel(
        teacher,
        sharding_strategy=fsdp_plugin.sharding_strategy,
        cpu_offload=fsdp_plugin.cpu_offload,
        auto_wrap_policy=fsdp_plugin.auto_wrap_policy,
        mixed_precision=fsdp_plugin.mixed_precision_policy,
        sync_module_states=fsdp_plugin.sync_module_states,
        backward_prefetch=fsdp_plugin.backward_prefetch,
        forward_prefetch=fsdp_plugin.forward_prefetch,
        use_orig_params=fsdp_plugin.use_orig_params,
        limit_all_gathers=fsdp_plugin.limit_all_gathers,
        device_id=accelerator.device,
    )
    return wrapped.eval()


def check_teacher_has_logits(teacher: nn.Module) -> None:
    """Refuse a bare encoder as teacher: its outputs have no `.logits` to distil."""
    base = teacher.get_base_model() if hasattr(teacher, "get_base_model") else teacher
    if type(base).__name__ in _BASE_MODEL_CLASSES:
        raise ValueError(
            f"The teacher is a {type(base).__name__}, a bare encoder whose outputs have no logits to distil. Load it "
            "with a task head, e.g. AutoModelForSequenceClassification.from_pretrained(..., num_labels=...), and "
            "fine-tune it on the task first."
        )


def check_teacher_logits_finite(logits: torch.Tensor, teacher: nn.Module) -> None:
    """Refuse teacher logits `(*batch, num_labels)` holding NaN or +inf, or a row that is all -inf.

    A -inf logit alone is a masked class (probability 0) and is allowed.
    """
    logits = torch.as_tensor(logits)
    broken = torch.isnan(logits).any() | torch.isposinf(logits).any() | torch.isneginf(logits).all(dim=-1).any()
    if broken:
        dtype = next(teacher.parameters()).dtype
        raise ValueError(
            f"The teacher's logits hold NaN or infinite values (teacher dtype {dtype}): its activations overflowed "
            "(float16 ends at 65504), so run the teacher in float32 (teacher.float(), or load it with "
            "dtype=torch.float32); under fp16 mixed precision the teacher runs in float16 too, so cache its logits "
            "in float32 first or train in bf16."
        )
