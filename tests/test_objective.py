"""`DistillationObjective` on hand-made views, without a `Trainer` or a model: totals, normalisation, targets."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import reference_ce_rows, reference_kl_rows
from scipy.special import log_softmax

from hf_distill import DistillationTrainingArguments
from hf_distill.heads import CausalLMHead, DistillationHead, TopKTarget, Units
from hf_distill.losses import top_k_target
from hf_distill.objective import DistillationObjective, TermLog, resolve_distillation_loss, step_counts


def make_args(**overrides):
    values = dict(output_dir="unused", temperature=2.0, alpha=0.3, report_to=[], use_cpu=True)
    values.update(overrides)
    return DistillationTrainingArguments(**values)


def sequence_batch(rows=6, classes=4, seed=0):
    """Student and teacher logits `(rows, classes)`, labels with two unlabelled rows, and the head's units."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, classes, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(rows, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    labels[[1, 4]] = -100
    units = DistillationHead().units({"input_ids": torch.zeros(rows, 3)}, {"labels": labels})
    return student, teacher, labels, units


def objective_loss(objective, student, teacher, units, labels, **kwargs):
    outputs = SimpleNamespace(logits=student)
    return objective(outputs, [student], {"": [teacher]}, units, {"labels": labels}, **kwargs)


def test_total_is_alpha_mixed_weighted_means_of_the_references():
    student, teacher, labels, units = sequence_batch()
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.5])
    objective = DistillationObjective(DistillationHead(), make_args(), "kl", top_k=4)
    step = objective_loss(objective, student, teacher, units, labels, sample_weight=weights)

    w = weights.numpy()
    kd = reference_kl_rows(student.numpy(), teacher.numpy(), 2.0)
    labelled = labels.numpy() >= 0
    ce = reference_ce_rows(student.numpy()[labelled], labels.numpy()[labelled])
    expected_kd = (w * kd).sum() / w.sum()
    expected_ce = (w[labelled] * ce).sum() / w[labelled].sum()
    assert step.loss.item() == pytest.approx(0.3 * expected_kd + 0.7 * expected_ce, rel=1e-5)
    kd_sum, kd_weight = step.terms["loss_kd"]
    ce_sum, ce_weight = step.terms["loss_ce"]
    assert (kd_sum / kd_weight).item() == pytest.approx(expected_kd, rel=1e-5)
    assert (ce_sum / ce_weight).item() == pytest.approx(expected_ce, rel=1e-5)
    assert "teacher_agreement" not in step.terms


def test_micro_batches_divided_by_the_step_totals_add_up_to_the_whole_batch():
    student, teacher, labels, units = sequence_batch(rows=8)
    objective = DistillationObjective(DistillationHead(), make_args(), "kl", top_k=4)
    whole = objective_loss(objective, student, teacher, units, labels).loss
    halves = [slice(0, 3), slice(3, 8)]  # unequal micro-batches: a mean of means would differ
    head = DistillationHead()
    totals = sum(step_counts(head, {"input_ids": torch.zeros(8, 3)[part], "labels": labels[part]}, ["labels"],
                             "sample_weight") for part in halves)
    parts = []
    for part in halves:
        part_units = head.units({"input_ids": torch.zeros(8, 3)[part]}, {"labels": labels[part]})
        parts.append(objective_loss(objective, student[part], teacher[part], part_units, labels[part],
                                    step_totals=totals).loss)
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-5)


def test_alignment_terms_are_weighted_by_the_micro_batchs_share_of_examples():
    student, teacher, labels, units = sequence_batch(rows=6)
    objective = DistillationObjective(DistillationHead(), make_args(logits_loss_weight=0.0), "kl", top_k=4)
    totals = torch.tensor([12.0, 8.0, 12.0])  # this batch is half of the step's examples
    step = objective_loss(objective, student, teacher, units, labels, step_totals=totals,
                          alignment_terms={"loss_hidden": (2.0, torch.tensor(0.25))})
    assert step.loss.item() == pytest.approx(2.0 * 0.25 * 6 / 12)
    assert step.terms["loss_hidden"][1] == 1


def test_agreement_is_logged_when_evaluating():
    student, teacher, labels, units = sequence_batch()
    objective = DistillationObjective(DistillationHead(), make_args(), "kl", top_k=4)
    agreed, total = objective_loss(objective, student, teacher, units, labels, evaluating=True).terms[
        "teacher_agreement"]
    expected = (student.argmax(-1) == teacher.argmax(-1)).float().sum()
    assert agreed.item() == expected.item() and total.item() == 6


