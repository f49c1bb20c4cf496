"""`DistillationTrainer` with the teacher sharded like the student, under FSDP2, FSDP1 and DeepSpeed ZeRO-3: one
2-process CPU launch (gloo) per engine, checked against the same scenarios run in one process.

Each launch uses the engine's config in `recipes/configs/accelerate/`, with CPU overrides. FSDP runs on CPU only
with `ACCELERATE_USE_CPU=true` and the worker's patch of accelerate (which otherwise falls back to DDP without a
word); FSDP1 also needs `ACCELERATE_TORCH_DEVICE=cpu` (its `device_id` check), and no `sync_module_states` /
`cpu_ram_efficient_loading` (accelerate refuses them on CPU). DeepSpeed runs on its CPU accelerator with gloo:
`use_cpu=False, ddp_backend="gloo"` in the worker, no `ACCELERATE_USE_CPU` (with it, DeepSpeed is dropped for DDP).
Every launch records `accelerator.distributed_type`: a fallback to DDP fails the tests.
"""

import glob
import importlib.metadata
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import safetensors.torch
import sharded_worker as worker
import torch
from accelerate.utils import DistributedType
from conftest import make_args, tiny_bert, toy_dataset
from transformers import AutoModelForCausalLM

import hf_distill
from hf_distill import DistillationTrainer
from hf_distill.teacher import check_teacher_placement

NUM_PROCESSES = 2
# A guard against hung ranks, not a time limit: a launch takes 20-40 s on 2 loaded cores.
LAUNCH_TIMEOUT_S = 900
REPO = os.path.dirname(os.path.dirname(os.path.abspath(hf_distill.__file__)))
CONFIGS = os.path.join(REPO, "recipes", "configs", "accelerate")
SCENARIOS = ["online", "resume", "cached", "refused"]
# FSDP refuses on-policy training (generation with sharded weights): DeepSpeed ZeRO-3 gathers them.
ENGINE_SCENARIOS = {"deepspeed": ["on_policy"]}
CPU_FSDP_ENV = {"ACCELERATE_USE_CPU": "true"}
ENGINES = {
    "fsdp2": {"config": "fsdp2.yaml", "flags": [], "env": CPU_FSDP_ENV,
              "distributed_type": "DistributedType.FSDP", "teacher_type": "FSDPLlamaForCausalLM"},
    "fsdp1": {"config": "fsdp1.yaml", "env": {**CPU_FSDP_ENV, "ACCELERATE_TORCH_DEVICE": "cpu"},
              "flags": ["--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"],
              "distributed_type": "DistributedType.FSDP", "teacher_type": "FullyShardedDataParallel"},
    "deepspeed": {"config": "deepspeed_zero3.yaml", "flags": [], "env": {},
                  "distributed_type": "DistributedType.DEEPSPEED", "teacher_type": "DeepSpeedEngine"},
}
ENGINE_NAMES = {"fsdp2": "FSDP2", "fsdp1": "FSDP1", "deepspeed": "DeepSpeed ZeRO-3"}


