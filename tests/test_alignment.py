"""Layer maps, width projections and intermediate-layer losses, checked against loop-based numpy references."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, rel_entr
from transformers import BertConfig, BertModel

from hf_distill.alignment import (
    HiddenStateProjection,
    attention_mse_loss,
    attention_relation_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    resolve_layer_map,
    value_relation_loss,
)

# Row 0 is fully real, row 1 has two padded positions at the end.
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _random_attention(batch, heads, seq_len, mask, generator):
    """Post-softmax probabilities `(batch, heads, seq_len, seq_len)` with padded keys at probability 0."""
    scores = torch.randn(batch, heads, seq_len, seq_len, generator=generator)
    scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    return scores.softmax(dim=-1)


def _per_example_mean(per_example_values):
    """Mean over examples of each example's mean: every example counts equally, whatever its length."""
    return float(np.mean([np.mean(values) for values in per_example_values if len(values)]))


def _real_indices(mask):
    return [np.flatnonzero(row) for row in mask.numpy()]


def reference_hidden_mse(student, teacher, mask):
    student, teacher = student.double().numpy(), teacher.double().numpy()
    return _per_example_mean(
        [[np.mean((student[b, i] - teacher[b, i]) ** 2) for i in real] for b, real in enumerate(_real_indices(mask))]
    )


def reference_hidden_cosine(student, teacher, mask):
    student, teacher = student.double().numpy(), teacher.double().numpy()

    def distance(a, b):
        return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    return _per_example_mean(
        [[distance(student[b, i], teacher[b, i]) for i in real] for b, real in enumerate(_real_indices(mask))]
    )


def _head_averaged(student, teacher):
    student, teacher = student.double().numpy(), teacher.double().numpy()
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(axis=1, keepdims=True), teacher.mean(axis=1, keepdims=True)
    return student, teacher


def reference_attention_mse(student, teacher, mask):
    student, teacher = _head_averaged(student, teacher)
    per_example = []
    for b, real in enumerate(_real_indices(mask)):
        errors = []
        for h in range(student.shape[1]):
            errors.extend(((student[b, h][np.ix_(real, real)] - teacher[b, h][np.ix_(real, real)]) ** 2).ravel())
        per_example.append(errors)
    return _per_example_mean(per_example)


def reference_attention_relation(student, teacher, mask):
    student, teacher = _head_averaged(student, teacher)
    per_example = []
    for b, real in enumerate(_real_indices(mask)):
        divergences = []
        for h in range(student.shape[1]):
            for i in real:
                teacher_row = teacher[b, h, i, real] / teacher[b, h, i, real].sum()
                student_row = student[b, h, i, real] / student[b, h, i, real].sum()
                divergences.append(rel_entr(teacher_row, student_row).sum())
        per_example.append(divergences)
    return _per_example_mean(per_example)


def reference_value_relation(student, teacher, mask, num_relation_heads):
    def relation_log_probs(values, b, h, real):
        head = np.split(values.double().numpy()[b], num_relation_heads, axis=-1)[h][real]
        return log_softmax(head @ head.T / np.sqrt(head.shape[-1]), axis=-1)

    per_example = []
    for b, real in enumerate(_real_indices(mask)):
        divergences = []
        for h in range(num_relation_heads):
            teacher_log = relation_log_probs(teacher, b, h, real)
            student_log = relation_log_probs(student, b, h, real)
            divergences.extend((np.exp(teacher_log) * (teacher_log - student_log)).sum(axis=-1))
        per_example.append(divergences)
    return _per_example_mean(per_example)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


# --- resolve_layer_map -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_student", "num_teacher", "expected"),
    [
        (2, 4, {1: 2, 2: 4}),
        (4, 12, {1: 3, 2: 6, 3: 9, 4: 12}),
        (5, 12, {1: 2, 2: 5, 3: 7, 4: 10, 5: 12}),
        (3, 3, {1: 1, 2: 2, 3: 3}),
    ],
)
def test_uniform_layer_map(num_student, num_teacher, expected):
    assert resolve_layer_map("uniform", num_student, num_teacher) == expected


