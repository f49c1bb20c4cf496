"""Faults as users and machines hit them (issue 12): secrets on disk, silent NaN or zero losses, bad input caught
late, concurrent caches and interrupted checkpoints. Each bad input must fail with a message that names the problem
and the fix, before anything is written."""

import math
import os

import numpy as np
import pytest
import torch
from conftest import make_args, tiny_bert, toy_dataset

from hf_distill import DistillationTrainer, DistillationTrainingArguments, kl_divergence_loss
from hf_distill.teacher import check_teacher_logits_finite

SECRET = "hf_SECRETtoken0123456789abcdef"


def written_files(folder):
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def assert_nothing_written(tmp_path):
    """No output folder and no cache: at most the lock file that serialises cache builds."""
    assert not os.path.exists(tmp_path / "out")
    cache_dir = tmp_path / "cache"
    assert not cache_dir.exists() or all(name.endswith(".lock") for name in os.listdir(cache_dir))


# ---- 1. the Hub token never reaches a file ----


def test_hub_token_is_in_no_checkpoint_nor_saved_model(tmp_path, tokenizer, teacher, student):
    args = make_args(tmp_path, hub_token=SECRET, save_strategy="steps", save_steps=1, max_steps=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=toy_dataset(16), processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model()

    files = written_files(tmp_path)
    args_files = [path for path in files if path.endswith("training_args.bin")]
    assert len(args_files) == 3  # checkpoint-1, checkpoint-2 and the saved model
    for path in files:
        with open(path, "rb") as file:
            assert SECRET.encode() not in file.read(), path
    saved = torch.load(args_files[0], weights_only=False)
    assert saved.hub_token is None and saved.temperature == args.temperature
    assert trainer.args.hub_token == SECRET  # the live arguments keep it for push_to_hub


def test_repr_masks_the_hub_token():
    args = DistillationTrainingArguments(output_dir="unused", hub_token=SECRET, temperature=3.0)
    assert SECRET not in repr(args) and SECRET not in str(args)
    assert "<HUB_TOKEN>" in repr(args) and "temperature=3.0" in repr(args)


# ---- 2. regression + KL trains on nothing ----


def test_kl_on_a_regression_head_is_refused(tmp_path):
    regression = dict(num_labels=1)
    args = make_args(tmp_path, distillation_loss="kl")
    with pytest.raises(ValueError, match="num_labels=1.*'mse'.*'auto'"):
        DistillationTrainer(
            model=tiny_bert(**regression), teacher_model=tiny_bert(seed=1, **regression), args=args,
            train_dataset=toy_dataset(16, num_labels=1),
        )
    assert_nothing_written(tmp_path)


# ---- 3. non-finite values ----


@pytest.mark.parametrize("field", ["temperature", "student_temperature"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_temperature(field, value):
    with pytest.raises(ValueError, match=f"{field}=.*it must be > 0 and finite"):
        DistillationTrainingArguments(output_dir="unused", **{field: value})


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0, math.nan] * 8, "NaN or infinite.*row 1"),
        ([1.0, -0.5] * 8, "negative.*row 1"),
        ([0.0] * 16, "all 0"),
    ],
)
def test_bad_sample_weights(tmp_path, teacher, student, weights, message):
    dataset = toy_dataset(16).add_column("sample_weight", weights)
    with pytest.raises(ValueError, match=f"'sample_weight'.*{message}"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=dataset)
    assert_nothing_written(tmp_path)


def overflowing_teacher():
    """A float16 teacher whose logits overflow float16's range (65504) on every input: 48 pooled features of 1
    times weights of 1e4."""
    teacher = tiny_bert(hidden_size=48, num_layers=4, seed=1)
    with torch.no_grad():
        teacher.bert.pooler.dense.weight.zero_()
        teacher.bert.pooler.dense.bias.fill_(10.0)
        teacher.classifier.weight.fill_(1e4)
    return teacher.half()


@pytest.mark.parametrize("online", ["no cache", "alignment"])
def test_float16_teacher_overflow_online(tmp_path, tokenizer, student, online):
    options = {"use_teacher_cache": False} if online == "no cache" else {"hidden_cosine_loss_weight": 1.0}
    args = make_args(tmp_path, max_steps=1, **options)
    trainer = DistillationTrainer(
        model=student, teacher_model=overflowing_teacher(), args=args, train_dataset=toy_dataset(16),
        processing_class=tokenizer,
    )
    weights_before = [parameter.detach().clone() for parameter in student.parameters()]
    with pytest.raises(ValueError, match="NaN or infinite.*torch.float16.*run the teacher in float32"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(weights_before, student.parameters()))


