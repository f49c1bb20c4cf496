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


def _np_kl(p_log, q_log):
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_matches_numpy(beta):
    """TRL's GKD convention: m = beta p_T + (1 - beta) p_S; beta 0 is forward KL, 1 reverse KL."""
    from hf_distill.losses import divergence_per_row

    rng = np.random.default_rng(11)
    student, teacher = rng.normal(0, 2, (5, 7)), rng.normal(0, 2, (5, 7))
    q, p = log_softmax(student / 2.0, -1), log_softmax(teacher / 2.0, -1)
    if beta == 0.0:
        expected = _np_kl(p, q)
    elif beta == 1.0:
        expected = _np_kl(q, p)
    else:
        m = np.log(beta * np.exp(p) + (1 - beta) * np.exp(q))
        expected = beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)
    loss = divergence_per_row(torch.tensor(student), torch.tensor(teacher), "jsd", 2.0, beta=beta)
    np.testing.assert_allclose(loss.numpy(), expected * 4.0, rtol=1e-5)


def test_reverse_kl_matches_numpy():
    from hf_distill.losses import divergence_per_row

    rng = np.random.default_rng(12)
    student, teacher = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    expected = _np_kl(log_softmax(student, -1), log_softmax(teacher, -1))
    loss = divergence_per_row(torch.tensor(student), torch.tensor(teacher), "reverse_kl")
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_masked_teacher_class_contributes_zero_not_nan():
    from hf_distill.losses import divergence_per_row

    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4)
    teacher[:, 0] = -torch.inf
    loss = divergence_per_row(student, teacher, "kl").sum()
    loss.backward()
    p = log_softmax(teacher[:, 1:].numpy(), -1)
    q = log_softmax(student.detach().numpy(), -1)[:, 1:]
    assert loss.item() == pytest.approx(_np_kl(p, q).sum(), rel=1e-5)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_top_k_covering_the_vocabulary_equals_the_dense_divergence(kind):
    from hf_distill.losses import divergence_per_row, sparse_divergence_per_row

    rng = np.random.default_rng(13)
    student, teacher = torch.tensor(rng.normal(size=(6, 9))), torch.tensor(rng.normal(0, 3, size=(6, 9)))
    log_probs, ids = torch.log_softmax(teacher / 2.0, -1).topk(9)
    sparse = sparse_divergence_per_row(student, ids, log_probs, torch.zeros(6), kind, "rest", 2.0)
    dense = divergence_per_row(student, teacher, kind, 2.0)
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=1e-5)


def test_top_k_renormalised_matches_numpy():
    from hf_distill.losses import sparse_divergence_per_row

    rng = np.random.default_rng(14)
    student, teacher = rng.normal(size=(4, 10)), rng.normal(0, 3, size=(4, 10))
    p = log_softmax(teacher, -1)
    ids = np.argsort(-p, -1)[:, :3]
    p_k = np.take_along_axis(p, ids, -1)
    q_k = np.take_along_axis(log_softmax(student, -1), ids, -1)
    expected = _np_kl(log_softmax(p_k, -1), log_softmax(q_k, -1))
    loss = sparse_divergence_per_row(torch.tensor(student), torch.tensor(ids), torch.tensor(p_k),
                                     torch.tensor(1 - np.exp(p_k).sum(-1)), "kl", "renormalise")
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_target_matches_numpy_across_row_blocks(temperature):
    from hf_distill.losses import TOP_K_TARGET_ROWS, top_k_target

    rng = np.random.default_rng(15)
    rows = 2 * TOP_K_TARGET_ROWS + 3  # three blocks, the last one short
    logits = rng.normal(0, 3, size=(rows, 40))
    logits[5, 7] = 60.0  # a row whose top k hold almost all the mass: its rest is summed exactly
    log_p = log_softmax(logits / temperature, axis=-1)
    expected_ids = np.argsort(-log_p, axis=-1)[:, :6]
    expected_log_probs = np.take_along_axis(log_p, expected_ids, -1)
    outside = log_p.copy()
    np.put_along_axis(outside, expected_ids, -np.inf, -1)
    expected_rest = np.exp(outside).sum(-1)

    ids, log_probs, rest = top_k_target(torch.tensor(logits, dtype=torch.float32).view(1, rows, 40), 6, temperature)
    assert ids.shape == log_probs.shape == (1, rows, 6) and rest.shape == (1, rows)
    np.testing.assert_array_equal(ids[0].numpy(), expected_ids)
    np.testing.assert_allclose(log_probs[0].numpy(), expected_log_probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rest[0].numpy(), expected_rest, rtol=1e-4, atol=1e-30)
    assert expected_rest[5] < 1e-8  # so the allclose above checked the exact path, not log1p of a rounded mass


