"""The fused vocabulary loss: each family's output layer against its own logits, loss and gradients against the
unfused path, and the trainer running (or refusing to run) it."""

import logging
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import PadCollator, tiny_bart, tiny_llama, toy_lm_dataset
from torch import nn
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

import hf_distill.fused_vocabulary as fused_module
from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.fused_vocabulary import OutputLayer, ProjectedRows, capture_output_layer_input, output_layer_of
from hf_distill.heads import CausalLMHead, TopKTarget, Units
from hf_distill.losses import top_k_target
from hf_distill.objective import DistillationObjective

VOCABULARY = 40
SMALL = dict(vocab_size=VOCABULARY, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def biased_llama():
    model = tiny_llama(seed=4, vocab_size=VOCABULARY)
    biased = nn.Linear(16, VOCABULARY, bias=True)
    with torch.no_grad():
        biased.weight.copy_(model.lm_head.weight)
        biased.bias.normal_()
    model.lm_head = biased
    return model


def bart_with_final_bias():
    model = tiny_bart(seed=4)
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


FAMILIES = {
    "llama": lambda: tiny_llama(seed=4, vocab_size=VOCABULARY),
    "llama_biased_head": biased_llama,
    "gpt2_tied": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCABULARY, n_embd=16, n_layer=1, n_head=2,
                                                    n_positions=32)),
    "gemma2_softcapping": lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.5)),
    "cohere_logit_scale": lambda: CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.37)),
    "granite_logits_scaling": lambda: GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=3.0)),
    "bart_final_logits_bias": bart_with_final_bias,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_layer_reproduces_the_models_own_logits(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    inputs = {"input_ids": torch.randint(3, VOCABULARY, (2, 7))}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, VOCABULARY, (2, 5))
    with torch.no_grad(), capture_output_layer_input(model, skip=False) as captured:
        logits = model(**inputs).logits
    layer = output_layer_of(model)
    assert layer is not None
    with torch.no_grad():
        projected = layer.logits(captured[0].reshape(-1, captured[0].shape[-1]))
    torch.testing.assert_close(projected, logits.reshape(-1, logits.shape[-1]).float(), rtol=1e-5, atol=1e-5)
    if family in ("gemma2_softcapping", "cohere_logit_scale", "granite_logits_scaling"):
        plain = captured[0].reshape(-1, captured[0].shape[-1]) @ model.get_output_embeddings().weight.T
        assert not torch.allclose(plain, projected, atol=1e-3)  # the transform was needed


def test_skipping_the_output_layer_computes_no_logits():
    model = tiny_llama(seed=4)
    with capture_output_layer_input(model, skip=True) as captured:
        logits = model(input_ids=torch.randint(3, 40, (2, 6)), logits_to_keep=torch.ones(2, 6, dtype=torch.bool)).logits
    assert logits.numel() == 0 and captured[0].shape == (12, 16)


# ---- the loss against the unfused path ----

ROWS, HIDDEN = 7, 6


def rows_and_layer(num_classes=None, softcap=None, scale=1.0, with_bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.randn(VOCABULARY, HIDDEN, generator=generator).requires_grad_()
    bias = torch.randn(VOCABULARY, generator=generator).requires_grad_() if with_bias else None
    teacher_hidden = 2 * torch.randn(ROWS, HIDDEN + 2, generator=generator)
    teacher_layer = OutputLayer(torch.randn(VOCABULARY, HIDDEN + 2, generator=generator), None, 1.3, softcap,
                                num_classes)
    targets = torch.randint(0, num_classes or VOCABULARY, (ROWS,), generator=generator)
    return hidden, OutputLayer(weight, bias, scale, softcap, num_classes), teacher_hidden, teacher_layer, targets


def both_paths(objective, units, student, target, sample_weight=None, teacher_for_unfused=None, dtype=torch.float32):
    """`(loss, logged terms, grads)` of the fused path and of the unfused one on materialised logits (their matmul
    in `dtype`)."""
    results = []
    for fused in (True, False):
        tensors = [student.hidden, student.layer.weight] + ([student.layer.bias] if student.layer.bias is not None
                                                             else [])
        for tensor in tensors:
            tensor.grad = None
        view = student if fused else student.layer.logits(student.hidden, dtype)
        teacher = target if fused else teacher_for_unfused
        step = objective(None, [view], {"": [teacher]}, units, {}, sample_weight)
        step.loss.backward()
        terms = {name: (value_sum / weight).item() for name, (value_sum, weight) in step.terms.items() if weight > 0}
        results.append((step.loss.item(), terms, [tensor.grad.clone() for tensor in tensors]))
    return results


def assert_same(results):
    (fused_loss, fused_terms, fused_grads), (loss, terms, grads) = results
    assert fused_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert fused_terms == pytest.approx(terms, rel=1e-5, abs=1e-7)
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-4, atol=1e-6)