def test_last_explicit_and_json_layer_maps():
    assert resolve_layer_map("last", 3, 12) == {3: 12}
    assert resolve_layer_map({2: 12, 1: 4}, 2, 12) == {1: 4, 2: 12}
    assert resolve_layer_map({"1": "4", "2": 12}, 2, 12) == {1: 4, 2: 12}
    assert resolve_layer_map('{"1": 4, "2": 12}', 2, 12) == {1: 4, 2: 12}


@pytest.mark.parametrize(
    ("layer_map", "message"),
    [
        ({5: 3}, r"entry 5→3: student layer 5 is out of range 1\.\.2 \(the student has 2 layers\); use 'uniform'"),
        ({0: 3}, r"student layer 0 is out of range 1\.\.2"),
        ({1: 13}, r"teacher layer 13 is out of range 1\.\.12 \(the teacher has 12 layers\)"),
        ('{"1": 0}', r"teacher layer 0 is out of range 1\.\.12"),
        ({"a": 3}, r"'a' is not an integer layer index"),
        ({1: 1.5}, r"1\.5 is not an integer layer index"),
        ({1: True}, r"True is not an integer layer index"),
        ({}, r"layer_map is empty"),
        ({1: 3, "1": 4}, r"maps student layer 1 twice"),
        ("middle", r"'middle' is neither 'uniform', 'last' nor a JSON dict"),
        ("[1, 2]", r"must be a str or a dict, got list"),
    ],
)
def test_invalid_layer_maps_raise(layer_map, message):
    with pytest.raises(ValueError, match=message):
        resolve_layer_map(layer_map, 2, 12)


# --- HiddenStateProjection ---------------------------------------------------------------------------------------


def test_projection_maps_student_width_to_teacher_width():
    projection = HiddenStateProjection(16, 32, layers=[0, 2, 1])
    assert sorted(projection.projections) == ["0", "1", "2"]
    assert projection(2, torch.randn(3, 5, 16)).shape == (3, 5, 32)
    bf16_output = projection(0, torch.randn(3, 5, 16, dtype=torch.bfloat16))
    assert bf16_output.shape == (3, 5, 32) and bf16_output.dtype == torch.float32
    assert set(projection.state_dict()) == {f"projections.{layer}.{p}" for layer in "012" for p in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"no projection for layer 3; it was built for layers \[0, 1, 2\]"):
        projection(3, torch.randn(3, 5, 16))


# --- losses against references -----------------------------------------------------------------------------------


def test_hidden_losses_match_references(generator):
    student, teacher = torch.randn(2, 5, 6, generator=generator), torch.randn(2, 5, 6, generator=generator)
    assert hidden_mse_loss(student, teacher, MASK).item() == pytest.approx(reference_hidden_mse(student, teacher, MASK))
    assert hidden_cosine_loss(student, teacher, MASK).item() == pytest.approx(
        reference_hidden_cosine(student, teacher, MASK)
    )


@pytest.mark.parametrize("student_heads", [4, 2])
def test_attention_losses_match_references(generator, student_heads):
    student = _random_attention(2, student_heads, 5, MASK, generator)
    teacher = _random_attention(2, 4, 5, MASK, generator)
    assert attention_mse_loss(student, teacher, MASK).item() == pytest.approx(
        reference_attention_mse(student, teacher, MASK)
    )
    assert attention_relation_loss(student, teacher, MASK).item() == pytest.approx(
        reference_attention_relation(student, teacher, MASK), rel=1e-5
    )


def test_head_mismatch_averages_over_heads(generator):
    student = _random_attention(2, 2, 5, MASK, generator)
    teacher = _random_attention(2, 4, 5, MASK, generator)
    student_mean, teacher_mean = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    assert attention_mse_loss(student, teacher, MASK) == pytest.approx(
        attention_mse_loss(student_mean, teacher_mean, MASK).item()
    )
    assert attention_relation_loss(student, teacher, MASK) == pytest.approx(
        attention_relation_loss(student_mean, teacher_mean, MASK).item()
    )