def test_float16_teacher_overflow_while_caching(tmp_path, student):
    args = make_args(tmp_path, teacher_cache_dtype="float32")
    with pytest.raises(ValueError, match="NaN or infinite.*torch.float16.*run the teacher in float32"):
        DistillationTrainer(
            model=student, teacher_model=overflowing_teacher(), args=args, train_dataset=toy_dataset(16)
        )
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("values, refused", [
    ([[1.0, 2.0], [3.0, -4.0]], False),
    ([[1.0, -math.inf], [3.0, -4.0]], False),  # a masked class
    ([[1.0, math.nan], [3.0, -4.0]], True),
    ([[1.0, math.inf], [3.0, -4.0]], True),
    ([[1.0, math.inf], [-math.inf, -4.0]], True),  # +inf and -inf: their sum is NaN, the check must still see +inf
    ([[-math.inf, -math.inf], [3.0, -4.0]], True),  # a row without any class
])
def test_teacher_logit_check(values, refused):
    logits = torch.tensor(values)
    if refused:
        with pytest.raises(ValueError, match="NaN or infinite"):
            check_teacher_logits_finite(logits, torch.nn.Linear(1, 1))
    else:
        check_teacher_logits_finite(logits, torch.nn.Linear(1, 1))


def test_masked_class_with_minus_inf_teacher_logit():
    student_logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, -1.0]], requires_grad=True)
    teacher_logits = torch.tensor([[1.0, -math.inf, 0.5], [-math.inf, 2.0, 0.0]])
    loss = kl_divergence_loss(student_logits, teacher_logits, temperature=2.0)
    loss.backward()
    # Reference: the KL over the unmasked classes only, with the student's full softmax.
    expected = 0.0
    for row, masked in ((0, 1), (1, 0)):
        teacher_probs = torch.softmax(teacher_logits[row] / 2.0, dim=-1).double()
        student_log_probs = torch.log_softmax(student_logits[row].detach() / 2.0, dim=-1).double()
        kept = [c for c in range(3) if c != masked]
        expected += sum(teacher_probs[c] * (teacher_probs[c].log() - student_log_probs[c]) for c in kept)
    assert loss.item() == pytest.approx(float(expected) / 2 * 4.0, rel=1e-5)
    assert torch.isfinite(student_logits.grad).all()


# ---- 4. two processes building one cache ----

CACHE_WORKER = r"""
import os, sys, time
import numpy as np
from datasets import load_from_disk
from transformers import AutoModelForSequenceClassification
import hf_distill.cache as cache

folder, marker = sys.argv[1], sys.argv[2]
run_teacher = cache._run_teacher

def slow_run_teacher(*args, **kwargs):  # a teacher pass long enough for the other process to arrive meanwhile
    with open(marker, "a") as file:
        file.write(f"{os.getpid()}\n")
    time.sleep(3)
    return run_teacher(*args, **kwargs)

cache._run_teacher = slow_run_teacher
teacher = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "teacher"))
dataset = load_from_disk(os.path.join(folder, "data"))
with_logits = cache.cache_teacher_logits(
    teacher, dataset, cache_dir=os.path.join(folder, "cache"), show_progress=False
)
np.save(os.path.join(folder, f"logits-{os.getpid()}.npy"), np.asarray(with_logits["teacher_logits"]))
"""


def test_two_processes_share_one_cache_build(tmp_path, teacher):
    import subprocess
    import sys

    teacher.save_pretrained(tmp_path / "teacher")
    toy_dataset(24).save_to_disk(str(tmp_path / "data"))  # on disk: the same fingerprint in both processes
    # Leftover of a build killed in its write window.
    stale = tmp_path / "cache" / ".teacher_logits-stale-v2.tmp-x"
    stale.mkdir(parents=True)
    marker = tmp_path / "teacher_passes.txt"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's hf_distill, in the workers too
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CACHE_WORKER, str(tmp_path), str(marker)], env=environment,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=240)[0].decode() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert len(marker.read_text().split()) == 1  # one teacher pass; the other process waited and reused it
    logits = [np.load(path) for path in sorted(tmp_path.glob("logits-*.npy"))]
    assert len(logits) == 2 and np.array_equal(logits[0], logits[1])
    leftovers = [name for name in os.listdir(tmp_path / "cache") if ".tmp-" in name]
    assert leftovers == [".teacher_logits-stale-v2.tmp-x"]  # another cache's leftovers are not this build's to remove


