"""Image classification (`ViTForImageClassification`) and DeiT's distillation token
(`DeiTForImageClassificationWithTeacher`), on random 3x8x8 pixel arrays."""

import os

import numpy as np
import pytest
import torch
from conftest import (
    cached_and_online_logs,
    full_and_accumulated_logs,
    image_dataset,
    make_args,
    reference_ce_rows,
    reference_kl_rows,
    tiny_deit_with_teacher,
    tiny_vit,
    train_logs,
)
from transformers import AutoModelForImageClassification, DeiTForImageClassificationWithTeacher

from hf_distill import DistillationTrainer, cache_teacher_logits


def peaked_vit_teacher(seed=1):
    teacher = tiny_vit(hidden_size=48, num_layers=3, seed=seed)
    with torch.no_grad():
        teacher.classifier.weight.mul_(20.0)
    return teacher


def image_outputs(model, dataset):
    """The model's outputs on every image of `dataset`, as numpy arrays by output name."""
    model.eval()
    with torch.no_grad():
        outputs = model(pixel_values=torch.tensor(np.array(dataset["pixel_values"]), dtype=torch.float32))
    return {name: value.numpy() for name, value in outputs.items() if isinstance(value, torch.Tensor)}


def reference_loss(student_kd_logits, student_label_logits, teacher_logits, labels, alpha, temperature):
    """`(loss, kd, ce)`: KD over every image, CE over the images whose label is not -100."""
    labels = np.asarray(labels)
    kd = reference_kl_rows(student_kd_logits, teacher_logits, temperature).mean()
    ce = reference_ce_rows(student_label_logits[labels != -100], labels[labels != -100]).mean()
    return alpha * kd + (1 - alpha) * ce, kd, ce


def make_trainer(tmp_path, student, teacher=None, train=None, eval_dataset=None, compute_metrics=None, **overrides):
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides), train_dataset=train,
        eval_dataset=eval_dataset, compute_metrics=compute_metrics,
    )


def new_student_trainer(build_student):
    """Builds trainers of a fresh `build_student(seed=2)` (alpha 0.5, 3 steps) for the runs in conftest."""
    return lambda output_dir, teacher=None, train=None, **overrides: make_trainer(
        output_dir, build_student(seed=2), teacher, train=train, alpha=0.5, max_steps=3, **overrides
    )


def random_sign_flip(batch):
    """A random augmentation applied on access: each image negated with probability 1/2."""
    signs = np.where(np.random.default_rng().random(len(batch["pixel_values"])) < 0.5, -1.0, 1.0)
    batch["pixel_values"] = [torch.tensor(pixels) * sign for pixels, sign in zip(batch["pixel_values"], signs)]
    return batch


# ---- ViT ----


@pytest.mark.parametrize("use_teacher_cache", [True, False])
def test_vit_loss_matches_a_numpy_reference(tmp_path, use_teacher_cache):
    dataset = image_dataset(8, seed=3)  # images 3 and 7 unlabelled (-100): the distillation term only
    teacher, student = peaked_vit_teacher(), tiny_vit(seed=2)
    expected = reference_loss(image_outputs(student, dataset)["logits"], image_outputs(student, dataset)["logits"],
                              image_outputs(teacher, dataset)["logits"], dataset["labels"], alpha=0.4,
                              temperature=2.0)
    trainer = make_trainer(tmp_path, student, teacher, train=dataset, eval_dataset=dataset, alpha=0.4,
                           temperature=2.0, max_steps=1, learning_rate=0.0, teacher_cache_dtype="float32",
                           use_teacher_cache=use_teacher_cache)
    assert ("teacher_logits" in trainer.train_dataset.column_names) == use_teacher_cache
    metrics = trainer.evaluate()
    assert (metrics["eval_loss"], metrics["eval_loss_kd"], metrics["eval_loss_ce"]) == pytest.approx(expected,
                                                                                                      rel=1e-4)
    trainer.train()
    (loss, kd, ce), = train_logs(trainer, ("loss", "loss_kd", "loss_ce"))
    assert (loss, kd, ce) == pytest.approx(expected, rel=1e-4)


def test_vit_cached_and_online_teachers_train_identically(tmp_path):
    teacher, dataset = peaked_vit_teacher(), image_dataset(24)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path / "c"), dtype="float32")
    cached_logs, online_logs = cached_and_online_logs(tmp_path, new_student_trainer(tiny_vit), teacher, dataset, cached)
    np.testing.assert_allclose(online_logs, cached_logs, rtol=1e-4)


@pytest.mark.parametrize("build_student", [tiny_vit, tiny_deit_with_teacher])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, build_student):
    dataset = cache_teacher_logits(peaked_vit_teacher(), image_dataset(32), cache_dir=str(tmp_path / "c"),
                                   dtype="float32")
    full_logs, accumulated_logs = full_and_accumulated_logs(tmp_path, new_student_trainer(build_student), dataset)
    np.testing.assert_allclose(accumulated_logs, full_logs, rtol=1e-5)