@pytest.mark.parametrize(("student_width", "teacher_width"), [(8, 8), (8, 16)])
def test_value_relation_loss_matches_reference(generator, student_width, teacher_width):
    student = torch.randn(2, 5, student_width, generator=generator)
    teacher = torch.randn(2, 5, teacher_width, generator=generator)
    assert value_relation_loss(student, teacher, MASK, num_relation_heads=2).item() == pytest.approx(
        reference_value_relation(student, teacher, MASK, 2), rel=1e-5
    )


def test_bf16_inputs_are_computed_in_float32(generator):
    student = torch.randn(2, 5, 8, generator=generator).bfloat16()
    teacher = torch.randn(2, 5, 8, generator=generator).bfloat16()
    student_attention = _random_attention(2, 4, 5, MASK, generator).bfloat16()
    teacher_attention = _random_attention(2, 4, 5, MASK, generator).bfloat16()
    cases = [
        (hidden_mse_loss(student, teacher, MASK), reference_hidden_mse(student, teacher, MASK)),
        (hidden_cosine_loss(student, teacher, MASK), reference_hidden_cosine(student, teacher, MASK)),
        (
            attention_mse_loss(student_attention, teacher_attention, MASK),
            reference_attention_mse(student_attention, teacher_attention, MASK),
        ),
        (
            attention_relation_loss(student_attention, teacher_attention, MASK),
            reference_attention_relation(student_attention, teacher_attention, MASK),
        ),
        (value_relation_loss(student, teacher, MASK, 2), reference_value_relation(student, teacher, MASK, 2)),
    ]
    for loss, reference in cases:
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference, rel=1e-4)


def test_losses_are_finite_for_large_magnitudes(generator):
    student = torch.randn(2, 5, 8, generator=generator).sign() * 1e4
    teacher = torch.randn(2, 5, 8, generator=generator).sign() * 1e4
    attention = _random_attention(2, 4, 5, MASK, generator)
    saturated = (_random_attention(2, 4, 5, MASK, generator) * 1e4).softmax(dim=-1) * MASK[:, None, None, :]
    losses = [
        hidden_mse_loss(student, teacher, MASK),
        hidden_cosine_loss(student, teacher, MASK),
        attention_mse_loss(saturated, attention, MASK),
        attention_relation_loss(saturated, attention, MASK),
        attention_relation_loss(attention, saturated, MASK),
        value_relation_loss(student, teacher, MASK, 2),
        value_relation_loss(student.bfloat16(), teacher.bfloat16(), MASK, 2),
    ]
    assert all(torch.isfinite(loss) for loss in losses)
    assert value_relation_loss(student, teacher, MASK, 2) > 0


def test_relation_losses_are_zero_for_identical_inputs_and_positive_otherwise(generator):
    values = torch.randn(2, 5, 8, generator=generator)
    attention = _random_attention(2, 4, 5, MASK, generator)
    assert value_relation_loss(values, values.clone(), MASK, 4).item() == pytest.approx(0, abs=1e-6)
    assert attention_relation_loss(attention, attention.clone(), MASK).item() == pytest.approx(0, abs=1e-6)
    other_values = torch.randn(2, 5, 16, generator=generator)
    assert value_relation_loss(values, other_values, MASK, 4) > 0
    assert attention_relation_loss(attention, _random_attention(2, 4, 5, MASK, generator), MASK) > 0


