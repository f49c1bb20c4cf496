"""`DistillationTrainer` and the GLUE recipe under real 2-process CPU DDP, checked against one process.

A single `accelerate launch` of `distributed_worker.py` runs every scenario, because each launch costs 7-10 s of
interpreter start-up. The 1-process references run the same scenario functions here, with a per-device batch of
8 instead of 4 per process. DDP is real: `ACCELERATE_USE_CPU=true` with `--multi_gpu` gives `MULTI_CPU` over gloo
(checked); `--cpu` would start one process, and `--multi_gpu` without use_cpu two that train independently.
"""

import json
import os
import signal
import subprocess
import sys

import distributed_worker as worker
import pytest
import torch
from conftest import (
    FIXTURES,
    LM_FIXTURES,
    NER_FIXTURES,
    lm_recipe_args,
    ner_recipe_args,
    recipe_args,
    save_lm_teacher,
    save_ner_teacher,
    save_teacher,
)
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification

import hf_distill

NUM_PROCESSES = 2
# A guard against hung ranks, not a time limit: the launch takes ~35-50 s on 2 cores, and load from other jobs
# stretches it (its last scenario, the recipe, is the one a tight guard cuts off, failing that test alone).
LAUNCH_TIMEOUT_S = 1200
WORKER = os.path.abspath(worker.__file__)
HF_DISTILL_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(hf_distill.__file__)))


# The recipes run last: they are the most expensive, and their output is checked on disk.
SCENARIOS = [
    "cached", "online", "partially_labelled", "hidden_projection", "causal_lm", "on_policy", "glue_recipe",
    "ner_recipe", "causal_lm_recipe",
]


def run_launch(out_dir, env) -> "Launch":
    """One `accelerate launch` of every scenario; a hung launch is killed after the hang guard."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1",
        # Port 0: the launcher binds a free port itself. A port found free beforehand can be taken by another job
        # (another test run) before the launcher binds it.
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        WORKER, out_dir, *SCENARIOS,
    ]
    # A session of its own, so a hung rank is killed with the launcher on timeout.
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        log += f"\n[test_distributed] killed after {LAUNCH_TIMEOUT_S} s: a rank hung (a collective on one rank only?)"
    return Launch(out_dir, process.returncode, log)


class Launch:
    """The outcome of one 2-process launch: per-rank results of each scenario, and the combined log."""

    def __init__(self, out_dir, returncode, log):
        self.out_dir, self.returncode, self.log = out_dir, returncode, log

    def results(self, scenario) -> list[dict]:
        paths = [os.path.join(self.out_dir, f"{scenario}.rank{rank}.pt") for rank in range(NUM_PROCESSES)]
        missing = [os.path.basename(path) for path in paths if not os.path.exists(path)]
        if missing:
            pytest.fail(
                f"The 2-process launch (exit code {self.returncode}) wrote no {missing}. "
                f"The ranks' tracebacks:\n{self.tracebacks()}",
                pytrace=False,
            )
        results = [torch.load(path, weights_only=True) for path in paths]
        for rank, result in enumerate(results):
            assert result["process_index"] == rank
        return results

    def tracebacks(self, max_lines=80) -> str:
        """The lines the ranks printed with their `[rankN]:` prefix (tracebacks), or the end of the log."""
        lines = [line for line in self.log.splitlines() if line.startswith("[rank") and "Warning" not in line]
        return "\n".join(lines[-max_lines:]) if lines else self.log[-4000:]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Run every scenario once under `accelerate launch` with 2 CPU processes."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without torch.distributed/gloo: no CPU DDP possible")
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    prepare_glue_recipe(os.path.join(out_dir, "glue_recipe"))
    prepare_ner_recipe(os.path.join(out_dir, "ner_recipe"))
    prepare_causal_lm_recipe(os.path.join(out_dir, "causal_lm_recipe"))
    env = {
        **os.environ,
        # The ranks run the script, so the current folder is not on their path: without this they would import
        # whichever hf_distill is installed (another checkout's, for an editable install) instead of this one.
        "PYTHONPATH": os.pathsep.join(filter(None, [HF_DISTILL_ROOT, os.environ.get("PYTHONPATH")])),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    launch = run_launch(out_dir, env)
    started = [os.path.join(out_dir, f"started.rank{rank}.pt") for rank in range(NUM_PROCESSES)]
    if not all(os.path.exists(path) for path in started):
        pytest.skip(f"accelerate could not start {NUM_PROCESSES} CPU processes here:\n{launch.log[-3000:]}")
    for path in started:
        state = torch.load(path, weights_only=True)
        # Two processes that each train alone (world size 1) would pass every comparison below trivially.
        assert state == {"distributed_type": "DistributedType.MULTI_CPU", "num_processes": NUM_PROCESSES}, state
    return launch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run of a scenario (the whole global batch on one process), computed once per module."""
    runs = {}

    def get(scenario):
        if scenario not in runs:
            # One thread, as each DDP rank runs: on a small shared machine, extra threads mostly spin and wait.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                runs[scenario] = worker.run_scenario(scenario, str(tmp_path_factory.mktemp(f"ref-{scenario}")))
            finally:
                torch.set_num_threads(threads)
        return runs[scenario]

    return get


