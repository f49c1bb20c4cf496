"""Logit losses against references computed independently with numpy/scipy in float64."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, rel_entr

from hf_distill.losses import kl_divergence_loss, label_loss, logit_mse_loss


def reference_kl(student, teacher, temperature, student_temperature, weights=None):
    """Per-example KL with scipy's rel_entr, weighted mean, times T * T_s."""
    teacher_probs = np.exp(log_softmax(teacher / temperature, axis=-1))
    student_probs = np.exp(log_softmax(student / student_temperature, axis=-1))
    per_example = np.array([rel_entr(p, q).sum() for p, q in zip(teacher_probs, student_probs)])
    weights = np.ones(len(per_example)) if weights is None else weights
    return float((weights * per_example).sum() / weights.sum() * temperature * student_temperature)


@pytest.mark.parametrize("temperature, student_temperature", [(1.0, 1.0), (2.0, 2.0), (4.0, 1.5), (20.0, 20.0)])
def test_kl_matches_scipy(temperature, student_temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (16, 5)), rng.normal(0, 3, (16, 5))
    loss = kl_divergence_loss(torch.tensor(student), torch.tensor(teacher), temperature, student_temperature)
    expected = reference_kl(student, teacher, temperature, student_temperature)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_kl_default_student_temperature_is_teacher_temperature():
    rng = np.random.default_rng(1)
    student, teacher = torch.tensor(rng.normal(size=(4, 3))), torch.tensor(rng.normal(size=(4, 3)))
    assert kl_divergence_loss(student, teacher, 3.0).item() == pytest.approx(
        kl_divergence_loss(student, teacher, 3.0, 3.0).item()
    )


def test_kl_scaled_by_t_squared():
    """T² makes the loss of the same logit gap comparable across temperatures (Hinton et al. 2015)."""
    rng = np.random.default_rng(2)
    student, teacher = rng.normal(size=(64, 4)), rng.normal(size=(64, 4))
    unscaled = reference_kl(student, teacher, 8.0, 8.0) / 64.0
    assert kl_divergence_loss(torch.tensor(student), torch.tensor(teacher), 8.0).item() == pytest.approx(
        unscaled * 64.0, rel=1e-4
    )


@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_kl_large_logits_stay_finite(temperature):
    rng = np.random.default_rng(3)
    student = rng.choice([-1e4, 1e4], size=(8, 4)) + rng.normal(size=(8, 4))
    teacher = rng.choice([-1e4, 1e4], size=(8, 4)) + rng.normal(size=(8, 4))
    loss = kl_divergence_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher), temperature)
    assert torch.isfinite(loss)
    # rel_entr underflows to inf here, so the reference stays in log space (float64).
    log_p = log_softmax(teacher / temperature, axis=-1)
    log_q = log_softmax(student / temperature, axis=-1)
    expected = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean() * temperature**2
    assert loss.item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_low_precision_inputs_computed_in_fp32(dtype):
    rng = np.random.default_rng(4)
    student = torch.tensor(rng.normal(0, 5, (8, 6))).to(dtype)
    teacher = torch.tensor(rng.normal(0, 5, (8, 6))).to(dtype)
    loss = kl_divergence_loss(student, teacher, 2.0)
    assert loss.dtype == torch.float32
    expected = reference_kl(student.double().numpy(), teacher.double().numpy(), 2.0, 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_kl_sample_weights_and_mask():
    rng = np.random.default_rng(5)
    student, teacher = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    weights = np.array([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    loss = kl_divergence_loss(torch.tensor(student), torch.tensor(teacher), 2.0, sample_weight=torch.tensor(weights))
    assert loss.item() == pytest.approx(reference_kl(student, teacher, 2.0, 2.0, weights), rel=1e-5)
    mask = torch.tensor([True, True, False, True, False, True])
    masked = kl_divergence_loss(torch.tensor(student), torch.tensor(teacher), 2.0, mask=mask)
    keep = mask.numpy()
    assert masked.item() == pytest.approx(reference_kl(student[keep], teacher[keep], 2.0, 2.0), rel=1e-5)


def test_kl_token_level_mask():
    """Token-level logits `(batch, seq, labels)` with a padding mask: equal to the KL over the kept tokens."""
    rng = np.random.default_rng(6)
    student, teacher = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    loss = kl_divergence_loss(torch.tensor(student), torch.tensor(teacher), 1.0, mask=torch.tensor(mask))
    assert loss.item() == pytest.approx(reference_kl(student[mask], teacher[mask], 1.0, 1.0), rel=1e-5)


def test_kl_is_zero_for_identical_logits_and_empty_mask():
    logits = torch.randn(4, 3)
    assert kl_divergence_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    empty = kl_divergence_loss(logits, torch.randn(4, 3), 2.0, mask=torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0


def test_shape_mismatch_error():
    with pytest.raises(ValueError, match="share the label space"):
        kl_divergence_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="share the label space"):
        logit_mse_loss(torch.randn(4, 1), torch.randn(4, 2))


def test_logit_mse_matches_numpy():
    rng = np.random.default_rng(7)
    student, teacher = rng.normal(size=(10, 1)), rng.normal(size=(10, 1))
    weights = rng.uniform(0.1, 2.0, size=10)
    expected = float((weights * ((student - teacher) ** 2).mean(axis=1)).sum() / weights.sum())
    loss = logit_mse_loss(torch.tensor(student), torch.tensor(teacher), sample_weight=torch.tensor(weights))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_label_loss_cross_entropy_skips_unlabelled():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(6, 3))
    labels = np.array([0, 2, -100, 1, -100, 2])
    keep = labels >= 0
    expected = -log_softmax(logits, axis=-1)[np.flatnonzero(keep), labels[keep]].mean()
    loss = label_loss(torch.tensor(logits), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    unlabelled = label_loss(torch.tensor(logits), torch.full((6,), -100))
    assert unlabelled.item() == 0.0


def test_label_loss_regression_skips_nan():
    predictions = torch.tensor([[1.0], [2.0], [0.5], [4.0]])
    labels = torch.tensor([1.5, float("nan"), 0.0, 3.0])
    expected = (0.25 + 0.25 + 1.0) / 3
    assert label_loss(predictions, labels).item() == pytest.approx(expected, rel=1e-6)