def test_stale_temporary_folders_of_a_killed_build_are_removed(tmp_path, teacher):
    import shutil

    from hf_distill import cache_teacher_logits
    from hf_distill.cache import cache_folder

    dataset = toy_dataset(8)
    cache_dir = str(tmp_path / "cache")
    path = cache_folder(cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, show_progress=False))
    shutil.rmtree(path)
    stale = [os.path.join(cache_dir, f".{os.path.basename(path)}.tmp-{suffix}") for suffix in ("a1", "b2")]
    for folder in stale:
        os.makedirs(folder)
        open(os.path.join(folder, "data-00000-of-00001.arrow"), "wb").close()
    cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, show_progress=False)
    assert not any(os.path.exists(folder) for folder in stale)
    assert os.path.isdir(path)


# ---- 5. a checkpoint save interrupted ----


class SimulatedKill(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def projection_run(tmp_path, tokenizer, **overrides):
    """A 4-step run whose student (width 32) learns projections to the teacher's width (48)."""
    args = make_args(
        tmp_path, hidden_loss_weight=1.0, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1,
        **overrides,
    )
    return DistillationTrainer(
        model=tiny_bert(hidden_size=32, num_layers=2, seed=2),
        teacher_model=tiny_bert(hidden_size=48, num_layers=4, seed=1),
        args=args, train_dataset=toy_dataset(32), processing_class=tokenizer,
    )


def trained_state(trainer):
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize("killed_in", ["projections", "rng state"])
def test_resume_after_a_kill_during_checkpointing(tmp_path, tokenizer, monkeypatch, killed_in):
    from transformers import Trainer
    from transformers.testing_utils import CaptureLogger

    import hf_distill.checkpoints as checkpoints_module
    import hf_distill.wrapper as wrapper_module

    reference = projection_run(tmp_path / "reference", tokenizer)
    reference.train()

    trainer = projection_run(tmp_path, tokenizer)
    if killed_in == "projections":
        save_file = wrapper_module.save_file

        def killing_save_file(tensors, path, *args, **kwargs):
            if f"checkpoint-4{os.sep}" in path:
                raise SimulatedKill
            return save_file(tensors, path, *args, **kwargs)

        monkeypatch.setattr(wrapper_module, "save_file", killing_save_file)
    else:
        save_rng_state = Trainer._save_rng_state

        def killing_save_rng_state(self, output_dir):
            if output_dir.endswith("checkpoint-4"):
                raise SimulatedKill
            return save_rng_state(self, output_dir)

        monkeypatch.setattr(Trainer, "_save_rng_state", killing_save_rng_state)
    with pytest.raises(SimulatedKill):
        trainer.train()
    monkeypatch.undo()
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")  # a complete checkpoint survived the rotation

    resumed = projection_run(tmp_path, tokenizer)
    with CaptureLogger(checkpoints_module.logger) as captured:
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-4 is incomplete" in captured.out and "checkpoint-2" in captured.out
    expected = trained_state(reference)
    assert all(torch.equal(value, expected[name]) for name, value in trained_state(resumed).items())


def test_resume_with_only_incomplete_checkpoints(tmp_path, tokenizer):
    os.makedirs(tmp_path / "out" / "checkpoint-2")
    with open(tmp_path / "out" / "checkpoint-2" / "config.json", "w") as file:
        file.write("{}")
    trainer = projection_run(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="checkpoint-2 is incomplete.*no complete checkpoint.*resume_from_checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# ---- 6. eval datasets are checked before the train cache is built ----


@pytest.mark.parametrize(
    "eval_dataset, message",
    [
        (toy_dataset(8).add_column("teacher_logits", [[0.0, 1.0]] * 8), "teacher_logits.*shape \\(2,\\).*num_labels=3"),
        (toy_dataset(8).select([]), "eval dataset is empty"),
        ({"matched": toy_dataset(8), "mismatched": toy_dataset(8).select([])}, "eval 'mismatched' dataset is empty"),
    ],
)
def test_bad_eval_dataset_fails_before_the_train_cache(tmp_path, tokenizer, teacher, student, eval_dataset, message):
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=toy_dataset(16),
            eval_dataset=eval_dataset, processing_class=tokenizer,
        )
    assert_nothing_written(tmp_path)


# ---- 7. raw errors become messages, before any work ----


def test_token_ids_beyond_the_vocabulary(tmp_path, teacher, student):
    dataset = toy_dataset(16)
    dataset = dataset.map(
        lambda row, index: {"input_ids": row["input_ids"][:-1] + [150] if index == 5 else row["input_ids"]},
                          with_indices=True)
    with pytest.raises(ValueError, match="input_ids range over 2..150.*ids 0..98.*tokenize it with the teacher's"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=dataset)
    assert_nothing_written(tmp_path)


def test_label_beyond_num_labels(tmp_path, tokenizer, teacher, student):
    dataset = toy_dataset(16).map(lambda row, index: {"label": 7 if index == 3 else row["label"]}, with_indices=True)
    with pytest.raises(ValueError, match="label 7 \\(row 3\\).*num_labels=3"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=dataset,
            processing_class=tokenizer,
        )
    assert_nothing_written(tmp_path)


def test_tokenizer_larger_than_the_vocabulary(tmp_path, teacher, student):
    from conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer(str(tmp_path / "tokenizer"), [f"w{i}" for i in range(5, 120)])
    with pytest.raises(ValueError, match="has 120 tokens but the models' vocabulary has 99"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=toy_dataset(16),
            processing_class=tokenizer,
        )
    assert_nothing_written(tmp_path)


def test_teacher_without_logits(tmp_path, student):
    encoder = tiny_bert(hidden_size=48, num_layers=4, seed=1).bert  # a BertModel: hidden states, no logits
    with pytest.raises(ValueError, match="BertModel, a bare encoder.*no logits.*AutoModelForSequenceClassification"):
        DistillationTrainer(model=student, teacher_model=encoder, args=make_args(tmp_path),
                            train_dataset=toy_dataset(16))
    assert_nothing_written(tmp_path)


def test_malformed_layer_map_json():
    with pytest.raises(ValueError, match="layer_map='\\{1: 2\\}' is not valid JSON.*quoted keys"):
        DistillationTrainingArguments(output_dir="unused", layer_map="{1: 2}")


# ---- 8. float16 attention maps ----


def test_attention_relation_gradient_is_finite_for_float16_maps():
    from hf_distill import attention_relation_loss

    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 9:] = 0
    overflowing_cases = 0
    for _ in range(20):
        # Peaked student rows: many keys get probabilities far below float16's 6e-5 where the teacher has mass.
        student_scores = torch.randn(4, 2, 12, 12, generator=generator) * 8
        teacher_scores = torch.randn(4, 2, 12, 12, generator=generator)
        student = student_scores.softmax(-1).half().requires_grad_()
        teacher = teacher_scores.softmax(-1).half()
        loss = attention_relation_loss(student, teacher, mask)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
        # The same maps in float32 give large but representable gradients: 1/p beyond float16's range.
        student32 = student.detach().float().requires_grad_()
        attention_relation_loss(student32, teacher.float(), mask).backward()
        overflowing_cases += bool((student32.grad.abs() > torch.finfo(torch.float16).max).any())
    assert overflowing_cases > 0  # the cases are ones that overflowed before