# ---- helpers ----


def assert_same_global_batches(ranks, one_process):
    """Optimizer step k sees the same examples: the two ranks' batches split the 1-process batch."""
    assert len(one_process["batches"]) == worker.NUM_STEPS
    for step, expected in enumerate(one_process["batches"]):
        shares = [result["batches"][step] for result in ranks]
        assert all(len(share) == worker.GLOBAL_BATCH_SIZE // NUM_PROCESSES for share in shares)
        union = sorted(index for share in shares for index in share)
        assert union == expected, f"step {step}: the ranks got {shares}, one process {expected}"


def assert_same_logs(ranks, one_process, keys, rel=1e-5, term_abs=2e-6):
    """Per-step logs equal on both ranks and equal to the 1-process run's.

    `loss_*` terms are logged rounded to 6 decimals, hence an absolute tolerance for them.
    """
    assert ranks[0]["logs"] == ranks[1]["logs"], "the two ranks logged different values"
    logs, expected_logs = ranks[0]["logs"], one_process["logs"]
    assert len(logs) == len(expected_logs) == worker.NUM_STEPS
    for step, (entry, expected) in enumerate(zip(logs, expected_logs)):
        for key in keys:
            tolerance = {"abs": term_abs} if key.startswith("loss_") else {"rel": rel}
            assert entry[key] == pytest.approx(expected[key], **tolerance), (
                f"step {step} '{key}': 2 processes x 4 give {entry[key]}, 1 process x 8 gives {expected[key]}"
            )


def assert_same_tensors(ranks, one_process, key, rtol=1e-5, atol=1e-6):
    """`{name: tensor}` results: bitwise equal across ranks, and equal to the 1-process run's within tolerance."""
    tensors = ranks[0][key]
    assert tensors and tensors.keys() == ranks[1][key].keys() == one_process[key].keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, ranks[1][key][name]), f"{key} {name} differs between the ranks"
        torch.testing.assert_close(
            tensor, one_process[key][name], rtol=rtol, atol=atol, msg=lambda message, name=name: f"{name}: {message}"
        )


# ---- 1. cached teacher logits ----


def test_cached_logits_two_processes_match_one_process_with_double_batch(ddp, reference):
    ranks, one_process = ddp.results("cached"), reference("cached")
    assert ranks[0]["student_wrapper"] == "DistributedDataParallel"
    assert_same_global_batches(ranks, one_process)
    assert_same_logs(ranks, one_process, ["loss", "grad_norm"])
    assert_same_tensors(ranks, one_process, "weights")
    initial = worker.tiny_bert(seed=2).state_dict()
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in ranks[0]["weights"].items())


# ---- 2. the teacher-logit cache under 2 processes ----