def units_of(targets):
    return Units(torch.ones(ROWS, dtype=torch.bool), targets >= 0, targets)


@pytest.mark.parametrize("distillation_loss, temperature, student_temperature, beta", [
    ("kl", 1.0, 1.0, 0.5), ("kl", 2.0, 1.5, 0.5), ("reverse_kl", 2.0, 2.0, 0.5), ("jsd", 1.0, 1.0, 0.3),
])
@pytest.mark.parametrize("rows_per_chunk", [ROWS, 3, 1])  # one chunk, boundaries inside, a chunk of one row
def test_online_teacher_loss_and_gradients_equal_the_unfused_path(monkeypatch, distillation_loss, temperature,
                                                                   student_temperature, beta, rows_per_chunk):
    monkeypatch.setattr(fused_module, "FUSED_CHUNK_ELEMENTS", rows_per_chunk * VOCABULARY)
    hidden, layer, teacher_hidden, teacher_layer, targets = rows_and_layer(softcap=4.0, scale=0.8)
    targets[[1, 5]] = -100
    args = DistillationTrainingArguments(output_dir="unused", temperature=temperature, report_to=[],
                                         student_temperature=student_temperature, jsd_beta=beta, alpha=0.4)
    objective = DistillationObjective(CausalLMHead(), args, distillation_loss, top_k=8)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 3.0, 0.25])
    assert_same(both_paths(objective, units_of(targets), ProjectedRows(hidden, layer),
                           ProjectedRows(teacher_hidden, teacher_layer), weights,
                           teacher_layer.logits(teacher_hidden)))


def test_padded_embedding_rows_are_left_out_and_get_no_gradient():
    hidden, layer, teacher_hidden, teacher_layer, targets = rows_and_layer(num_classes=VOCABULARY - 5)
    args = DistillationTrainingArguments(output_dir="unused", temperature=2.0, report_to=[])
    objective = DistillationObjective(CausalLMHead(), args, "kl", top_k=8)
    results = both_paths(objective, units_of(targets), ProjectedRows(hidden, layer),
                         ProjectedRows(teacher_hidden, teacher_layer), None, teacher_layer.logits(teacher_hidden))
    assert_same(results)
    assert results[0][2][1][-5:].abs().sum() == 0


@pytest.mark.parametrize("tail", ["rest", "renormalise"])
def test_cached_top_k_target_equals_the_unfused_path(tail):
    hidden, layer, teacher_hidden, teacher_layer, targets = rows_and_layer(with_bias=False)
    args = DistillationTrainingArguments(output_dir="unused", temperature=1.0, topk_tail=tail, report_to=[])
    objective = DistillationObjective(CausalLMHead(), args, "kl", top_k=5)
    target = TopKTarget(*top_k_target(teacher_layer.logits(teacher_hidden), 5))
    assert_same(both_paths(objective, units_of(targets), ProjectedRows(hidden, layer), target, None, target))


