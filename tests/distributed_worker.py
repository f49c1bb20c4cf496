"""Distillation scenarios that `test_distributed.py` runs twice: in the pytest process, and under 2-process CPU DDP.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port PORT tests/distributed_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Every scenario trains tiny random BERTs (no downloads) with a global batch of 8: one process of 8, or two of 4.
Each rank writes what it saw to `OUT_DIR/<scenario>.rank<r>.pt` (floats, lists and tensors) as soon as the
scenario ends, so a later scenario's failure does not hide an earlier one's results.

Data order. Trainer's default `train_sampling_strategy="random"` builds a `RandomSampler`, which accelerate turns
into a `SeedableRandomSampler` seeded with `data_seed` (`use_seedable_sampler=True`, the default) in one process
and in several. Under DDP accelerate shards the *batches* of that one permutation (`BatchSamplerShard`, not a
`DistributedSampler`): with per-device batch 4, rank r gets batches 2k + r, so optimizer step k covers
permutation[8k : 8k + 8] exactly as one process with batch 8 does. No sampler is overridden; each rank records
the examples of its batches, so the tests check this rather than assume it.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from accelerate import PartialState


def announce_start(out_dir: str) -> None:
    """Join the process group and record it in `OUT_DIR/started.rank<r>.pt`.

    Done before hf_distill and the test helpers are imported: the tests skip when no rank got this far (no
    multi-process launch possible here) and fail on anything that breaks later.
    """
    state = PartialState(cpu=True)
    torch.save(
        {"distributed_type": str(state.distributed_type), "num_processes": state.num_processes},
        os.path.join(out_dir, f"started.rank{state.process_index}.pt"),
    )


if __name__ == "__main__":
    announce_start(sys.argv[1])

import time

import numpy as np
from conftest import PadCollator, tiny_bert, tiny_llama, tiny_tokenizer, toy_dataset, toy_lm_dataset
from transformers import DataCollatorWithPadding, TrainerCallback

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.cache import weights_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH_SIZE = 8
NUM_TRAIN_EXAMPLES = 32
NUM_STEPS = NUM_TRAIN_EXAMPLES // GLOBAL_BATCH_SIZE
LOGGED_KEYS = ("loss", "grad_norm", "loss_kd", "loss_ce", "loss_hidden", "on_policy")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def make_args(workdir, **overrides) -> DistillationTrainingArguments:
    """Arguments of a 4-step run with a global batch of `GLOBAL_BATCH_SIZE`, whatever the number of processes."""
    defaults = {
        "output_dir": os.path.join(workdir, "out"),
        "per_device_train_batch_size": GLOBAL_BATCH_SIZE // world_size(),
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "alpha": 0.5,
        "temperature": 2.0,
        "teacher_cache_dir": os.path.join(workdir, "cache"),
        "teacher_cache_batch_size": 16,
        "disable_tqdm": True,
    }
    defaults.update(overrides)
    return DistillationTrainingArguments(**defaults)


class RecordingCollator:
    """`DataCollatorWithPadding` that records, per training batch, the indices of its examples in `train_dataset`.

    Batches of other examples (evaluation) are collated without being recorded.
    """

    def __init__(self, tokenizer, train_dataset):
        self.collate = DataCollatorWithPadding(tokenizer)
        self.index_of = {tuple(ids): index for index, ids in enumerate(train_dataset["input_ids"])}
        if len(self.index_of) != len(train_dataset):
            raise ValueError("The toy dataset has duplicate examples: their batches could not be told apart.")
        self.batches = []

    def __call__(self, features):
        indices = [self.index_of.get(tuple(feature["input_ids"])) for feature in features]
        if None not in indices:
            self.batches.append(sorted(indices))
        return self.collate(features)


class RecordingLMCollator(RecordingCollator):
    """`RecordingCollator` for token sequences with `labels` (right-padded with -100)."""

    def __init__(self, train_dataset):
        super().__init__(None, train_dataset)
        self.collate = PadCollator()


class TeacherSpy:
    """Forward hook recording each teacher call: batch size, train mode, and whether autograd was on."""

    def __init__(self, teacher):
        self.calls = []
        teacher.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.calls.append({
            "batch_size": int(output.logits.shape[0]),
            "training": module.training,
            "grad_enabled": torch.is_grad_enabled(),
        })


class TrainingStart(TrainerCallback):
    """Remembers how many teacher calls happened before training (while the trainer built the logit cache)."""

    def __init__(self, spy):
        self.spy = spy
        self.teacher_calls_before = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.teacher_calls_before = len(self.spy.calls)


def setup(workdir):
    """Teacher (hidden 48, 4 layers), student (hidden 32, 2 layers), 32 labelled examples and a tokenizer."""
    tokenizer = tiny_tokenizer(os.path.join(workdir, f"tokenizer-rank{rank()}"))
    teacher, student = tiny_bert(hidden_size=48, num_layers=4, seed=1), tiny_bert(seed=2)
    return teacher, student, toy_dataset(NUM_TRAIN_EXAMPLES), tokenizer


def common_results(trainer, collator) -> dict:
    """Where the run happened, its per-step logs, the examples of each batch, and the final student weights."""
    state = trainer.accelerator.state
    student = trainer.accelerator.unwrap_model(trainer.model)
    student = getattr(student, "student", student)  # a DistillWrapper holds the student beside its projections
    return {
        "distributed_type": str(state.distributed_type),
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "logs": [
            {key: entry[key] for key in LOGGED_KEYS if key in entry}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        "batches": collator.batches,
        "weights": {name: tensor.detach().clone() for name, tensor in student.state_dict().items()},
    }


def scenario_cached(workdir) -> dict:
    """The trainer caches the teacher's logits (main process first), then distils for 4 steps."""
    teacher, student, train, tokenizer = setup(workdir)
    spy = TeacherSpy(teacher)
    args = make_args(workdir)
    collator = RecordingCollator(tokenizer, train)
    start = TrainingStart(spy)
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=train, processing_class=tokenizer, data_collator=collator,
        teacher_model=teacher, callbacks=[start],
    )
    # The cache's lock file (.<name>.lock) stays beside it by design; every other entry must be a complete cache.
    cache_listing = sorted(name for name in os.listdir(args.teacher_cache_dir) if not name.endswith(".lock"))
    trainer.train()
    return {
        **common_results(trainer, collator),
        "teacher_calls_building_cache": spy.calls[: start.teacher_calls_before],
        "teacher_calls_training": spy.calls[start.teacher_calls_before :],
        "cache_listing": cache_listing,
        "cache_folder_contents": sorted(os.listdir(os.path.join(args.teacher_cache_dir, cache_listing[0]))),
        "train_teacher_logits": torch.tensor(np.asarray(trainer.train_dataset["teacher_logits"])),
    }


