"""End-to-end `DistillationTrainer` runs on tiny random BERTs (CPU, no downloads)."""

import os

import numpy as np
import pytest
import torch
from conftest import (
    NUM_LABELS,
    logits_of,
    make_args,
    peaked_teacher,
    reference_ce,
    reference_kd,
    tiny_bert,
    toy_dataset,
)
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from hf_distill import (
    DistillationTrainer,
    cache_teacher_logits,
)


def test_student_learns_the_teacher_from_cached_logits(tmp_path, tokenizer):
    teacher, student = peaked_teacher(), tiny_bert(seed=2)
    train, held_out = toy_dataset(128, seed=0), toy_dataset(64, seed=1)
    teacher_logits = logits_of(teacher, held_out)
    before = logits_of(student, held_out)
    args = make_args(tmp_path, alpha=1.0, temperature=2.0, num_train_epochs=8, learning_rate=3e-3)
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=train, processing_class=tokenizer, teacher_model=teacher
    )
    trainer.train()
    after = logits_of(student, held_out)

    def agreement(logits):
        return float((logits.argmax(-1) == teacher_logits.argmax(-1)).mean())

    assert reference_kd(after, teacher_logits, 1.0) < 0.3 * reference_kd(before, teacher_logits, 1.0)
    assert agreement(after) >= 0.8 > agreement(before)


def test_logged_terms_add_up_to_the_loss(tmp_path, tokenizer, teacher):
    args = make_args(tmp_path, alpha=0.3, logging_steps=2)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2), args=args, train_dataset=toy_dataset(32), processing_class=tokenizer,
        teacher_model=teacher,
    )
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 2
    for log in train_logs:
        assert log["loss"] == pytest.approx(0.3 * log["loss_kd"] + 0.7 * log["loss_ce"], rel=1e-4)


def run_steps(tmp_path, name, tokenizer, teacher_logits_dataset, **overrides):
    args = make_args(tmp_path / name, alpha=0.5, max_steps=3, **overrides)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2), args=args, train_dataset=teacher_logits_dataset, processing_class=tokenizer
    )
    trainer.train()
    return [(log["loss"], log["grad_norm"], log["loss_kd"], log["loss_ce"]) for log in trainer.state.log_history
            if "loss" in log]


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tokenizer, teacher):
    dataset = cache_teacher_logits(teacher, toy_dataset(48), cache_dir=str(tmp_path / "c"), dtype="float32")
    full = run_steps(tmp_path, "full", tokenizer, dataset, per_device_train_batch_size=8)
    accumulated = run_steps(
        tmp_path, "ga", tokenizer, dataset, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    np.testing.assert_allclose(np.array(accumulated)[:, :2], np.array(full)[:, :2], rtol=1e-5)


def test_online_teacher_matches_cached_logits(tmp_path, tokenizer, teacher):
    cached = run_steps(
        tmp_path, "cached", tokenizer,
        cache_teacher_logits(teacher, toy_dataset(48), cache_dir=str(tmp_path / "c"), dtype="float32"),
    )
    args = make_args(tmp_path / "online", alpha=0.5, max_steps=3, use_teacher_cache=False)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2), args=args, train_dataset=toy_dataset(48), processing_class=tokenizer,
        teacher_model=teacher,
    )
    trainer.train()
    online = [(log["loss"], log["grad_norm"], log["loss_kd"], log["loss_ce"]) for log in trainer.state.log_history
              if "loss" in log]
    np.testing.assert_allclose(np.array(online), np.array(cached), rtol=1e-4)
    assert not trainer.teacher_model.training
    assert not any(parameter.requires_grad for parameter in trainer.teacher_model.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not os.path.exists(args.teacher_cache_dir)


@pytest.mark.parametrize("with_labels", [True, False])
def test_eval_loss_is_the_distillation_loss(tmp_path, tokenizer, with_labels):
    teacher, student = peaked_teacher(), tiny_bert(seed=2)
    eval_dataset = toy_dataset(24, seed=3, with_labels=with_labels)
    received = {}

    def compute_metrics(prediction):
        received["predictions"] = prediction.predictions
        received["label_ids"] = prediction.label_ids
        return {"mean_logit": float(np.mean(prediction.predictions))}

    args = make_args(tmp_path, alpha=0.4, temperature=3.0)
    trainer = DistillationTrainer(
        model=student, args=args, eval_dataset=eval_dataset, processing_class=tokenizer, teacher_model=teacher,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    student_logits, teacher_logits = logits_of(student, eval_dataset), logits_of(teacher, eval_dataset)
    kd = reference_kd(student_logits, teacher_logits, 3.0)
    expected = 0.4 * kd
    if with_labels:
        expected += 0.6 * reference_ce(student_logits, np.array(eval_dataset["label"]))
        np.testing.assert_array_equal(received["label_ids"], eval_dataset["label"])
        np.testing.assert_allclose(received["predictions"], student_logits, atol=1e-4)
    else:
        assert "eval_loss_ce" not in metrics
        assert not received  # Trainer calls compute_metrics only when there are labels
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-3)
    assert metrics["eval_loss_kd"] == pytest.approx(kd, rel=1e-3)
    expected_agreement = float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).mean())
    assert metrics["eval_teacher_agreement"] == pytest.approx(expected_agreement)