def test_teacher_cache_is_built_once_by_the_main_process(ddp, reference):
    (main, other), one_process = ddp.results("cached"), reference("cached")
    built = [call["batch_size"] for call in main["teacher_calls_building_cache"]]
    assert sum(built) == worker.NUM_TRAIN_EXAMPLES, "the main process did not run the teacher over the dataset once"
    assert built == [call["batch_size"] for call in one_process["teacher_calls_building_cache"]]
    assert other["teacher_calls_building_cache"] == [], "the other process ran the teacher instead of loading the cache"
    assert main["teacher_calls_training"] == other["teacher_calls_training"] == []

    # One cache folder, complete (its record written), no temporary build folder left behind.
    assert main["cache_listing"] == other["cache_listing"]
    assert len(main["cache_listing"]) == 1 and not main["cache_listing"][0].startswith(".")
    assert "hf_distill_cache.json" in main["cache_folder_contents"]

    # Both ranks train on the same logits, the ones one process computes.
    assert torch.equal(main["train_teacher_logits"], other["train_teacher_logits"])
    torch.testing.assert_close(main["train_teacher_logits"], one_process["train_teacher_logits"], rtol=1e-3, atol=1e-3)


# ---- 3. online teacher ----


def test_online_teacher_is_frozen_and_not_wrapped_under_ddp(ddp, reference):
    ranks, one_process = ddp.results("online"), reference("online")
    for result in ranks:
        assert result["student_wrapper"] == "DistributedDataParallel"
        assert result["teacher_type"] == "BertForSequenceClassification"
        assert result["teacher_training"] is False and result["teacher_requires_grad"] is False
        assert result["teacher_params_in_wrapped_model"] == 0 and result["teacher_params_in_optimizer"] == 0
        assert result["teacher_weights_unchanged"]
        # One teacher forward per step on this rank's half batch, in eval mode and without autograd.
        assert result["teacher_calls_training"] == [
            {"batch_size": worker.GLOBAL_BATCH_SIZE // NUM_PROCESSES, "training": False, "grad_enabled": False}
        ] * worker.NUM_STEPS
    assert one_process["student_wrapper"] == "BertForSequenceClassification"

    assert_same_global_batches(ranks, one_process)
    assert_same_logs(ranks, one_process, ["loss", "grad_norm"])
    assert_same_tensors(ranks, one_process, "weights")


# ---- 4. per-term logs ----


@pytest.mark.parametrize("scenario", ["cached", "online"])
def test_logged_terms_are_averaged_across_processes(ddp, reference, scenario):
    ranks, one_process = ddp.results(scenario), reference(scenario)
    assert_same_logs(ranks, one_process, ["loss_kd", "loss_ce"])
    if scenario == "online":
        metrics = ranks[0]["eval_metrics"]
        assert metrics == ranks[1]["eval_metrics"]
        expected = one_process["eval_metrics"]
        assert {"eval_loss", "eval_loss_kd", "eval_loss_ce", "eval_teacher_agreement"} <= metrics.keys()
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=2e-6), key


# ---- partially labelled batches: transfer data (label -1) mixed with labelled examples ----


def test_partially_labelled_batches_match_one_process(ddp, reference):
    ranks, one_process = ddp.results("partially_labelled"), reference("partially_labelled")
    assert_same_global_batches(ranks, one_process)
    assert_same_logs(ranks, one_process, ["loss", "grad_norm", "loss_kd", "loss_ce"])


# ---- token-level losses: a causal LM from a top-k cache ----


def test_causal_lm_two_processes_match_one_process(ddp, reference):
    """Rows of different lengths put different token counts on each rank: the step total normalises them."""
    ranks, one_process = ddp.results("causal_lm"), reference("causal_lm")
    assert_same_global_batches(ranks, one_process)
    assert_same_logs(ranks, one_process, ["loss", "grad_norm", "loss_kd", "loss_ce"])
    assert_same_tensors(ranks, one_process, "weights")


def test_on_policy_two_processes_match_one_process(ddp, reference):
    """Both ranks draw the same on-policy step; each rank's generated tokens count in the step's total."""
    ranks, one_process = ddp.results("on_policy"), reference("on_policy")
    assert_same_global_batches(ranks, one_process)
    assert [entry["on_policy"] for entry in one_process["logs"]] == [0.0, 0.0, 1.0, 0.0]
    assert ranks[0]["on_policy_batches"] == ranks[1]["on_policy_batches"] == one_process["on_policy_batches"]
    assert_same_logs(ranks, one_process, ["loss", "grad_norm", "loss_kd", "on_policy"])
    assert_same_tensors(ranks, one_process, "weights")