def scenario_online(workdir) -> dict:
    """The teacher runs on every batch (`use_teacher_cache=False`); evaluation afterwards, also with the teacher."""
    teacher, student, train, tokenizer = setup(workdir)
    spy = TeacherSpy(teacher)
    digest_before = weights_digest(teacher)
    collator = RecordingCollator(tokenizer, train)
    trainer = DistillationTrainer(
        model=student, args=make_args(workdir, use_teacher_cache=False), train_dataset=train,
        eval_dataset=toy_dataset(16, seed=1), processing_class=tokenizer, data_collator=collator,
        teacher_model=teacher,
    )
    trainer.train()
    teacher_calls_training = list(spy.calls)
    metrics = trainer.evaluate()
    teacher = trainer.teacher_model
    teacher_parameters = {id(parameter) for parameter in teacher.parameters()}
    wrapped_parameters = {id(parameter) for parameter in trainer.model_wrapped.parameters()}
    optimized_parameters = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    return {
        **common_results(trainer, collator),
        "eval_metrics": {
            key: value for key, value in metrics.items() if "runtime" not in key and "per_second" not in key
        },
        "teacher_type": type(teacher).__name__,
        "teacher_training": teacher.training,
        "teacher_requires_grad": any(parameter.requires_grad for parameter in teacher.parameters()),
        "teacher_params_in_wrapped_model": len(teacher_parameters & wrapped_parameters),
        "teacher_params_in_optimizer": len(teacher_parameters & optimized_parameters),
        "teacher_weights_unchanged": weights_digest(teacher) == digest_before,
        "teacher_calls_training": teacher_calls_training,
    }