def test_rows_without_labels_give_the_distillation_term_alone():
    hidden, layer, teacher_hidden, teacher_layer, targets = rows_and_layer()
    targets[:] = -100
    args = DistillationTrainingArguments(output_dir="unused", temperature=2.0, report_to=[], alpha=0.5)
    objective = DistillationObjective(CausalLMHead(), args, "kl", top_k=8)
    results = both_paths(objective, units_of(targets), ProjectedRows(hidden, layer),
                         ProjectedRows(teacher_hidden, teacher_layer), None, teacher_layer.logits(teacher_hidden))
    assert_same(results)
    assert results[0][0] == pytest.approx(0.5 * results[0][1]["loss_kd"], rel=1e-6)



def test_bf16_projections_equal_the_unfused_path_through_the_same_bf16_matmul():
    """A model whose output layer ran under bf16 autocast: the fused path projects in bfloat16 too and computes the
    loss in float32; it agrees with the unfused loss on logits from the same bfloat16 matmul to the rounding of the
    chunked sums, far closer than either is to the float32 loss."""
    hidden, layer, teacher_hidden, teacher_layer, targets = rows_and_layer(softcap=4.0, scale=0.8)
    args = DistillationTrainingArguments(output_dir="unused", temperature=2.0, report_to=[], alpha=0.4)
    objective = DistillationObjective(CausalLMHead(), args, "kl", top_k=8)
    float32 = both_paths(objective, units_of(targets), ProjectedRows(hidden, layer),
                         ProjectedRows(teacher_hidden, teacher_layer), None, teacher_layer.logits(teacher_hidden))
    bf16 = both_paths(objective, units_of(targets), ProjectedRows(hidden, layer, torch.bfloat16),
                      ProjectedRows(teacher_hidden, teacher_layer, torch.bfloat16), None,
                      teacher_layer.logits(teacher_hidden, torch.bfloat16), dtype=torch.bfloat16)
    (fused_loss, _, fused_grads), (loss, _, grads) = bf16
    assert fused_loss == pytest.approx(loss, rel=1e-4)
    assert abs(fused_loss - loss) < abs(fused_loss - float32[0][0]) / 10
    for fused_grad, grad, exact in zip(fused_grads, grads, float32[0][2]):
        torch.testing.assert_close(fused_grad, grad, rtol=2e-2, atol=2e-2 * grad.abs().max().item())
        assert (fused_grad - grad).abs().max() < (fused_grad - exact).abs().max()


# ---- in the trainer ----

def lm_trainer(tmp_path, name, student=None, teacher=None, **overrides):
    values = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                  teacher_cache_dir=str(tmp_path / "cache"), temperature=2.0, alpha=0.5, use_teacher_cache=False)
    values.update(overrides)
    return DistillationTrainer(
        model=student if student is not None else tiny_llama(num_layers=1, seed=1),
        teacher_model=teacher if teacher is not None else tiny_llama(num_layers=2, seed=2, logit_scale=30.0),
        args=DistillationTrainingArguments(**values), train_dataset=toy_lm_dataset(16),
        eval_dataset=toy_lm_dataset(8, seed=5), data_collator=PadCollator(),
    )


def train_logs(trainer):
    trainer.train()
    logs = [[log[key] for key in ("loss", "grad_norm", "loss_kd", "loss_ce")] for log in trainer.state.log_history
            if "loss" in log]
    metrics = trainer.evaluate()
    return np.array(logs), metrics


@pytest.mark.parametrize("overrides", [
    dict(), dict(distillation_loss="jsd", jsd_beta=0.3, gradient_accumulation_steps=2, per_device_train_batch_size=2),
    dict(use_teacher_cache=True), dict(online_top_k=True, teacher_cache_top_k=6),
])
def test_a_llama_student_and_teacher_run_fused_with_the_unfused_losses(tmp_path, overrides):
    fused = lm_trainer(tmp_path, "fused", **overrides)
    fused_logs, fused_metrics = train_logs(fused)
    # A cached teacher never runs: its path is never checked.
    expected = {"student": "fused", "": "unverified" if overrides.get("use_teacher_cache") else "fused"}
    assert fused.vocabulary_loss_paths == expected
    unfused = lm_trainer(tmp_path, "unfused", fused_vocabulary_loss=False, **overrides)
    logs, metrics = train_logs(unfused)
    assert unfused.vocabulary_loss_paths == {}
    np.testing.assert_allclose(fused_logs, logs, rtol=1e-5)
    for key in ("eval_loss", "eval_loss_kd", "eval_loss_ce"):
        assert fused_metrics[key] == pytest.approx(metrics[key], rel=1e-5)