# ---- 5. intermediate-layer alignment with learned projections ----


def test_hidden_state_projections_stay_identical_across_ranks(ddp, reference):
    ranks, one_process = ddp.results("hidden_projection"), reference("hidden_projection")
    assert ranks[0]["model_type"] == ranks[1]["model_type"] == one_process["model_type"] == "DistillWrapper"
    # The projections live inside the DDP module, so their gradients are all-reduced with the student's.
    assert ranks[0]["student_wrapper"] == "DistributedDataParallel"
    assert_same_tensors(ranks, one_process, "projections")
    assert_same_global_batches(ranks, one_process)
    assert_same_logs(ranks, one_process, ["loss", "grad_norm", "loss_kd", "loss_ce", "loss_hidden"])
    assert_same_tensors(ranks, one_process, "weights")


# ---- 6. the GLUE recipe under accelerate launch ----

GLUE_EVAL_EXAMPLES = 16


def prepare_glue_recipe(workdir):
    """A tiny teacher with an SST-2 head, and the recipe's arguments in `workdir/glue_args.txt`."""
    os.makedirs(workdir)
    teacher = save_teacher(os.path.join(workdir, "teacher"), num_labels=2)
    argv = recipe_args(
        "sst2", teacher, os.path.join(workdir, "run"),
        "--max_train_samples", "32", "--transfer_train_samples", "16", "--max_eval_samples", str(GLUE_EVAL_EXAMPLES),
        "--per_device_train_batch_size", "8",
    )
    with open(os.path.join(workdir, "glue_args.txt"), "w") as file:
        file.write("\n".join(argv))


def test_glue_recipe_under_two_processes(ddp):
    main, other = ddp.results("glue_recipe")
    assert main["num_processes"] == other["num_processes"] == NUM_PROCESSES
    assert main["calls"] == {"write_comparison": 1}, "the main process did not report exactly once"
    assert other["calls"] == {"write_comparison": 0}, "the other process wrote a report"

    workdir = os.path.join(ddp.out_dir, "glue_recipe")
    student_dir = os.path.join(workdir, "run", "student")
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == 2
    with open(os.path.join(workdir, "run", "results.json")) as file:
        report = json.load(file)
    assert [row["name"] for row in report["rows"]] == ["teacher", "baseline", "student"]
    card = ModelCard.load(os.path.join(student_dir, "README.md"))
    assert "distillation" in card.data.tags

    # The reported accuracy covers the whole validation set, as one process computes it from the saved student.
    student_row = report["rows"][2]
    assert student_row["metric_name"] == "accuracy"
    assert student_row["metric_value"] == pytest.approx(glue_accuracy(student, os.path.join(workdir, "teacher")))


def glue_accuracy(model, tokenizer_dir) -> float:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_distill.recipe_support.glue import load_glue_data, tokenize_glue

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = load_glue_data("sst2", validation_file=os.path.join(FIXTURES, "sst2", "validation.tsv"))
    raw["validation"] = raw["validation"].select(range(GLUE_EVAL_EXAMPLES))
    validation = tokenize_glue(raw, tokenizer, "sst2", 32)["validation"]
    batch = DataCollatorWithPadding(tokenizer)(
        [{key: row[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in row}
         for row in validation]
    )
    model.eval()
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    return (predictions == torch.tensor(validation["label"])).float().mean().item()


# ---- 7. the token-classification recipe under accelerate launch ----


def prepare_ner_recipe(workdir):
    """A tiny token-classification teacher, and the recipe's arguments in `workdir/ner_args.txt`."""
    os.makedirs(workdir)
    teacher = save_ner_teacher(os.path.join(workdir, "teacher"), with_head=True,
                               id2label=dict(enumerate(NER_TAGS)))
    argv = ner_recipe_args(
        teacher, os.path.join(workdir, "run"), "--max_train_samples", "32", "--transfer_train_samples", "16",
        "--max_eval_samples", "20", "--per_device_train_batch_size", "8", "--finetune_teacher", "no",
    )
    with open(os.path.join(workdir, "ner_args.txt"), "w") as file:
        file.write("\n".join(argv))


NER_TAGS = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]