def test_regression_head_uses_mse_on_logits(tmp_path, tokenizer):
    teacher, student = tiny_bert(48, 4, num_labels=1, seed=1), tiny_bert(num_labels=1, seed=2)
    eval_dataset = toy_dataset(16, num_labels=1)
    trainer = DistillationTrainer(
        model=student, args=make_args(tmp_path, alpha=0.5), eval_dataset=eval_dataset, processing_class=tokenizer,
        teacher_model=teacher,
    )
    assert trainer.distillation_loss == "mse"
    metrics = trainer.evaluate()
    student_logits, teacher_logits = logits_of(student, eval_dataset), logits_of(teacher, eval_dataset)
    labels = np.array(eval_dataset["label"])
    kd = np.mean((student_logits - teacher_logits) ** 2)
    expected = 0.5 * kd + 0.5 * np.mean((student_logits[:, 0] - labels) ** 2)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-3)
    assert "eval_teacher_agreement" not in metrics


def test_teacher_columns_survive_filtering_and_never_reach_the_student(tmp_path, tokenizer, teacher):
    dataset = toy_dataset(16).add_column("sentence", ["raw text"] * 16)
    dataset = dataset.add_column("sample_weight", [1.0, 0.0] * 8)
    student = tiny_bert(seed=2)
    seen_keys = set()
    student.register_forward_pre_hook(lambda module, args, kwargs: seen_keys.update(kwargs), with_kwargs=True)
    trainer = DistillationTrainer(
        model=student, args=make_args(tmp_path, max_steps=2), train_dataset=dataset, processing_class=tokenizer,
        teacher_model=teacher,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"teacher_logits", "sample_weight", "labels", "input_ids"} <= set(batch)
    assert "sentence" not in batch
    assert batch["teacher_logits"].shape == (8, NUM_LABELS)
    trainer.train()
    assert seen_keys == {"input_ids", "attention_mask"}


def test_saved_student_reloads_without_the_teacher(tmp_path, tokenizer, teacher):
    student = tiny_bert(seed=2)
    trainer = DistillationTrainer(
        model=student, args=make_args(tmp_path, max_steps=2), train_dataset=toy_dataset(16),
        processing_class=tokenizer, teacher_model=teacher,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "student"))
    assert reloaded.config.hidden_size == 32
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)
    saved = os.listdir(tmp_path / "student")
    assert "model.safetensors" in saved and not any("teacher" in name for name in saved)


# ---- bad input: a clear error before any teacher pass or training step, and nothing written ----


def assert_nothing_written(tmp_path):
    assert not os.path.exists(tmp_path / "out")
    assert not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", 0.0, r"temperature=0.0 is invalid: it must be > 0"),
        ("temperature", -1.0, r"temperature=-1.0 is invalid: it must be > 0"),
        ("student_temperature", -2.0, r"student_temperature=-2.0 is invalid: it must be > 0"),
        ("alpha", 1.5, r"alpha=1.5 is invalid: it must be in \[0, 1\]"),
        ("alpha", -0.1, r"alpha=-0.1 is invalid: it must be in \[0, 1\]"),
        ("distillation_loss", "js", r"distillation_loss='js' is invalid: it must be one of"),
        ("teacher_cache_dtype", "int8", r"teacher_cache_dtype='int8' is invalid"),
    ],
)
def test_invalid_arguments(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **{field: value})


def test_label_space_mismatch(tmp_path, tokenizer):
    teacher = tiny_bert(48, 4, num_labels=2)
    with pytest.raises(ValueError, match="teacher has num_labels=2 but the student has num_labels=3"):
        DistillationTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=toy_dataset(8),
                            processing_class=tokenizer, teacher_model=teacher)
    named = {"id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    swapped = {"id2label": {0: "b", 1: "a", 2: "c"}, "label2id": {"b": 0, "a": 1, "c": 2}}
    with pytest.raises(ValueError, match="id2label .* differs from the student's"):
        DistillationTrainer(model=tiny_bert(**named), args=make_args(tmp_path), train_dataset=toy_dataset(8),
                            processing_class=tokenizer, teacher_model=tiny_bert(48, 4, **swapped))
    assert_nothing_written(tmp_path)


def test_vocabulary_mismatch(tmp_path, tokenizer):
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=NUM_LABELS)
    with pytest.raises(ValueError, match="vocabulary has 120 tokens but the student's has 99.*share a tokenizer"):
        DistillationTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=toy_dataset(8),
                            processing_class=tokenizer, teacher_model=BertForSequenceClassification(config))
    assert_nothing_written(tmp_path)


def test_cached_logits_of_the_wrong_width(tmp_path, tokenizer):
    dataset = toy_dataset(8).add_column("teacher_logits", [[0.1, 0.2]] * 8)
    with pytest.raises(ValueError, match=r"shape \(2,\) per example, but the student has num_labels=3"):
        DistillationTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=dataset,
                            processing_class=tokenizer)


def test_non_finite_cached_logits(tmp_path, tokenizer):
    dataset = toy_dataset(8).add_column("teacher_logits", [[0.1, 0.2, 0.3]] * 7 + [[0.1, float("nan"), 0.3]])
    with pytest.raises(ValueError, match="NaN or infinite teacher logits in 1 rows \\(first: row 7\\)"):
        DistillationTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=dataset,
                            processing_class=tokenizer)


def test_empty_dataset(tmp_path, tokenizer, teacher):
    with pytest.raises(ValueError, match="The train dataset is empty"):
        DistillationTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=toy_dataset(8).select([]),
                            processing_class=tokenizer, teacher_model=teacher)
    assert_nothing_written(tmp_path)