def test_under_bf16_training_both_models_run_fused_close_to_the_unfused_losses(tmp_path):
    """bf16 autocast: the model's own logits come from a bfloat16 matmul, so the first-batch check compares at that
    precision, and the losses agree with the unfused path's to bfloat16 rounding."""
    fused = lm_trainer(tmp_path, "fused", bf16=True)
    fused_logs, fused_metrics = train_logs(fused)
    assert fused.vocabulary_loss_paths == {"student": "fused", "": "fused"}
    logs, metrics = train_logs(lm_trainer(tmp_path, "unfused", bf16=True, fused_vocabulary_loss=False))
    np.testing.assert_allclose(fused_logs, logs, rtol=2e-2)
    assert fused_metrics["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-2)

def test_loss_only_evaluation_is_fused_and_agrees_with_the_one_that_keeps_logits(tmp_path, monkeypatch):
    import hf_distill.objective as objective_module

    calls = []
    fused_loss = objective_module.fused_vocabulary_loss
    monkeypatch.setattr(objective_module, "fused_vocabulary_loss",
                        lambda *args, **kwargs: calls.append(1) or fused_loss(*args, **kwargs))
    trainer = lm_trainer(tmp_path, "fused", max_steps=1)
    trainer.train()
    calls.clear()
    loss_only = trainer.evaluate(metric_key_prefix="fused")  # no compute_metrics: Trainer evaluates the loss only
    assert calls
    calls.clear()
    trainer.compute_metrics = lambda prediction: {"rows": float(np.prod(prediction.predictions.shape[:-1]))}
    with_logits = trainer.evaluate(metric_key_prefix="unfused")
    assert not calls and with_logits["unfused_rows"] > 0  # compute_metrics needs the logits
    for key in ("loss", "loss_kd", "loss_ce", "teacher_agreement"):
        assert loss_only[f"fused_{key}"] == pytest.approx(with_logits[f"unfused_{key}"], rel=1e-5)


class DoubledLogitsLlamaForCausalLM(LlamaForCausalLM):
    """An output transform hf_distill cannot know: logits doubled after the output layer."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                  logits_to_keep=logits_to_keep, **kwargs)
        outputs.logits = outputs.logits * 2
        return outputs


def test_an_unrecognised_output_transform_falls_back_with_a_log_line(tmp_path):
    reference = tiny_llama(num_layers=1, seed=1)
    student = DoubledLogitsLlamaForCausalLM(reference.config)
    student.load_state_dict(reference.state_dict())
    trainer = lm_trainer(tmp_path, "doubled", student=student)
    logger = hf_logging.get_logger("hf_distill.fused_vocabulary")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        trainer.train()
    finally:
        logger.removeHandler(handler)
    assert trainer.vocabulary_loss_paths == {"student": "unfused", "": "fused"}
    assert any("student's output layer (DoubledLogitsLlamaForCausalLM) applies a transform" in record.getMessage()
               for record in records)


def test_the_first_batch_check_projects_a_few_rows_only(tmp_path, monkeypatch):
    checked = []
    capture = fused_module.capture_output_layer_input

    @contextmanager
    def recording_capture(model, skip):
        with capture(model, skip) as captured:
            yield captured
        if not skip:
            checked.append(captured[0].shape[0])

    monkeypatch.setattr(fused_module, "CHECKED_ROWS", 3)
    monkeypatch.setattr(fused_module, "capture_output_layer_input", recording_capture)
    lm_trainer(tmp_path, "check", max_steps=1).train()
    assert checked == [3, 3]  # the student's check and the teacher's, each on 3 of the batch's rows