def test_ner_recipe_under_two_processes(ddp):
    """The per-token cache and its padding collator under DDP; the main process alone reports, on all sentences."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

    from hf_distill.recipe_support.metrics import SeqevalMetric
    from hf_distill.recipe_support.tasks.token_classification import (
        load_token_classification_data,
        tokenize_and_align_labels,
    )

    main, other = ddp.results("ner_recipe")
    assert main["calls"] == {"write_comparison": 1}
    assert other["calls"] == {"write_comparison": 0}
    workdir = os.path.join(ddp.out_dir, "ner_recipe")
    run = os.path.join(workdir, "run")
    with open(os.path.join(run, "results.json")) as file:
        report = json.load(file)
    assert [row["name"] for row in report["rows"]] == ["teacher", "baseline", "student"]
    ModelCard.load(os.path.join(run, "student", "README.md"))

    student = AutoModelForTokenClassification.from_pretrained(os.path.join(run, "student")).eval()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "teacher"))
    raw, _ = load_token_classification_data(data_files={"validation": os.path.join(NER_FIXTURES, "validation.jsonl")})
    validation = tokenize_and_align_labels(raw["validation"].select(range(20)), tokenizer, NER_TAGS, 48)
    batch = DataCollatorForTokenClassification(tokenizer)([dict(row) for row in validation])
    labels = batch.pop("labels")
    with torch.no_grad():
        predicted = student(**batch).logits.argmax(-1)
    kept = [row != -100 for row in labels]
    f1 = SeqevalMetric().compute(
        predictions=[[NER_TAGS[i] for i in p[k]] for p, k in zip(predicted, kept)],
        references=[[NER_TAGS[i] for i in g[k]] for g, k in zip(labels, kept)],
    )["f1"]
    assert report["rows"][2]["metric_value"] == pytest.approx(f1, abs=1e-6)


# ---- 7. the causal-LM recipe under accelerate launch ----


def prepare_causal_lm_recipe(workdir):
    """A tiny Llama teacher, and the recipe's arguments in `workdir/lm_args.txt`."""
    os.makedirs(workdir)
    teacher = save_lm_teacher(os.path.join(workdir, "teacher"))
    argv = lm_recipe_args(teacher, os.path.join(workdir, "run"), "--per_device_train_batch_size", "4")
    with open(os.path.join(workdir, "lm_args.txt"), "w") as file:
        file.write("\n".join(argv))


def test_causal_lm_recipe_under_two_processes(ddp):
    main, other = ddp.results("causal_lm_recipe")
    assert main["num_processes"] == other["num_processes"] == NUM_PROCESSES
    assert main["calls"] == {"write_report": 1, "_build": 1}, "the main process did not report and cache once"
    assert other["calls"] == {"write_report": 0, "_build": 0}, "the other process wrote"

    workdir = os.path.join(ddp.out_dir, "causal_lm_recipe")
    with open(os.path.join(workdir, "run", "results.json")) as file:
        report = json.load(file)
    assert [row["name"] for row in report["rows"]] == ["teacher", "baseline", "student"]
    card = ModelCard.load(os.path.join(workdir, "run", "student", "README.md"))
    assert card.data.pipeline_tag == "text-generation"

    # The reported perplexity is the student's over every held-out block, as one process computes it here.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "teacher"))
    with open(os.path.join(LM_FIXTURES, "validation.txt"), encoding="utf-8") as file:
        ids = [tokenizer.convert_tokens_to_ids(word) for word in file.read().split()]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    student = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "run", "student")).eval()
    with torch.no_grad():
        logits = student(input_ids=blocks).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert report["rows"][2]["metric_value"] == pytest.approx(nll.exp().item(), rel=1e-4)
