"""Distillation under a sharding engine: the scenarios `test_sharded.py` runs in the pytest process and in one
2-process CPU launch (gloo) per engine, FSDP2, FSDP1 and DeepSpeed ZeRO-3:

    accelerate launch --config_file recipes/configs/accelerate/<engine>.yaml <CPU flags, see test_sharded.py> \
        tests/sharded_worker.py ENGINE OUT_DIR SCENARIO [SCENARIO ...]

A causal-LM student (hidden 16) learns from a teacher of hidden 36, both tiny random Llamas (no tensor of one has
the other's widths), with a global batch of 8 (one process of 8, or two of 4) over 4 steps. Each rank writes what it
saw to `OUT_DIR/<scenario>.rank<r>.pt` as soon as the scenario ends.

Neither accelerate nor torch runs these engines on a CPU-only machine as shipped: the test-only patches below, each
written for the version in `PATCHED_FOR` (test_sharded.py skips an engine's launch on another version), make them.
"""

import os
import sys
import time

import torch
from accelerate import PartialState
from conftest import LM_VOCAB_SIZE, PadCollator, tiny_llama, toy_lm_dataset
from transformers import TrainerCallback

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.teacher import place_teacher

# Each engine's test-only patches and the package versions they were written for (and read against).
PATCHED_FOR = {
    "fsdp2": {"accelerate": "1.16.0"},
    "fsdp1": {"accelerate": "1.16.0", "torch": "2.13.0"},
    "deepspeed": {"deepspeed": "0.19.8"},
}
GLOBAL_BATCH_SIZE = 8
NUM_TRAIN_EXAMPLES = 32
NUM_STEPS = NUM_TRAIN_EXAMPLES // GLOBAL_BATCH_SIZE
CHECKPOINT_STEP = 2
TEACHER_HIDDEN_SIZE = 36
LOGGED_KEYS = ("loss", "grad_norm", "loss_kd", "loss_ce")


# ---- test-only patches ----


def allow_fsdp_on_cpu() -> None:
    """Let accelerate 1.16.0 run FSDP in CPU processes.

    `AcceleratorState.__init__` selects FSDP only on GPU-like states (state.py:947-974): on `MULTI_CPU` it drops the
    FSDP plugin without a word and the run is plain DDP.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def gather_fsdp1_state_dicts_in_place() -> None:
    """Keep torch 2.13.0's FSDP1 from "offloading" state dicts to the CPU they are already on.

    accelerate's `get_state_dict` and `save_fsdp_model` set `offload_to_cpu=True`, with which FSDP1 frees the storage
    it has just gathered into when the parameters live on the CPU: the process dies (SIGSEGV).
    """
    from torch.distributed.fsdp import OptimStateDictConfig, StateDictConfig

    for config in (StateDictConfig, OptimStateDictConfig):
        config.offload_to_cpu = property(lambda self: False, lambda self, value: None)


def skip_deepspeed_shm_build() -> None:
    """Keep DeepSpeed 0.19.8 from JIT-compiling its shared-memory C++ op (minutes of g++) on CPU.

    Its `TorchBackend.__init__` calls `build_shm_op()`; without the op, collectives go through torch.distributed
    (gloo). A build killed halfway leaves a lock in ~/.cache/torch_extensions that hangs every later run.
    """
    import deepspeed.comm.torch  # noqa: F401 - the attribute `deepspeed.comm.torch` is the torch package itself

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


PATCHES = {
    "fsdp2": [allow_fsdp_on_cpu],
    "fsdp1": [allow_fsdp_on_cpu, gather_fsdp1_state_dicts_in_place],
    "deepspeed": [skip_deepspeed_shm_build],
}


# ---- the runs ----


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_args(workdir, engine, **overrides) -> DistillationTrainingArguments:
    """Arguments of a 4-step run with a global batch of `GLOBAL_BATCH_SIZE`, whatever the number of processes."""
    defaults = {
        "output_dir": os.path.join(workdir, "out"),
        "per_device_train_batch_size": GLOBAL_BATCH_SIZE // world_size(),
        "learning_rate": 1e-2,
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        # DeepSpeed on CPU: use_cpu=True would select DDP, and without gloo accelerate counts 1 process of 2.
        "use_cpu": engine != "deepspeed",
        "ddp_backend": "gloo" if engine == "deepspeed" and world_size() > 1 else None,
        "seed": 0,
        "data_seed": 0,
        "alpha": 0.5,
        "temperature": 2.0,
        "teacher_cache_dir": os.path.join(workdir, "cache"),
        "teacher_cache_top_k": 8,
        "disable_tqdm": True,
        # FSDP and DeepSpeed run the unfused vocabulary loss (their output layers are sharded outside the forward):
        # the 1-process reference does too, so its teacher calls compare with theirs one for one.
        "fused_vocabulary_loss": False,
    }
    defaults.update(overrides)
    return DistillationTrainingArguments(**defaults)


def make_teacher(seed=2):
    return tiny_llama(hidden_size=TEACHER_HIDDEN_SIZE, seed=seed, logit_scale=30.0)


def tiny_qwen2():
    """A teacher of another family than the student's (Qwen2 decoder layers, the student's vocabulary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=LM_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    ))