def scenario_partially_labelled(workdir) -> dict:
    """Half the examples unlabelled (`label=-1`, like the GLUE recipe's transfer data), cached logits."""
    teacher, student, train, tokenizer = setup(workdir)
    labels = np.array(train["label"])
    labels[np.random.default_rng(0).permutation(len(labels))[: len(labels) // 2]] = -1
    train = train.remove_columns("label").add_column("label", labels.tolist())
    collator = RecordingCollator(tokenizer, train)
    trainer = DistillationTrainer(
        model=student, args=make_args(workdir), train_dataset=train, processing_class=tokenizer,
        data_collator=collator, teacher_model=teacher,
    )
    trainer.train()
    return {**common_results(trainer, collator), "labels": labels.tolist()}


def scenario_hidden_projection(workdir) -> dict:
    """A student of width 16 aligned to a teacher of width 32 through learned projections (`DistillWrapper`)."""
    tokenizer = tiny_tokenizer(os.path.join(workdir, f"tokenizer-rank{rank()}"))
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), tiny_bert(hidden_size=16, seed=2)
    train = toy_dataset(NUM_TRAIN_EXAMPLES)
    collator = RecordingCollator(tokenizer, train)
    trainer = DistillationTrainer(
        model=student, args=make_args(workdir, hidden_loss_weight=1.0), train_dataset=train,
        processing_class=tokenizer, data_collator=collator, teacher_model=teacher,
    )
    trainer.train()
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    return {
        **common_results(trainer, collator),
        "model_type": type(wrapper).__name__,
        "projections": {name: tensor.detach().clone() for name, tensor in wrapper.projections.state_dict().items()},
    }


def scenario_causal_lm(workdir) -> dict:
    """A causal LM distilled from a top-k cache: the losses are sums over the step's tokens on both processes."""
    train = toy_lm_dataset(NUM_TRAIN_EXAMPLES, prompt_length=2, max_length=16)
    collator = RecordingLMCollator(train)
    trainer = DistillationTrainer(
        model=tiny_llama(num_layers=1, seed=1), args=make_args(workdir, teacher_cache_top_k=8),
        train_dataset=train, data_collator=collator, teacher_model=tiny_llama(seed=2, logit_scale=30.0),
    )
    trainer.train()
    return common_results(trainer, collator)


def scenario_on_policy(workdir) -> dict:
    """On-policy distillation (lmbda 0.5, greedy): the student completes each row's first 3 tokens on the steps the
    seeded draw picks, the cached teacher scores the other steps and the online one the completions."""
    train = toy_lm_dataset(NUM_TRAIN_EXAMPLES, prompt_length=2, min_length=6, max_length=16)
    collator = RecordingLMCollator(train)
    args = make_args(workdir, teacher_cache_top_k=8, lmbda=0.5, prompt_tokens=3, max_new_tokens=4,
                     on_policy_temperature=0.0)
    trainer = DistillationTrainer(
        model=tiny_llama(num_layers=1, seed=1), args=args, train_dataset=train, data_collator=collator,
        teacher_model=tiny_llama(seed=2, logit_scale=30.0),
    )
    trainer.train()
    return {**common_results(trainer, collator), "on_policy_batches": trainer.on_policy.batches}


def run_recipe_counting(recipe, args_file, workdir, calls) -> dict:
    """`recipe.main` with the arguments in `workdir/args_file` (one a line), counting calls of the names in
    `calls`, so the test sees who writes the report."""

    def counted(name):
        function = getattr(recipe, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    for name in calls:
        setattr(recipe, name, counted(name))
    with open(os.path.join(workdir, args_file)) as file:
        recipe.main(file.read().splitlines())
    state = PartialState()
    return {"calls": calls, "num_processes": state.num_processes, "process_index": state.process_index}


def scenario_glue_recipe(workdir) -> dict:
    """`recipes/glue.py` with the arguments in `workdir/glue_args.txt`."""
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import glue as recipe

    return run_recipe_counting(recipe, "glue_args.txt", workdir, {"write_comparison": 0})


def scenario_ner_recipe(workdir) -> dict:
    """`recipes/token_classification.py` with the arguments in `workdir/ner_args.txt`."""
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import token_classification as recipe

    return run_recipe_counting(recipe, "ner_args.txt", workdir, {"write_comparison": 0})


def scenario_causal_lm_recipe(workdir) -> dict:
    """`recipes/causal_lm.py` with the arguments in `workdir/lm_args.txt`; counts reports, cards and cache builds."""
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import causal_lm as recipe

    import hf_distill.cache

    calls = {"write_report": 0, "_build": 0}

    def counted(module, name):
        function = getattr(module, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        setattr(module, name, call)

    counted(recipe, "write_report")
    counted(hf_distill.cache, "_build")
    with open(os.path.join(workdir, "lm_args.txt")) as file:
        recipe.main(file.read().splitlines())
    state = PartialState()
    return {"calls": calls, "num_processes": state.num_processes, "process_index": state.process_index}


SCENARIOS = {
    "cached": scenario_cached,
    "online": scenario_online,
    "partially_labelled": scenario_partially_labelled,
    "hidden_projection": scenario_hidden_projection,
    "causal_lm": scenario_causal_lm,
    "on_policy": scenario_on_policy,
    "glue_recipe": scenario_glue_recipe,
    "ner_recipe": scenario_ner_recipe,
    "causal_lm_recipe": scenario_causal_lm_recipe,
}


def run_scenario(name: str, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    results = SCENARIOS[name](workdir)
    results["seconds"] = time.perf_counter() - start
    return results


if __name__ == "__main__":
    out_dir = sys.argv[1]
    for scenario in sys.argv[2:]:
        scenario_results = run_scenario(scenario, os.path.join(out_dir, scenario))
        torch.save(scenario_results, os.path.join(out_dir, f"{scenario}.rank{rank()}.pt"))