def test_vit_student_moves_toward_the_teacher(tmp_path):
    teacher, student = peaked_vit_teacher(), tiny_vit(seed=2)
    held_out = image_dataset(32, seed=1)

    def held_out_kl():
        return reference_kl_rows(image_outputs(student, held_out)["logits"],
                                 image_outputs(teacher, held_out)["logits"], 1.0).mean()

    before = held_out_kl()
    make_trainer(tmp_path, student, teacher, train=image_dataset(64), alpha=1.0, num_train_epochs=4,
                 learning_rate=3e-3).train()
    assert held_out_kl() < 0.5 * before


def test_vit_saved_student_reloads_with_the_same_logits(tmp_path):
    trainer = make_trainer(tmp_path, tiny_vit(seed=2), peaked_vit_teacher(), train=image_dataset(16), max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "student"))
    dataset = image_dataset(4, seed=5)
    expected = image_outputs(trainer.model, dataset)["logits"]
    np.testing.assert_allclose(image_outputs(reloaded, dataset)["logits"], expected, atol=1e-6)


def test_random_transforms_are_refused_with_a_cache_and_run_online(tmp_path):
    dataset = image_dataset(16)
    dataset.set_transform(random_sign_flip)
    with pytest.raises(ValueError, match="transforms its rows on access .* use_teacher_cache=False"):
        make_trainer(tmp_path, tiny_vit(seed=2), peaked_vit_teacher(), train=dataset)
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "out")
    # Online, the teacher sees the view the student sees: with identical models the distillation term is 0.
    student = tiny_vit(seed=2)
    trainer = make_trainer(tmp_path, student, tiny_vit(seed=2), train=dataset, use_teacher_cache=False, max_steps=1,
                           learning_rate=0.0)
    trainer.train()
    (kd,), = train_logs(trainer, ("loss_kd",))
    assert kd == pytest.approx(0.0, abs=1e-6)


# ---- DeiT with its distillation token ----


@pytest.mark.parametrize("use_teacher_cache", [True, False])
def test_deit_distils_its_distillation_head_and_labels_its_class_head(tmp_path, use_teacher_cache):
    dataset = image_dataset(8, seed=3)
    teacher, student = peaked_vit_teacher(), tiny_deit_with_teacher(seed=2)
    outputs = image_outputs(student, dataset)
    expected = reference_loss(outputs["distillation_logits"], outputs["cls_logits"],
                              image_outputs(teacher, dataset)["logits"], dataset["labels"], alpha=0.4,
                              temperature=2.0)
    received = {}

    def compute_metrics(prediction):
        received["predictions"] = prediction.predictions
        return {}

    trainer = make_trainer(tmp_path, student, teacher, train=dataset, eval_dataset=dataset,
                           compute_metrics=compute_metrics, alpha=0.4, temperature=2.0, max_steps=1,
                           learning_rate=0.0, teacher_cache_dtype="float32", use_teacher_cache=use_teacher_cache)
    metrics = trainer.evaluate()
    assert (metrics["eval_loss"], metrics["eval_loss_kd"], metrics["eval_loss_ce"]) == pytest.approx(expected,
                                                                                                      rel=1e-4)
    # At inference DeiT predicts with the average of its two heads.
    averaged = (outputs["cls_logits"] + outputs["distillation_logits"]) / 2
    np.testing.assert_allclose(received["predictions"], averaged, atol=1e-5)
    trainer.train()
    (loss, kd, ce), = train_logs(trainer, ("loss", "loss_kd", "loss_ce"))
    assert (loss, kd, ce) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("alpha, trained, untouched", [(1.0, "distillation_classifier", "cls_classifier"),
                                                       (0.0, "cls_classifier", "distillation_classifier")])
def test_deit_heads_learn_from_their_own_targets(tmp_path, alpha, trained, untouched):
    student = tiny_deit_with_teacher(seed=2)
    before = {name: getattr(student, name).weight.detach().clone() for name in (trained, untouched)}
    make_trainer(tmp_path, student, peaked_vit_teacher(), train=image_dataset(16), alpha=alpha, max_steps=2).train()
    assert not torch.equal(getattr(student, trained).weight, before[trained])
    torch.testing.assert_close(getattr(student, untouched).weight, before[untouched], rtol=0, atol=0)


def test_deit_distillation_head_moves_toward_the_teacher(tmp_path):
    teacher, student = peaked_vit_teacher(), tiny_deit_with_teacher(seed=2)
    held_out = image_dataset(32, seed=1)

    def held_out_kl():
        return reference_kl_rows(image_outputs(student, held_out)["distillation_logits"],
                                 image_outputs(teacher, held_out)["logits"], 1.0).mean()

    before = held_out_kl()
    make_trainer(tmp_path, student, teacher, train=image_dataset(64), alpha=0.9, num_train_epochs=4,
                 learning_rate=3e-3).train()
    assert held_out_kl() < 0.5 * before


def test_deit_saved_student_reloads_with_the_same_logits(tmp_path):
    trainer = make_trainer(tmp_path, tiny_deit_with_teacher(seed=2), peaked_vit_teacher(), train=image_dataset(16),
                           max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = DeiTForImageClassificationWithTeacher.from_pretrained(str(tmp_path / "student"))
    dataset = image_dataset(4, seed=5)
    for name, values in image_outputs(trainer.model, dataset).items():
        np.testing.assert_allclose(image_outputs(reloaded, dataset)[name], values, atol=1e-6)