def test_two_teachers_are_mixed_by_their_weights():
    student, teacher, labels, units = sequence_batch()
    other = teacher.flip(-1)
    objective = DistillationObjective(DistillationHead(), make_args(teacher_weights=[0.25, 0.75]), "kl", top_k=4)
    mixed = objective.target_views({"a": [teacher], "b": [other]})[0]
    expected = np.log(0.25 * np.exp(log_softmax(teacher.numpy() / 2, -1)) + 0.75 * np.exp(
        log_softmax(other.numpy() / 2, -1)))
    np.testing.assert_allclose(log_softmax(mixed.numpy() / 2, -1), expected, rtol=1e-5)


def language_model_rows(rows=7, vocabulary=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocabulary, generator=generator, dtype=torch.float64)
    teacher = 4 * torch.randn(rows, vocabulary, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, vocabulary, (rows,), generator=generator)
    targets[2] = -100
    units = Units(torch.ones(rows, dtype=torch.bool), targets >= 0, targets)
    return student, teacher, targets, units


@pytest.mark.parametrize("distillation_loss", ["kl", "reverse_kl", "jsd"])
def test_vocabulary_rows_against_the_dense_reference(distillation_loss):
    student, teacher, targets, units = language_model_rows()
    args = make_args(temperature=1.0, jsd_beta=0.5)
    objective = DistillationObjective(CausalLMHead(), args, distillation_loss, top_k=11)
    kd, ce, labelled = objective.vocabulary_rows(student, teacher, units)
    s, t = log_softmax(student.numpy(), -1), log_softmax(teacher.numpy(), -1)
    p, q = np.exp(t), np.exp(s)
    if distillation_loss == "kl":
        expected = (p * (t - s)).sum(-1)
    elif distillation_loss == "reverse_kl":
        expected = (q * (s - t)).sum(-1)
    else:
        m = np.log(0.5 * p + 0.5 * q)
        expected = 0.5 * (p * (t - m)).sum(-1) + 0.5 * (q * (s - m)).sum(-1)
    np.testing.assert_allclose(kd.numpy(), expected, rtol=1e-5, atol=1e-6)
    expected_ce = -s[np.arange(7), targets.clamp_min(0).numpy()] * (targets.numpy() >= 0)
    np.testing.assert_allclose(ce.numpy(), expected_ce, rtol=1e-5, atol=1e-6)
    assert labelled.tolist() == [1, 1, 0, 1, 1, 1, 1]


def test_vocabulary_rows_of_a_top_k_target_with_its_rest_bucket():
    student, teacher, targets, units = language_model_rows()
    objective = DistillationObjective(CausalLMHead(), make_args(temperature=1.0), "kl", top_k=3)
    kd, _, _ = objective.vocabulary_rows(student, TopKTarget(*top_k_target(teacher, 3)), units)
    s, t = log_softmax(student.numpy(), -1), log_softmax(teacher.numpy(), -1)
    ids = np.argsort(-t, -1)[:, :3]
    p_k, s_k = np.take_along_axis(t, ids, -1), np.take_along_axis(s, ids, -1)
    p_rest = 1 - np.exp(p_k).sum(-1)
    s_rest = np.log(1 - np.exp(s_k).sum(-1))
    expected = (np.exp(p_k) * (p_k - s_k)).sum(-1) + p_rest * (np.log(p_rest) - s_rest)
    np.testing.assert_allclose(kd.numpy(), expected, rtol=1e-6)


def test_term_log_averages_over_the_window_and_skips_empty_terms():
    log = TermLog()
    log.add("loss_kd", torch.tensor(3.0), 2)
    log.add("loss_kd", torch.tensor(1.0), 2)
    log.add("loss_ce", torch.tensor(0.0), 0)
    doubled = log.pop_averages("cpu", lambda tensor: 2 * tensor)  # as if two processes logged the same
    assert doubled == {"loss_kd": 1.0}
    assert log.pop_averages("cpu", lambda tensor: tensor) == {}


def test_distillation_loss_resolution():
    regression = SimpleNamespace(num_labels=1)
    assert resolve_distillation_loss(DistillationHead(), regression, "auto") == "mse"
    assert resolve_distillation_loss(DistillationHead(), SimpleNamespace(num_labels=3), "auto") == "kl"
    assert resolve_distillation_loss(CausalLMHead(), regression, "auto") == "kl"
    with pytest.raises(ValueError, match="distillation_loss='mse' compares raw logits"):
        resolve_distillation_loss(CausalLMHead(), regression, "mse")
