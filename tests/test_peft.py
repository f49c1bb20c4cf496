"""PEFT (LoRA) students and teachers in `DistillationTrainer`, on tiny random BERTs (CPU, no downloads)."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import logits_of, make_args, peaked_teacher, reference_kd, tiny_bert, toy_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import BertForSequenceClassification

from hf_distill import DistillationTrainer
from hf_distill.wrapper import PROJECTIONS_FILE, DistillWrapper

STUDENT_SEED = 2
# Parameter names of the trainable copies PEFT adds: the LoRA factors and the classifier under modules_to_save.
TRAINABLE_MARKERS = ("lora_", "modules_to_save")


def lora_config(**overrides):
    config = {
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"],
        "task_type": "SEQ_CLS",
    }
    return LoraConfig(**{**config, **overrides})


def lora_student(hidden_size=32):
    return get_peft_model(tiny_bert(hidden_size=hidden_size, num_layers=2, seed=STUDENT_SEED), lora_config())


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.named_parameters()}


def is_peft_added(name):
    return any(marker in name for marker in TRAINABLE_MARKERS)


def assert_only_adapter_trained(model, before):
    """Every LoRA and modules_to_save parameter moved; every other parameter is bit-identical."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {name for name in before if is_peft_added(name)}
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, before[name]), f"{name} did not change"
        else:
            assert torch.equal(parameter, before[name]), f"frozen {name} changed"


def safetensors_keys(folder, skip=()):
    keys = []
    for file_name in os.listdir(folder):
        if file_name.endswith(".safetensors") and file_name not in skip:
            with safe_open(os.path.join(folder, file_name), framework="pt") as file:
                keys += list(file.keys())
    return keys


def assert_adapter_only(folder, student, skip=()):
    """`folder` holds the student's trainable PEFT tensors (under PEFT's saved names) and nothing else."""
    saved = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert not saved & {"model.safetensors", "pytorch_model.bin", "config.json"}
    keys = safetensors_keys(folder, skip)
    assert not any("projections" in key for key in keys)
    trainable = [name for name, parameter in student.named_parameters() if parameter.requires_grad]
    assert sorted(keys) == sorted(
        name.replace("modules_to_save.default.", "").replace(".default.", ".") for name in trainable
    )


def train_logs(trainer, *names):
    return [tuple(log[name] for name in names) for log in trainer.state.log_history if "loss" in log]


# ---- LoRA student on cached logits ----


def test_lora_student_learns_trains_only_the_adapter_and_saves_it_alone(tmp_path, tokenizer):
    teacher, student = peaked_teacher(), lora_student()
    train = toy_dataset(32)
    teacher_logits = logits_of(teacher, train)
    kd_before = reference_kd(logits_of(student, train), teacher_logits, 1.0)
    before = snapshot(student)
    args = make_args(tmp_path, alpha=1.0, num_train_epochs=4, learning_rate=1e-2, teacher_cache_dtype="float32")
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=train, processing_class=tokenizer, teacher_model=teacher
    )
    np.testing.assert_allclose(np.array(trainer.train_dataset["teacher_logits"]), teacher_logits, atol=1e-5)
    assert trainer.model is student and trainer.student is student
    trainer.train()

    assert {"loss_kd", "loss_ce"} <= set(trainer.state.log_history[0])
    assert reference_kd(logits_of(student, train), teacher_logits, 1.0) < 0.5 * kd_before
    assert_only_adapter_trained(student, before)

    output_dir = tmp_path / "adapter"
    trainer.save_model(str(output_dir))
    assert_adapter_only(output_dir, student)
    with open(output_dir / "adapter_config.json") as file:
        adapter_config = json.load(file)
    assert set(adapter_config["target_modules"]) == {"query", "value"}
    assert "classifier" in adapter_config["modules_to_save"]
    reloaded = PeftModel.from_pretrained(tiny_bert(seed=STUDENT_SEED), str(output_dir))
    np.testing.assert_array_equal(logits_of(reloaded, train), logits_of(student, train))


# ---- LoRA student with intermediate-layer alignment ----


def test_lora_student_with_hidden_and_attention_losses_of_equal_widths(tmp_path, tokenizer):
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), lora_student()
    before = snapshot(student)
    args = make_args(tmp_path, alpha=0.5, hidden_loss_weight=1.0, attention_loss_weight=1.0, num_train_epochs=4,
                     learning_rate=1e-2)
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=toy_dataset(32), processing_class=tokenizer, teacher_model=teacher
    )
    assert trainer.model is student  # equal widths: no projections, so no wrapper
    assert student.config._attn_implementation == "eager"
    assert trainer.teacher_model.config._attn_implementation == "eager"
    trainer.train()

    logs = train_logs(trainer, "loss", "loss_kd", "loss_ce", "loss_hidden", "loss_attention")
    assert len(logs) == 16
    for loss, kd, ce, hidden, attention in logs:
        assert loss == pytest.approx(0.5 * kd + 0.5 * ce + hidden + attention, rel=1e-4)
        assert hidden > 0 and attention > 0
    first_epoch, last_epoch = np.array(logs[:4]), np.array(logs[-4:])
    assert last_epoch[:, 0].mean() < first_epoch[:, 0].mean()
    assert last_epoch[:, 3].mean() < first_epoch[:, 3].mean()  # LoRA on query/value moves the hidden states
    assert_only_adapter_trained(student, before)