@pytest.mark.parametrize("exact_top", [0, 2])
def test_sampled_target_shares_follow_the_softened_teacher(exact_top):
    from hf_distill.losses import sampled_target

    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0, -9.0]])
    expected = np.exp(log_softmax(logits[0].numpy() / 2.0))
    ids, log_probs, rest = sampled_target(logits, 20000, temperature=2.0, generator=generator, exact_top=exact_top)
    shares = np.zeros(6)
    shares[ids[0].numpy()] = log_probs[0].exp().numpy()
    np.testing.assert_allclose(shares, expected, atol=0.01)
    assert sorted(ids[0].tolist()) == list(range(6)) and rest.tolist() == [0.0]  # distinct ids, no tail
    np.testing.assert_allclose(shares[:exact_top], expected[:exact_top], rtol=1e-6)  # the exact classes


@pytest.mark.parametrize("exact_top", [0, 8])  # pure draws; the top 8 exact and 8 draws from the rest
def test_sampled_target_gives_the_full_kl_gradient_in_expectation_and_top_k_does_not(exact_top):
    from hf_distill.losses import divergence_per_row, sampled_target, sparse_divergence_per_row, top_k_target

    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 50, generator=generator) * 2
    student = torch.randn(6, 50, generator=generator, requires_grad=True)

    def gradient(loss):
        return torch.autograd.grad(loss.sum(), student)[0]

    full = gradient(divergence_per_row(student, teacher, "kl", 2.0))
    rounds = 400  # 6,400 draws per row: the mean gradient's standard error is ~0.01 per class
    sampled = sum(
        gradient(sparse_divergence_per_row(student, *sampled_target(teacher, 16, 2.0, generator, exact_top), "kl",
                                           "rest", 2.0))
        for _ in range(rounds)
    ) / rounds
    top_k = gradient(sparse_divergence_per_row(student, *top_k_target(teacher, 16, 2.0), "kl", "rest", 2.0))
    assert (sampled - full).abs().max() < 0.05 < (top_k - full).abs().max()


def test_chunked_rows_match_unchunked_values_and_gradients():
    from hf_distill.losses import chunked_per_row, divergence_per_row

    student = torch.randn(10, 5, requires_grad=True)
    teacher = torch.randn(10, 5)
    whole = divergence_per_row(student, teacher)
    (whole_grad,) = torch.autograd.grad(whole.sum(), student)
    chunked = chunked_per_row(lambda s, t: divergence_per_row(s, t), student, teacher, chunk_size=3)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), student)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked_grad, whole_grad)


@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0)])
def test_fused_forward_kl_and_cross_entropy_match_autograd(temperatures):
    from hf_distill.losses import divergence_per_row, forward_kl_and_cross_entropy_per_row, label_loss_per_row

    rng = np.random.default_rng(15)
    logits = torch.tensor(rng.normal(0, 2, (6, 11)), requires_grad=True)
    teacher = torch.tensor(rng.normal(0, 3, (6, 11)))
    teacher[0, 3] = -torch.inf
    targets = torch.tensor([1, -100, 4, 10, -100, 0])
    weights = torch.tensor(rng.uniform(0.5, 2.0, (2, 6)))
    kd, ce = forward_kl_and_cross_entropy_per_row(logits, teacher, targets, *temperatures)
    (grad,) = torch.autograd.grad((weights[0] * kd).sum() + (weights[1] * ce).sum(), logits)
    expected_kd = divergence_per_row(logits, teacher, "kl", *temperatures)
    expected_ce = label_loss_per_row(logits, targets)
    (expected_grad,) = torch.autograd.grad((weights[0] * expected_kd).sum() + (weights[1] * expected_ce).sum(), logits)
    torch.testing.assert_close(kd, expected_kd.to(kd.dtype))
    torch.testing.assert_close(ce, expected_ce.to(ce.dtype))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)  # both float32 inside, in another order