class TeacherSpy:
    """Forward hook recording each teacher call: rows, tokens a row, train mode, and whether autograd was on."""

    def __init__(self, teacher):
        self.calls = []
        teacher.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append({
            "tokens": int(input_ids.shape[1]),
            "rows": int(output.logits.shape[0]),
            "training": module.training,
            "grad_enabled": torch.is_grad_enabled(),
        })


class StepLogs(TrainerCallback):
    """The training logs of each step: `loss`, `grad_norm` and the loss terms."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append({"step": state.global_step, **{key: logs[key] for key in LOGGED_KEYS if key in logs}})


def full_student_weights(trainer) -> dict | None:
    """The student's full weights, gathered from the engine's shards (None outside the main process)."""
    wrapped = trainer.model_wrapped
    if trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            weights = {name.replace("_fsdp_wrapped_module.", ""): parameter.detach().clone()
                       for name, parameter in wrapped.named_parameters()}
    else:
        weights = trainer.accelerator.get_state_dict(wrapped)  # ZeRO-3 gathers on the main process only
    return weights if trainer.accelerator.is_main_process else None


def local_elements(model) -> int:
    """The number of parameter elements this rank holds, under any engine."""
    total = 0
    for parameter in model.parameters():
        if hasattr(parameter, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
            total += parameter.ds_tensor.numel()
        elif hasattr(parameter, "to_local"):  # FSDP2 DTensor shard
            total += parameter.to_local().numel()
        else:  # FSDP1's views of this rank's shard; the whole parameter when not sharded
            total += parameter.numel()
    return total


def fsdp_units(model) -> list[str]:
    """The classes of the modules FSDP wrapped as units of their own, root last."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return [type(module.module).__name__ if isinstance(module, FullyShardedDataParallel)
            else type(module).__name__.removeprefix("FSDP")
            for module in model.modules() if isinstance(module, (FSDPModule, FullyShardedDataParallel))][::-1]


def run(workdir, engine, use_teacher_cache, **overrides) -> tuple[DistillationTrainer, dict]:
    # Under FSDP2 (`cpu_ram_efficient_loading`) the other ranks' teacher has other weights, as from_pretrained leaves
    # them uninitialised there: the main process's must replace them. A cached teacher needs its weights everywhere
    # (each process checks the cache against them).
    other_rank = os.environ.get("RANK", "0") != "0"
    teacher = make_teacher(seed=99 if other_rank and engine == "fsdp2" and not use_teacher_cache else 2)
    teacher_elements = sum(parameter.numel() for parameter in teacher.parameters())
    spy = TeacherSpy(teacher)
    logs = StepLogs()
    trainer = DistillationTrainer(
        model=tiny_llama(hidden_size=16, seed=1),
        args=make_args(workdir, engine, use_teacher_cache=use_teacher_cache, **overrides),
        train_dataset=toy_lm_dataset(NUM_TRAIN_EXAMPLES, prompt_length=2, max_length=16), data_collator=PadCollator(),
        teacher_model=teacher, callbacks=[logs],
    )
    calls_before_training = len(spy.calls)
    trainer.train(resume_from_checkpoint=overrides.get("resume_from_checkpoint"))
    state = trainer.accelerator.state
    return trainer, {
        "distributed_type": str(state.distributed_type),
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "logs": logs.logs,
        "teacher_calls_training": spy.calls[calls_before_training:],
        "teacher_elements": teacher_elements,
    }