def projection_run(tmp_path, tokenizer, name, eval_dataset=None, **overrides):
    """LoRA student of width 16 aligned with a teacher of width 32: 4 steps, a checkpoint every 2 by default."""
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), lora_student(hidden_size=16)
    settings = {"alpha": 0.5, "hidden_loss_weight": 1.0, "max_steps": 4, "learning_rate": 1e-2,
                "save_strategy": "steps", "save_steps": 2}
    return DistillationTrainer(
        model=student, args=make_args(tmp_path / name, **{**settings, **overrides}), train_dataset=toy_dataset(32),
        eval_dataset=eval_dataset, processing_class=tokenizer, teacher_model=teacher,
    )


def test_lora_student_with_projections_saves_the_adapter_alone_and_resumes_exactly(tmp_path, tokenizer):
    trainer = projection_run(tmp_path, tokenizer, "full")
    student = trainer.student
    assert isinstance(trainer.model, DistillWrapper) and isinstance(student, PeftModel)
    assert trainer.model.student is student
    projections_before = snapshot(trainer.model.projections)
    before = snapshot(student)
    trainer.train()
    names = ("loss", "grad_norm", "loss_kd", "loss_ce", "loss_hidden")
    uninterrupted = train_logs(trainer, *names)
    assert len(uninterrupted) == 4
    assert_only_adapter_trained(student, before)
    for name, tensor in trainer.model.projections.named_parameters():
        assert not torch.equal(tensor, projections_before[name]), f"projection {name} did not train"

    output_dir = tmp_path / "adapter"
    trainer.save_model(str(output_dir))
    assert_adapter_only(output_dir, student)
    reloaded = PeftModel.from_pretrained(tiny_bert(hidden_size=16, seed=STUDENT_SEED), str(output_dir))
    probe = toy_dataset(8, seed=5)
    np.testing.assert_array_equal(logits_of(reloaded, probe), logits_of(student, probe))

    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert PROJECTIONS_FILE in os.listdir(checkpoint)
    with safe_open(str(checkpoint / PROJECTIONS_FILE), framework="pt") as file:
        assert set(file.keys()) == set(trainer.model.projections.state_dict())
    assert_adapter_only(checkpoint, student, skip=(PROJECTIONS_FILE,))

    resumed = projection_run(tmp_path, tokenizer, "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_logs = [log for log in resumed.state.log_history if "loss" in log and log["step"] > 2]
    assert [tuple(log[name] for name in names) for log in resumed_logs] == uninterrupted[2:]
    for name, tensor in resumed.model.projections.state_dict().items():
        torch.testing.assert_close(tensor, trainer.model.projections.state_dict()[name], rtol=0, atol=0)


def test_best_lora_checkpoint_is_restored_with_its_projections(tmp_path, tokenizer):
    # greater_is_better=True on eval_loss makes the first checkpoint the best: restoring it must undo three steps
    # of both the adapter and the projections.
    trainer = projection_run(
        tmp_path, tokenizer, "best", eval_dataset=toy_dataset(8, seed=4), save_steps=1, eval_strategy="steps",
        eval_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
    )
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    assert evaluations[0]["eval_loss"] > evaluations[-1]["eval_loss"]
    restored = trainer.evaluate()
    assert restored["eval_loss"] == evaluations[0]["eval_loss"]
    assert restored["eval_loss_hidden"] == evaluations[0]["eval_loss_hidden"]


# ---- teacher given as base + LoRA adapter ----


def test_peft_teacher_is_merged_into_a_plain_frozen_model(tmp_path, tokenizer):
    base_teacher = tiny_bert(hidden_size=48, num_layers=4, seed=1)
    base_logits = logits_of(base_teacher, toy_dataset(16))
    # init_lora_weights=False draws B at random as well, so the adapter changes the outputs from the first step.
    adapted = get_peft_model(base_teacher, lora_config(init_lora_weights=False))
    with torch.no_grad():
        adapted.base_model.model.classifier.modules_to_save["default"].weight.mul_(20.0)
    adapter_dir = tmp_path / "teacher_adapter"
    adapted.save_pretrained(str(adapter_dir))
    teacher = PeftModel.from_pretrained(tiny_bert(hidden_size=48, num_layers=4, seed=1), str(adapter_dir))
    train = toy_dataset(16)
    expected = logits_of(teacher, train)
    assert np.abs(expected - base_logits).max() > 0.1  # a non-trivial adapter
    teacher.train().requires_grad_(True)  # as a teacher fresh from its own fine-tuning: the trainer must freeze it

    args = make_args(tmp_path, teacher_cache_dtype="float32", max_steps=1)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=STUDENT_SEED), args=args, train_dataset=train, processing_class=tokenizer,
        teacher_model=teacher,
    )
    merged = trainer.teacher_model
    assert type(merged) is BertForSequenceClassification
    assert not merged.training
    assert not any(parameter.requires_grad for parameter in merged.parameters())
    assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.named_modules())
    np.testing.assert_allclose(logits_of(merged, train), expected, atol=1e-5)
    np.testing.assert_allclose(np.array(trainer.train_dataset["teacher_logits"]), expected, atol=1e-5)
    trainer.train()
    assert trainer.teacher_model is merged
    optimized = {id(parameter) for group in trainer.optimizer.param_groups for parameter in group["params"]}
    assert not optimized & {id(parameter) for parameter in merged.parameters()}
    np.testing.assert_allclose(logits_of(merged, train), expected, atol=1e-5)