def test_attention_relation_loss_unchanged_for_float32_maps():
    from hf_distill import attention_relation_loss

    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 5, 5, generator=generator).softmax(-1).double()
    teacher = torch.randn(2, 3, 5, 5, generator=generator).softmax(-1).double()
    mask = torch.ones(2, 5, dtype=torch.long)
    expected = (teacher * (teacher.log() - student.log())).sum(-1).mean()
    loss = attention_relation_loss(student.float(), teacher.float(), mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- noted: PEFT teachers, pypi: model packages ----


def test_peft_teacher_merge_in_place_is_announced(tmp_path, tokenizer, student):
    from peft import LoraConfig, get_peft_model
    from transformers.testing_utils import CaptureLogger

    import hf_distill.teacher as teacher_module

    teacher = get_peft_model(tiny_bert(hidden_size=48, num_layers=4, seed=1), LoraConfig(target_modules=["query"]))
    with CaptureLogger(teacher_module.logger) as captured:
        DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=toy_dataset(8),
            processing_class=tokenizer,
        )
    assert "in place" in captured.out and "copy.deepcopy(teacher)" in captured.out


def write_module(folder, name, source):
    path = folder / f"{name}.py"
    path.write_text(source)
    return path


@pytest.mark.parametrize(
    "name, message",
    [
        ("hf_distill_probe_no_entry", "defines no get_model_path\\(\\) in its source.*not imported"),
        ("os.path", "does not name a top-level Python module"),
        ("hf_distill_probe_missing", "which is not installed"),
    ],
)
def test_pypi_prefix_imports_only_model_packages(tmp_path, monkeypatch, name, message):
    from hf_distill.recipe_support.models import resolve_model_path

    marker = tmp_path / "imported"
    write_module(tmp_path, "hf_distill_probe_no_entry", f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        resolve_model_path(f"pypi:{name}")
    assert not marker.exists()  # the module's code never ran


def test_pypi_prefix_resolves_a_model_package(tmp_path, monkeypatch):
    from hf_distill.recipe_support.models import resolve_model_path

    (tmp_path / "model").mkdir()
    write_module(
        tmp_path, "hf_distill_probe_model",
        f"def get_model_path():\n    return {str(tmp_path / 'model')!r}\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path("pypi:hf_distill_probe_model") == str(tmp_path / "model")