def scenario_online(workdir, engine) -> dict:
    """The teacher runs on every batch; checkpoints at steps 2 and 4; the student saved at the end."""
    trainer, results = run(workdir, engine, use_teacher_cache=False, save_strategy="steps", save_steps=CHECKPOINT_STEP)
    teacher = trainer.teacher_model
    teacher_parameters = {id(parameter) for parameter in teacher.parameters()}
    optimized = {id(parameter) for group in trainer.optimizer.param_groups for parameter in group["params"]}
    results.update(
        teacher_type=type(teacher).__name__,
        # A DeepSpeed engine's own `training` stays True: its eval() sets the module's.
        teacher_module_training=getattr(teacher, "module", teacher).training,
        teacher_requires_grad=any(parameter.requires_grad for parameter in teacher.parameters()),
        teacher_params_in_wrapped_model=len(teacher_parameters & {id(p) for p in trainer.model_wrapped.parameters()}),
        teacher_params_in_optimizer=len(teacher_parameters & optimized),
        teacher_local_elements=local_elements(teacher),
        teacher_placed_again_is_same=place_teacher(teacher, trainer.accelerator) is teacher,
        weights=full_student_weights(trainer),
    )
    if trainer.is_fsdp_enabled:
        results["teacher_units"] = fsdp_units(teacher)
        # The plugin names the student's layer classes; a teacher of another family is wrapped by its own.
        results["other_family_units"] = fsdp_units(place_teacher(tiny_qwen2().eval(), trainer.accelerator))
        results["student_layer_classes_after"] = trainer.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap
    trainer.save_model(os.path.join(workdir, "student"))
    return results


def scenario_resume(workdir, engine) -> dict:
    """A new run resumed from the online run's checkpoint at step 2, through the engine's own checkpoint."""
    checkpoint = os.path.join(os.path.dirname(workdir), "online", "out", f"checkpoint-{CHECKPOINT_STEP}")
    return run(workdir, engine, use_teacher_cache=False, resume_from_checkpoint=checkpoint)[1]


def scenario_cached(workdir, engine) -> dict:
    """The teacher's top-k logits cached first (by the main process), then 4 steps that never run the teacher."""
    return run(workdir, engine, use_teacher_cache=True)[1]


def scenario_on_policy(workdir, engine) -> dict:
    """Every batch the student's own greedy completions (lmbda 1) of each row's first 2 tokens, scored by the online
    teacher; under ZeRO-3 the student generates with its weights gathered on each rank."""
    trainer, results = run(workdir, engine, use_teacher_cache=False, lmbda=1.0, prompt_tokens=2, max_new_tokens=5,
                           on_policy_temperature=0.0)
    results.update(on_policy_batches=trainer.on_policy.batches, student_training=trainer.model.training)
    return results


def scenario_refused(workdir, engine) -> dict:
    """Teachers the engine cannot place, each refused when the trainer is built: the messages."""
    spread = make_teacher()
    spread.hf_device_map = {"model": 0, "lm_head": 1}
    with torch.device("meta"):
        not_loaded = make_teacher()
    teachers = {"data_parallel": torch.nn.DataParallel(make_teacher()), "spread": spread, "meta": not_loaded}
    messages = {}
    for name, teacher in teachers.items():
        try:
            DistillationTrainer(
                model=tiny_llama(hidden_size=16, seed=1),
                args=make_args(os.path.join(workdir, name), engine, use_teacher_cache=False),
                train_dataset=toy_lm_dataset(NUM_TRAIN_EXAMPLES), data_collator=PadCollator(), teacher_model=teacher,
            )
        except ValueError as error:
            messages[name] = str(error)
    return {"messages": messages, "process_index": PartialState().process_index}


SCENARIOS = {
    "online": scenario_online,
    "resume": scenario_resume,
    "cached": scenario_cached,
    "on_policy": scenario_on_policy,
    "refused": scenario_refused,
}


def run_scenario(name: str, workdir: str, engine: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    results = SCENARIOS[name](workdir, engine)
    results["seconds"] = time.perf_counter() - start
    return results


if __name__ == "__main__":
    engine, out_dir = sys.argv[1], sys.argv[2]
    # Written before anything can fail: the test skips only when no process got this far.
    open(os.path.join(out_dir, f"started.rank{os.environ['RANK']}"), "w").close()
    for patch in PATCHES[engine]:
        patch()
    for scenario in sys.argv[3:]:
        scenario_results = run_scenario(scenario, os.path.join(out_dir, scenario), engine)
        torch.save(scenario_results, os.path.join(out_dir, f"{scenario}.rank{PartialState().process_index}.pt"))
    # Without it FSDP1's rank 0 aborts at exit ("terminate called without an active exception").
    torch.distributed.destroy_process_group()