def test_value_relation_loss_rejects_indivisible_width():
    values = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"student's width 6 is not divisible by num_relation_heads=4"):
        value_relation_loss(values, torch.randn(2, 5, 8), MASK, 4)
    with pytest.raises(ValueError, match=r"teacher's width 6 is not divisible by num_relation_heads=4"):
        value_relation_loss(torch.randn(2, 5, 8), values, MASK, 4)


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match=r"HiddenStateProjection"):
        hidden_mse_loss(torch.randn(2, 5, 8), torch.randn(2, 5, 16), MASK)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\)"):
        hidden_cosine_loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), MASK[:, :4])
    with pytest.raises(ValueError, match=r"differ in batch or sequence length"):
        attention_mse_loss(torch.rand(2, 4, 5, 5), torch.rand(2, 4, 6, 6), MASK)


def test_losses_without_real_tokens_are_zero_with_gradients():
    no_tokens = torch.zeros(2, 5, dtype=torch.long)
    student = torch.randn(2, 5, 8, requires_grad=True)
    student_attention = torch.rand(2, 4, 5, 5, requires_grad=True)
    losses = [
        hidden_mse_loss(student, torch.randn(2, 5, 8), no_tokens),
        hidden_cosine_loss(student, torch.randn(2, 5, 8), no_tokens),
        attention_mse_loss(student_attention, torch.rand(2, 4, 5, 5), no_tokens),
        attention_relation_loss(student_attention, torch.rand(2, 4, 5, 5), no_tokens),
        value_relation_loss(student, torch.randn(2, 5, 8), no_tokens, 2),
    ]
    for loss in losses:
        assert loss.item() == 0
    sum(losses).backward()
    assert torch.equal(student.grad, torch.zeros_like(student)) and torch.isfinite(student_attention.grad).all()


# --- padding invariance with real eager attentions ---------------------------------------------------------------


def _tiny_bert(seed, num_attention_heads=4):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        intermediate_size=37,
        initializer_range=0.2,  # peaked attentions, so the KL losses are well above rounding noise
        attn_implementation="eager",
    )
    return BertModel(config).eval()


def _layer_outputs(model, input_ids, attention_mask):
    with torch.no_grad():
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True
        )
    assert len(outputs.attentions) == model.config.num_hidden_layers
    return outputs.hidden_states[-1], outputs.attentions[-1]


@pytest.mark.parametrize(
    "loss_fn",
    [
        hidden_mse_loss,
        hidden_cosine_loss,
        attention_mse_loss,
        attention_relation_loss,
        lambda student, teacher, mask: value_relation_loss(student, teacher, mask, num_relation_heads=4),
    ],
    ids=["hidden_mse", "hidden_cosine", "attention_mse", "attention_relation", "value_relation"],
)
def test_losses_ignore_padding_on_real_bert_outputs(loss_fn):
    student, teacher = _tiny_bert(seed=1, num_attention_heads=2), _tiny_bert(seed=2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 99, (2, 6), generator=generator)
    mask = torch.ones_like(input_ids)
    padded_ids = torch.cat([input_ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)

    uses_attention = loss_fn in (attention_mse_loss, attention_relation_loss)
    pick = 1 if uses_attention else 0
    student_unpadded = _layer_outputs(student, input_ids, mask)[pick]
    unpadded = loss_fn(student_unpadded, _layer_outputs(teacher, input_ids, mask)[pick], mask)
    student_padded = _layer_outputs(student, padded_ids, padded_mask)[pick].clone()
    teacher_padded = _layer_outputs(teacher, padded_ids, padded_mask)[pick].clone()
    padded = loss_fn(student_padded, teacher_padded, padded_mask)

    # Garbage at padded positions (rows, and key columns for attentions) must not matter either.
    student_padded[..., 6:, :] = 1e3 * torch.randn_like(student_padded[..., 6:, :])
    if uses_attention:
        student_padded[..., 6:] = 1e3 * torch.rand_like(student_padded[..., 6:])
    garbage = loss_fn(student_padded, teacher_padded, padded_mask)

    assert unpadded > 0
    assert padded.item() == pytest.approx(unpadded.item(), rel=1e-4)
    assert garbage.item() == pytest.approx(unpadded.item(), rel=1e-4)