def skip_unless_launchable(engine):
    """Skip an engine whose launch cannot run here, or whose test-only patches target other versions."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without torch.distributed/gloo: no 2-process CPU run possible")
    for package, patched in worker.PATCHED_FOR[engine].items():
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{package} is not installed: pip install -e '.[deepspeed]' to test {engine}")
        if installed.split("+")[0] != patched:
            pytest.skip(
                f"The CPU patches of tests/sharded_worker.py for {engine} were written for {package} {patched}, and "
                f"{package} {installed} is installed: check what they patch still behaves as their docstrings say "
                "(or is no longer needed), then update PATCHED_FOR."
            )


class Launch:
    """One engine's 2-process launch of every scenario: per-rank results, and the combined log."""

    def __init__(self, engine, out_dir):
        self.engine, self.out_dir = engine, out_dir
        spec = ENGINES[engine]
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, spec["config"]),
            "--num_processes", str(NUM_PROCESSES), "--num_machines", "1", "--mixed_precision", "no",
            # Port 0: the launcher binds a free port itself.
            "--dynamo_backend", "no", "--main_process_port", "0", *spec["flags"],
            worker.__file__, engine, out_dir, *SCENARIOS, *ENGINE_SCENARIOS.get(engine, []),
        ]
        env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
        env.update(
            spec["env"],
            # The ranks run the script, so the current folder is not on their path: without this they would import
            # whichever hf_distill is installed (another checkout's, for an editable install) instead of this one.
            PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
            OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
            # A C++ build that a killed run leaves half done would lock the shared cache for every later run.
            TORCH_EXTENSIONS_DIR=os.path.join(out_dir, "torch_extensions"),
        )
        # A session of its own, so a hung rank is killed with the launcher.
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            self.log, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            self.log = process.communicate()[0] + f"\n[test_sharded] killed after {LAUNCH_TIMEOUT_S} s: a rank hung"
        self.returncode = process.returncode
        if not glob.glob(os.path.join(out_dir, "started.rank*")):
            pytest.skip(f"accelerate could not start {NUM_PROCESSES} CPU processes here:\n{self.log[-3000:]}")

    def results(self, scenario) -> list[dict]:
        paths = [os.path.join(self.out_dir, f"{scenario}.rank{rank}.pt") for rank in range(NUM_PROCESSES)]
        if not all(os.path.exists(path) for path in paths):
            ranks = [line for line in self.log.splitlines() if line.startswith("[rank") and "Warning" not in line]
            pytest.fail(
                f"The {self.engine} launch (exit code {self.returncode}) wrote no '{scenario}' results. The ranks' "
                "tracebacks:\n" + ("\n".join(ranks[-80:]) if ranks else self.log[-4000:]),
                pytrace=False,
            )
        results = [torch.load(path, weights_only=True) for path in paths]
        for rank, result in enumerate(results):
            assert result["process_index"] == rank
        return results


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """`launch(engine)`: that engine's launch, run once per module."""
    launches = {}

    def get(engine):
        if engine not in launches:
            skip_unless_launchable(engine)
            launches[engine] = Launch(engine, str(tmp_path_factory.mktemp(engine)))
        return launches[engine]

    return get


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run of each scenario (the whole global batch in one process)."""
    out_dir = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        runs = {scenario: worker.run_scenario(scenario, str(out_dir / scenario), "one_process")
                for scenario in ("online", "resume", "cached", "on_policy")}
    finally:
        torch.set_num_threads(threads)
    return runs


def assert_same_logs(ranks, expected_logs, rel=1e-5, term_abs=2e-6, keys=worker.LOGGED_KEYS):
    """Per-step logs equal on both ranks and equal to `expected_logs` (`loss_*` terms are rounded to 6 decimals)."""
    assert ranks[0]["logs"] == ranks[1]["logs"], "the two ranks logged different values"
    logs = ranks[0]["logs"]
    assert [entry["step"] for entry in logs] == [entry["step"] for entry in expected_logs]
    for entry, expected in zip(logs, expected_logs):
        for key in keys:
            tolerance = {"abs": term_abs} if key.startswith("loss_") else {"rel": rel}
            assert entry[key] == pytest.approx(expected[key], **tolerance), (
                f"step {entry['step']} '{key}': 2 processes give {entry[key]}, 1 process {expected[key]}"
            )


def assert_engine(ranks, engine):
    for result in ranks:
        assert result["distributed_type"] == ENGINES[engine]["distributed_type"], "the run fell back to another engine"
        assert result["num_processes"] == NUM_PROCESSES


def student_keys():
    return worker.tiny_llama(hidden_size=16).state_dict().keys()


# ---- the online teacher, sharded ----


@pytest.mark.parametrize("engine", ENGINES)
def test_online_teacher_is_sharded_and_losses_match_one_process(launch, reference, engine):
    ranks, one_process = launch(engine).results("online"), reference["online"]
    assert_engine(ranks, engine)
    assert_same_logs(ranks, one_process["logs"])
    assert one_process["student_wrapper"] == "LlamaForCausalLM"
    whole = one_process["teacher_elements"]
    for result in ranks:
        assert result["student_wrapper"] != "LlamaForCausalLM"
        assert result["teacher_type"] == ENGINES[engine]["teacher_type"]
        assert 0 < result["teacher_local_elements"] < whole, "the teacher is not sharded"
        assert result["teacher_module_training"] is False and result["teacher_requires_grad"] is False
        assert result["teacher_params_in_wrapped_model"] == result["teacher_params_in_optimizer"] == 0
        assert result["teacher_placed_again_is_same"], "placing a placed teacher wrapped it again"
        assert {(call["training"], call["grad_enabled"]) for call in result["teacher_calls_training"]} == {
            (False, False)}
    assert sum(result["teacher_local_elements"] for result in ranks) >= whole
    # One teacher call per step on each rank, on its half of the batch (ZeRO-3 needs both ranks in every call).
    for step, expected in enumerate(one_process["teacher_calls_training"]):
        assert sum(result["teacher_calls_training"][step]["rows"] for result in ranks) == expected["rows"]


def test_on_policy_under_zero3_generates_with_gathered_weights_and_matches_one_process(launch, reference):
    ranks, one_process = launch("deepspeed").results("on_policy"), reference["on_policy"]
    assert_engine(ranks, "deepspeed")
    assert one_process["on_policy_batches"] == [(step, 0) for step in range(worker.NUM_STEPS)]
    assert ranks[0]["on_policy_batches"] == ranks[1]["on_policy_batches"] == one_process["on_policy_batches"]
    assert_same_logs(ranks, one_process["logs"], keys=("loss", "grad_norm", "loss_kd"))
    # The teacher scored prompt + completion rows (longer than the 2-token prompts), half the batch on each rank.
    for step, expected in enumerate(one_process["teacher_calls_training"]):
        assert expected["tokens"] > 2
        assert sum(result["teacher_calls_training"][step]["rows"] for result in ranks) == expected["rows"]
    assert ranks[0]["student_training"] and ranks[1]["student_training"]


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_teacher_losses_match_one_process(launch, reference, engine):
    ranks = launch(engine).results("cached")
    assert_engine(ranks, engine)
    assert_same_logs(ranks, reference["cached"]["logs"])
    assert ranks[0]["teacher_calls_training"] == ranks[1]["teacher_calls_training"] == []


# ---- saving, checkpoints, resuming ----


@pytest.mark.parametrize("engine", ENGINES)
def test_saved_student_reloads_with_the_runs_weights(launch, reference, engine):
    run = launch(engine)
    weights = run.results("online")[0]["weights"]
    student = AutoModelForCausalLM.from_pretrained(os.path.join(run.out_dir, "online", "student"))
    saved = student.state_dict()
    assert saved.keys() == weights.keys() == student_keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, weights[name]), name
        # Adam's first steps amplify summation-order differences to ~6e-6 (under DDP too).
        torch.testing.assert_close(tensor, reference["online"]["weights"][name], rtol=1e-4, atol=1e-5)


def checkpoint_tensors(folder):
    """`(file, key path, tensor)` for every tensor in every file of a checkpoint folder."""
    def walk(value, path):
        if isinstance(value, torch.Tensor):
            yield path, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                yield from walk(item, f"{path}/{index}")

    for file in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if file.endswith(".safetensors"):
            content = safetensors.torch.load_file(file)
        elif file.endswith((".bin", ".pt", ".pth")):
            content = torch.load(file, weights_only=False, map_location="cpu")  # DeepSpeed stores objects too
        else:
            continue
        for path, tensor in walk(content, ""):
            yield os.path.relpath(file, folder), path, tensor


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoint_holds_the_student_and_no_teacher(launch, engine):
    run = launch(engine)
    run.results("online")
    checkpoint = os.path.join(run.out_dir, "online", "out", f"checkpoint-{worker.CHECKPOINT_STEP}")
    assert safetensors.torch.load_file(os.path.join(checkpoint, "model.safetensors")).keys() == student_keys()
    tensors = list(checkpoint_tensors(checkpoint))
    assert len(tensors) > len(student_keys())  # weights, optimizer state, ...
    teacher_widths = {worker.TEACHER_HIDDEN_SIZE, 2 * worker.TEACHER_HIDDEN_SIZE}  # hidden, intermediate
    teacher_tensors = [(file, path) for file, path, tensor in tensors if teacher_widths & set(tensor.shape)]
    assert teacher_tensors == []


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_from_checkpoint_continues_the_same_losses(launch, reference, engine):
    run = launch(engine)
    ranks, online = run.results("resume"), run.results("online")
    assert_engine(ranks, engine)
    assert [entry["step"] for entry in ranks[0]["logs"]] == [3, 4]
    assert_same_logs(ranks, online[0]["logs"][worker.CHECKPOINT_STEP:])
    assert_same_logs(ranks, reference["resume"]["logs"])


# ---- FSDP's wrap of the teacher ----


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_fsdp_wraps_the_teacher_by_its_own_layer_classes(launch, engine):
    result = launch(engine).results("online")[0]
    assert result["teacher_units"].count("LlamaDecoderLayer") == 2 and result["teacher_units"][-1] == "LlamaForCausalLM"
    # The plugin names the student's LlamaDecoderLayer; a Qwen2 teacher gets its own layers as units.
    assert result["other_family_units"].count("Qwen2DecoderLayer") == 2
    assert result["student_layer_classes_after"] == ["LlamaDecoderLayer"]


# ---- teachers the engine cannot place ----


@pytest.mark.parametrize("engine", ENGINES)
def test_unplaceable_teachers_are_refused_naming_the_engine(launch, engine):
    main, other = launch(engine).results("refused")
    name = ENGINE_NAMES[engine]
    for messages in (main["messages"], other["messages"]):
        assert f"wrapped in DataParallel, which {name} cannot place" in messages["data_parallel"]
        assert "pass the bare model, teacher.module" in messages["data_parallel"]
        assert f"spread over the devices ['0', '1'] by its device_map, which {name}" in messages["spread"]
    assert f"on the meta device (not loaded), which {name} cannot place" in main["messages"]["meta"]
    # FSDP2's cpu_ram_efficient_loading (on in the config) fills the other ranks' teacher from the main process.
    assert ("meta" in other["messages"]) == (engine != "fsdp2")


def test_data_parallel_teacher_is_refused_in_one_process(tmp_path):
    with pytest.raises(ValueError, match=r"wrapped in DataParallel, which a single-process run cannot place.*"
                                         r"teacher\.module"):
        DistillationTrainer(model=tiny_bert(seed=2), args=make_args(tmp_path, use_teacher_cache=False),
                            train_dataset=toy_dataset(8), teacher_model=torch.nn.DataParallel(tiny_bert(seed=1)))


def fake_fsdp_accelerator(fsdp_version=2, device="cpu", is_main_process=True, cpu_ram_efficient_loading=True):
    """The attributes `check_teacher_placement` reads off an FSDP run's accelerator."""
    plugin = SimpleNamespace(fsdp_version=fsdp_version, cpu_ram_efficient_loading=cpu_ram_efficient_loading)
    return SimpleNamespace(distributed_type=DistributedType.FSDP, device=torch.device(device),
                           is_main_process=is_main_process, state=SimpleNamespace(fsdp_plugin=plugin))


def test_fsdp1_on_an_indexed_cpu_device_is_refused():
    with pytest.raises(ValueError, match=r"FSDP1 would wrap the teacher with device_id=cpu:0.*ACCELERATE_TORCH_DEVICE"):
        check_teacher_placement(tiny_bert(), fake_fsdp_accelerator(fsdp_version=1, device="cpu:0"))
    check_teacher_placement(tiny_bert(), fake_fsdp_accelerator(fsdp_version=2, device="cpu:0"))


def test_meta_teacher_is_allowed_only_where_fsdp_sends_it_the_main_process_weights():
    with torch.device("meta"):
        teacher = tiny_bert()
    check_teacher_placement(teacher, fake_fsdp_accelerator(is_main_process=False))
    with pytest.raises(ValueError, match="in the main process at least"):
        check_teacher_placement(teacher, fake_fsdp_accelerator(is_main_process=True))
    with pytest.raises(ValueError, match=r"FSDP1 cannot place: load its weights \(from_pretrained"):
        check_teacher_placement(teacher, fake_fsdp_accelerator(1, is_main_process=False,
                                                               cpu_ram_efficient_loading=False))
