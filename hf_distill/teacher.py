"""Getting frozen teachers ready: several teachers by name, PEFT adapters merged, attention implementation,
placement by accelerate, the checks that their outputs can be distilled (logits present, finite), and their
compatibility with the student (task head, label space, vocabulary).

The teacher is never a submodule of the student: it is not in the optimizer, not wrapped in DDP, and never saved.
"""

import contextlib
import copy
import re

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
from transformers.utils import logging

from .heads import TOPK, DistillationHead, head_for

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
    - FSDP2: sharded with `fully_shard` as accelerate shards the student (the run's plugin: auto-wrap policy, offload,
      mixed precision, mesh, rank 0's weights under `cpu_ram_efficient_loading`), resharded after each forward
      unless the plugin keeps parameters gathered (`reshard_after_forward=False`).
    - FSDP1: wrapped in `FullyShardedDataParallel` with the run's plugin settings.
    - otherwise (single process, DDP, mixed precision): `accelerator.prepare_model(evaluation_mode=True)`, which
      moves it to the device and adds autocast but never wraps it in DDP.
    A teacher the engine has already wrapped (a `DeepSpeedEngine`, an FSDP module) is kept as it is. The DeepSpeed and
    FSDP branches follow TRL's `prepare_deepspeed` / `prepare_fsdp`; they are tested on CPU (2 processes, gloo).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _place_with_deepspeed(teacher, accelerator.state.deepspeed_plugin)
    if accelerator.distributed_type == DistributedType.FSDP:
        return _place_with_fsdp(teacher, accelerator)
    teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    # prepare_model registers the teacher; Trainer.evaluation_loop prepares the student (autocast included) only
    # while no model is registered, so an evaluate() before train() would otherwise skip mixed precision.
    accelerator._models.remove(teacher)
    return teacher


def engine_name(accelerator: Accelerator) -> str:
    """The run's engine in words, for messages: "DeepSpeed ZeRO-3", "FSDP2", "DDP", "a single-process run"."""
    distributed_type = accelerator.distributed_type
    if distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if distributed_type == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if distributed_type == DistributedType.NO:
        return "a single-process run"
    return "DDP"


def check_teacher_placement(teacher: nn.Module, accelerator: Accelerator) -> None:
    """Refuse a teacher that the run's engine cannot place, naming the engine and the fix.

    Refused: a teacher wrapped in `DataParallel` or DDP; parameters on the meta device, except outside the main
    process under FSDP's `cpu_ram_efficient_loading` (rank 0's weights are sent there); with several processes,
    parameters spread over devices by a `device_map`, or on a device other than the CPU and the process's own; FSDP1
    on an indexed CPU device, which its `device_id` check rejects.
    """
    engine = engine_name(accelerator)
    if isinstance(teacher, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError(
            f"The teacher is wrapped in {type(teacher).__name__}, which {engine} cannot place (a frozen teacher has no "
            f"gradients to synchronise): pass the bare model, teacher.module; the trainer places it for {engine}."
        )
    fsdp_plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    sent_from_rank_0 = fsdp_plugin is not None and fsdp_plugin.cpu_ram_efficient_loading
    devices = {parameter.device for parameter in teacher.parameters()}
    if torch.device("meta") in devices and not (sent_from_rank_0 and not accelerator.is_main_process):
        raise ValueError(
            f"The teacher's parameters are on the meta device (not loaded), which {engine} cannot place: load its "
            "weights (from_pretrained, or to_empty() and load_state_dict)"
            + (" in the main process at least: FSDP sends them to the others." if sent_from_rank_0 else ".")
        )
    if accelerator.distributed_type == DistributedType.NO:
        return  # prepare_model moves a teacher on one device, and keeps one spread by a device_map as it is
    device_map = set((getattr(teacher, "hf_device_map", None) or {}).values())
    if len(device_map) > 1:
        raise ValueError(
            f"The teacher is spread over the devices {sorted(map(str, device_map))} by its device_map, which {engine} "
            "cannot shard or replicate: load it without device_map and let the trainer place it, or run in one "
            "process, which keeps a device_map teacher as it is."
        )
    device = accelerator.device
    foreign = {other for other in devices if other.type not in ("cpu", "meta") and other != device}
    if foreign:
        raise ValueError(
            f"The teacher's parameters are on {sorted(map(str, foreign))} but this {engine} process computes on "
            f"{device}: load the teacher on the CPU (the trainer moves it) or on {device}."
        )
    if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 1 and device.type == "cpu" and device.index is not None:
        raise ValueError(
            f"FSDP1 would wrap the teacher with device_id={device}, which it rejects on CPU (it computes on the "
            "unindexed 'cpu'): set ACCELERATE_TORCH_DEVICE=cpu in the launch environment, or use FSDP2 "
            "(--fsdp_version 2)."
        )


def _place_with_deepspeed(teacher: nn.Module, deepspeed_plugin) -> nn.Module:
    import deepspeed

    if isinstance(teacher, deepspeed.DeepSpeedEngine):
        teacher.eval()
        return teacher
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
    engine.eval()  # returns None, unlike nn.Module.eval()
    return engine


def _place_with_fsdp(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(teacher, (FullyShardedDataParallel, FSDPModule)):
        return teacher.eval()
    fsdp_plugin = accelerator.state.fsdp_plugin
    with _auto_wrap_policy_for(teacher, fsdp_plugin):
        if fsdp_plugin.fsdp_version == 2:
            from accelerate.utils import fsdp2_prepare_model

            teacher = fsdp2_prepare_model(accelerator, teacher)
            # accelerate keeps the root and the output layer gathered after forward, for the backward that follows;
            # a teacher has no backward, so they would stay gathered for the whole run.
            teacher.set_reshard_after_forward(fsdp_plugin.reshard_after_forward)
        else:
            teacher = FullyShardedDataParallel(
                teacher,
                sharding_strategy=fsdp_plugin.sharding_strategy or fsdp_plugin.reshard_after_forward,
                cpu_offload=fsdp_plugin.cpu_offload,
                auto_wrap_policy=fsdp_plugin.auto_wrap_policy,
                mixed_precision=fsdp_plugin.mixed_precision_policy,
                sync_module_states=fsdp_plugin.sync_module_states,
                param_init_fn=fsdp_plugin.param_init_fn,
                backward_prefetch=fsdp_plugin.backward_prefetch,
                forward_prefetch=fsdp_plugin.forward_prefetch,
                use_orig_params=fsdp_plugin.use_orig_params,
                limit_all_gathers=fsdp_plugin.limit_all_gathers,
                device_id=accelerator.device,
            )
    return teacher.eval()


@contextlib.contextmanager
def _auto_wrap_policy_for(teacher: nn.Module, fsdp_plugin):
    """The FSDP plugin's auto-wrap policy bound to `teacher` while it is wrapped; the student's afterwards.

    Wrapping the student bound the policy to the student's layer classes. The teacher gets the same kind of policy
    bound to its own: the classes the plugin names when the teacher has them, else its `_no_split_modules`.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    policy, layer_classes = fsdp_plugin.auto_wrap_policy, fsdp_plugin.transformer_cls_names_to_wrap
    if getattr(policy, "func", None) in (transformer_auto_wrap_policy, size_based_auto_wrap_policy):
        fsdp_plugin.auto_wrap_policy = policy.func
    if layer_classes and any(get_module_class_from_name(teacher, name) is None for name in layer_classes):
        fsdp_plugin.transformer_cls_names_to_wrap = None
    try:
        fsdp_plugin.set_auto_wrap_policy(teacher)
        yield
    finally:
        fsdp_plugin.auto_wrap_policy, fsdp_plugin.transformer_cls_names_to_wrap = policy, layer_classes


def check_teacher_set(teachers: dict[str, nn.Module], head: DistillationHead, args) -> None:
    """Refuse, before any work, what several teachers cannot do."""
    if args.teacher_weights is not None and len(args.teacher_weights) != len(teachers):
        raise ValueError(
            f"teacher_weights has {len(args.teacher_weights)} weights for {len(teachers)} teacher(s): give one "
            "weight per teacher, in the order of teacher_model."
        )
    if len(teachers) < 2:
        return
    if head.cache_layout == TOPK:
        raise ValueError(
            f"Several teachers are supported for heads with dense or per-token outputs, not for the {head.name} "
            "head's top-k targets: distil from one teacher."
        )
    if args.uses_alignment:
        raise ValueError(
            "Intermediate-layer losses pair the student's layers with one teacher's: with several teachers, set the "
            "alignment weights to 0."
        )


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
    if torch.isfinite(logits.sum(dtype=torch.float32)):  # one pass: a NaN or an infinity makes the sum non-finite
        return
    broken = torch.isnan(logits).any() | torch.isposinf(logits).any() | torch.isneginf(logits).all(dim=-1).any()
    if broken:
        dtype = next(teacher.parameters()).dtype
        raise ValueError(
            f"The teacher's logits hold NaN or infinite values (teacher dtype {dtype}): its activations overflowed "
            "(float16 ends at 65504), so run the teacher in float32 (teacher.float(), or load it with "
            "dtype=torch.float32); under fp16 mixed precision the teacher runs in float16 too, so cache its logits "
            "in float32 first or train in bf16."
        )


# ---- teacher-student compatibility ----


def check_compatible(student: nn.Module, teacher: nn.Module, head: DistillationHead, tokenizer) -> int | None:
    """Raise `ValueError` when teacher and student disagree on labels or vocabulary; return the number of classes
    to compare when vocabulary rows are padded (the first `len(tokenizer)`), else None."""
    student_config, teacher_config = model_config(student), model_config(teacher)
    if student_config is None or teacher_config is None:
        return None
    teacher_head = head_for(teacher) if has_head(teacher) else None
    image_pair = {"image_classification", "deit_with_teacher"}
    if teacher_head is not None and teacher_head.name != head.name and {teacher_head.name, head.name} != image_pair:
        raise ValueError(
            f"The teacher is a {type(base_model(teacher)).__name__} ({teacher_head.name} outputs) but the student is "
            f"a {type(base_model(student)).__name__} ({head.name}): the teacher's distributions do not match the "
            "student's. Use a teacher with the student's task head."
        )
    if head.cache_layout != TOPK:
        check_label_spaces(student_config, teacher_config)
    student_vocab = getattr(student_config.get_text_config(), "vocab_size", None)
    teacher_vocab = getattr(teacher_config.get_text_config(), "vocab_size", None)
    if student_vocab is None or teacher_vocab is None or student_vocab == teacher_vocab:
        return None
    tokenizer_size = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    if head.cache_layout == TOPK and tokenizer_size is not None and tokenizer_size <= min(student_vocab, teacher_vocab):
        logger.info(
            f"Teacher and student vocabularies have {teacher_vocab} and {student_vocab} rows for a tokenizer of "
            f"{tokenizer_size} tokens (padded embeddings): comparing the first {tokenizer_size} logits."
        )
        return tokenizer_size
    raise ValueError(
        f"The teacher's vocabulary has {teacher_vocab} tokens but the student's has {student_vocab}: both read the "
        "same input_ids, so they must share a tokenizer. Use a student built with the teacher's tokenizer"
        + (" (pass it as processing_class when only the embedding rows are padded)." if head.cache_layout == TOPK
           else ".")
    )


def check_label_spaces(student_config, teacher_config) -> None:
    """Raise `ValueError` when the two configs have different labels, or the same labels in another order."""
    if student_config.num_labels != teacher_config.num_labels:
        raise ValueError(
            f"The teacher has num_labels={teacher_config.num_labels} but the student has "
            f"num_labels={student_config.num_labels}. Distillation needs one label space: build the student with "
            f"num_labels={teacher_config.num_labels} (and the teacher's id2label)."
        )
    student_labels, teacher_labels = named_labels(student_config), named_labels(teacher_config)
    if student_labels and teacher_labels and student_labels != teacher_labels:
        raise ValueError(
            f"The teacher's id2label {teacher_labels} differs from the student's {student_labels}: the logits would "
            "be matched class by class in the wrong order. Build the student with the teacher's id2label."
        )


def model_config(model: nn.Module):
    """The config of `model` (of the model under a PEFT wrapper), or None."""
    return getattr(base_model(model), "config", None)


def has_head(model: nn.Module) -> bool:
    """Whether `model` is of a family `hf_distill.heads` serves."""
    try:
        head_for(model)
    except ValueError:
        return False
    return True


def named_labels(config) -> dict[int, str] | None:
    """`id2label` with int keys, or None when it holds only the generic LABEL_i names."""
    id2label = {int(key): value for key, value in (config.id2label or {}).items()}
    if all(value == f"LABEL_{key}" for key, value in id2label.items()):
        return None
    return id2label


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
