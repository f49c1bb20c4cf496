"""Causal-LM distillation: shifted positions, top-k caches, vocabulary checks and step-level token normalisation."""

import os

import numpy as np
import pytest
import torch
from conftest import LM_VOCAB_SIZE, PadCollator, tiny_llama, toy_lm_dataset
from scipy.special import log_softmax

from hf_distill import DistillationTrainer, DistillationTrainingArguments, cache_teacher_logits
from hf_distill.cache import METADATA_FILE, cache_folder
from hf_distill.heads import CausalLMHead


def lm_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        teacher_cache_dir=str(tmp_path / "cache"), disable_tqdm=True, temperature=2.0, alpha=0.5,
    )
    values.update(overrides)
    return DistillationTrainingArguments(**values)


def make_trainer(tmp_path, dataset, teacher=None, student=None, **overrides):
    return DistillationTrainer(
        model=student if student is not None else tiny_llama(num_layers=1, seed=1),
        teacher_model=teacher if teacher is not None else tiny_llama(num_layers=2, seed=2, logit_scale=30.0),
        args=lm_args(tmp_path, **overrides), train_dataset=dataset, data_collator=PadCollator(),
    )


def batch_of(trainer, dataset):
    """The dataset as one collated batch, teacher columns included."""
    return trainer.data_collator([dict(row) for row in dataset])


def reference_terms(student, teacher, batch, temperature, top_k=None):
    """Numpy KD (forward KL × T², or its top-k rest-bucket form) and CE over shifted, labelled positions."""
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student_logits = student(**inputs).logits.double().numpy()
        teacher_logits = teacher(**inputs).logits.double().numpy()
    labels = batch["labels"].numpy()
    rows, targets = np.nonzero(labels[:, 1:] != -100)
    next_tokens = labels[rows, targets + 1]
    s, t = student_logits[rows, targets], teacher_logits[rows, targets]
    q, p = log_softmax(s / temperature, axis=-1), log_softmax(t / temperature, axis=-1)
    if top_k is None:
        kd = (np.exp(p) * (p - q)).sum(-1)
    else:
        ids = np.argsort(-p, axis=-1)[:, :top_k]
        p_k, q_k = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
        outside = np.ones_like(q, dtype=bool)
        np.put_along_axis(outside, ids, False, -1)
        p_rest = 1 - np.exp(p_k).sum(-1)
        q_rest = np.log(np.where(outside, np.exp(q), 0).sum(-1))
        kd = (np.exp(p_k) * (p_k - q_k)).sum(-1) + p_rest * (np.log(p_rest) - q_rest)
    ce = -log_softmax(s, axis=-1)[np.arange(len(rows)), next_tokens]
    return kd.mean() * temperature**2, ce.mean()


@pytest.mark.parametrize("use_cache", [False, True])
def test_loss_matches_a_numpy_reference_with_padding_and_prompt_masking(tmp_path, use_cache):
    dataset = toy_lm_dataset(6, prompt_length=3)
    trainer = make_trainer(tmp_path, dataset, use_teacher_cache=use_cache, teacher_cache_top_k=LM_VOCAB_SIZE,
                           teacher_cache_dtype="float32")
    batch = batch_of(trainer, trainer.train_dataset)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    kd, ce = reference_terms(trainer.student, trainer.teacher_model, batch, temperature=2.0)
    assert loss.item() == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-4)


def test_top_k_cache_with_rest_bucket_matches_the_reference(tmp_path):
    dataset = toy_lm_dataset(6)
    trainer = make_trainer(tmp_path, dataset, teacher_cache_top_k=5, teacher_cache_dtype="float32", alpha=1.0)
    assert trainer.train_dataset.column_names[-3:] == ["teacher_topk_ids", "teacher_topk_log_probs",
                                                       "teacher_topk_rest"]
    batch = batch_of(trainer, trainer.train_dataset)
    assert batch["teacher_topk_ids"].shape == (*batch["input_ids"].shape, 5)
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    kd, _ = reference_terms(trainer.student, trainer.teacher_model, batch, temperature=2.0, top_k=5)
    assert loss.item() == pytest.approx(kd, rel=1e-4)


def test_online_top_k_is_the_cached_top_k_loss(tmp_path):
    dataset = toy_lm_dataset(6, prompt_length=2)
    trainer = make_trainer(tmp_path, dataset, use_teacher_cache=False, online_top_k=True, teacher_cache_top_k=5)
    batch = batch_of(trainer, dataset)
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    kd, ce = reference_terms(trainer.student, trainer.teacher_model, batch, temperature=2.0, top_k=5)
    assert loss.item() == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-4)
    assert trainer.distillation_settings()["teacher_outputs"]["top_k"] == 5


def test_sampled_cache_holds_the_draws_and_the_loss_is_their_kl_to_the_student(tmp_path):
    dataset = toy_lm_dataset(6)
    trainer = make_trainer(tmp_path, dataset, teacher_cache_top_k=8, teacher_cache_dtype="float32", alpha=1.0,
                           sparse_target="sampled")
    batch = batch_of(trainer, trainer.train_dataset)
    ids, log_probs, rest = (batch[f"teacher_topk_{name}"] for name in ("ids", "log_probs", "rest"))
    real = batch["attention_mask"].bool()
    draws = log_probs[real].exp() * 8  # each class's share of the 8 draws of its token
    np.testing.assert_allclose(draws, draws.round(), atol=1e-5)
    assert (draws.round().sum(-1) == 8).all() and (rest[real] == 0).all()
    assert all(len(set(token.tolist())) == 8 for token in ids[real])
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        student_logits = trainer.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows, positions = np.nonzero(batch["labels"][:, 1:].numpy() != -100)
    q = log_softmax(student_logits.double().numpy()[rows, positions] / 2.0, axis=-1)
    p, token_ids = log_probs[rows, positions].double().numpy(), ids[rows, positions].numpy()
    drawn = np.isfinite(p)
    p = np.where(drawn, p, 0.0)
    kd = np.where(drawn, np.exp(p) * (p - np.take_along_axis(q, token_ids, -1)), 0.0).sum(-1)
    assert loss.item() == pytest.approx(kd.mean() * 4.0, rel=1e-4)
    assert trainer.distillation_settings()["teacher_outputs"]["sparse_target"] == "sampled"
    # Another training seed reuses the draws; other draws are another cache, beside this one.
    reseeded = make_trainer(tmp_path, dataset, teacher_cache_top_k=8, teacher_cache_dtype="float32",
                            sparse_target="sampled", seed=1)
    assert reseeded.train_dataset["teacher_topk_ids"] == trainer.train_dataset["teacher_topk_ids"]
    redrawn = cache_teacher_logits(trainer.teacher_model, dataset, cache_dir=str(tmp_path / "cache"), top_k=8,
                                   dtype="float32", temperature=2.0, sparse_target="sampled", seed=1)
    assert redrawn["teacher_topk_ids"] != trainer.train_dataset["teacher_topk_ids"]
    assert cache_folder(redrawn) != cache_folder(reseeded.train_dataset)


def test_online_sampled_target_draws_anew_each_step(tmp_path):
    dataset = toy_lm_dataset(6, prompt_length=2)
    trainer = make_trainer(tmp_path, dataset, use_teacher_cache=False, online_top_k=True, teacher_cache_top_k=4,
                           sparse_target="sampled", alpha=1.0)
    batch = batch_of(trainer, dataset)
    trainer.model.eval()
    losses = {trainer.compute_loss(trainer.model, dict(batch)).item() for _ in range(3)}
    assert len(losses) == 3 and all(np.isfinite(list(losses)))


@pytest.mark.parametrize("settings", [
    {"distillation_loss": "reverse_kl", "sparse_target": "sampled"},
    {"topk_tail": "renormalise", "sparse_target": "top_k_and_sampled"},
])
def test_sampled_target_is_refused_with_a_loss_it_would_bias(tmp_path, settings):
    with pytest.raises(ValueError, match="sampled' estimates the forward KL.*Use distillation_loss='kl'"):
        lm_args(tmp_path, **settings)


def test_alpha_zero_is_the_models_own_causal_lm_loss(tmp_path):
    dataset = toy_lm_dataset(6, prompt_length=2)
    trainer = make_trainer(tmp_path, dataset, alpha=0.0, use_teacher_cache=False)
    batch = batch_of(trainer, dataset)
    trainer.model.eval()
    with torch.no_grad():
        own = trainer.student(**batch).loss
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(own.item(), rel=1e-5)


def test_student_logits_are_computed_at_counted_positions_only(tmp_path):
    dataset = toy_lm_dataset(4, prompt_length=3)
    trainer = make_trainer(tmp_path, dataset, use_teacher_cache=False)
    seen = {}
    forward = trainer.student.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return forward(**kwargs)

    trainer.student.forward = spy
    batch = batch_of(trainer, dataset)
    trainer.compute_loss(trainer.model, dict(batch))
    keep = seen["logits_to_keep"]
    assert keep.dtype == torch.bool and keep.sum() == (batch["labels"][:, 1:] != -100).sum()


def test_unlabelled_rows_are_distilled_over_real_tokens():
    head = CausalLMHead()
    inputs = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0]] * 2)}
    labels = torch.tensor([[-100, -100, -100, -100], [5, 6, 7, -100]])
    units = head.units(inputs, {"labels": labels})
    assert units.kd.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert units.labelled.tolist() == [[False, False, False, False], [True, True, False, False]]


def _first_steps(tmp_path, name, **overrides):
    trainer = make_trainer(tmp_path / name, toy_lm_dataset(16, prompt_length=2), **overrides)
    trainer.train()
    return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "grad_norm" in entry]


def test_gradient_accumulation_normalises_over_the_steps_tokens(tmp_path):
    full = _first_steps(tmp_path, "full", per_device_train_batch_size=8)
    accumulated = _first_steps(tmp_path, "ga", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    np.testing.assert_allclose(accumulated, full, rtol=1e-5)


def test_cached_and_online_training_agree(tmp_path):
    cached = _first_steps(tmp_path, "cached", teacher_cache_top_k=LM_VOCAB_SIZE, teacher_cache_dtype="float32")
    online = _first_steps(tmp_path, "online", use_teacher_cache=False)
    np.testing.assert_allclose(cached, online, rtol=1e-4)


def test_student_moves_toward_the_teacher(tmp_path):
    dataset = toy_lm_dataset(16)
    trainer = make_trainer(tmp_path, dataset, alpha=1.0, max_steps=30, learning_rate=3e-2)
    before = trainer.evaluate(trainer.train_dataset)["eval_loss_kd"]
    trainer.train()
    assert trainer.evaluate(trainer.train_dataset)["eval_loss_kd"] < 0.7 * before


def test_different_vocabularies_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 60 tokens but the student's has 48.*share a tokenizer"):
        make_trainer(tmp_path, toy_lm_dataset(4), teacher=tiny_llama(seed=2, vocab_size=60))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_padded_embedding_rows_compare_the_tokenizers_classes(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{index}": index for index in range(LM_VOCAB_SIZE)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")))
    teacher = tiny_llama(seed=2, vocab_size=LM_VOCAB_SIZE + 16, logit_scale=30.0)
    trainer = DistillationTrainer(
        model=tiny_llama(num_layers=1, seed=1), teacher_model=teacher, args=lm_args(tmp_path),
        train_dataset=toy_lm_dataset(4), data_collator=PadCollator(), processing_class=tokenizer,
    )
    assert trainer.head.num_classes == LM_VOCAB_SIZE
    assert int(np.max(trainer.train_dataset["teacher_topk_ids"][0])) < LM_VOCAB_SIZE
    trainer.train()


def test_mse_is_refused_for_language_models(tmp_path):
    with pytest.raises(ValueError, match="distillation_loss='mse'.*top-k log-probabilities"):
        make_trainer(tmp_path, toy_lm_dataset(4), distillation_loss="mse")


def test_cache_records_k_and_temperature(tmp_path):
    import json

    teacher = tiny_llama(seed=2)
    dataset = toy_lm_dataset(4)
    records = []
    for top_k, temperature in ((4, 2.0), (4, 1.0), (3, 1.0)):
        folder = cache_folder(cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path), top_k=top_k,
                                                   temperature=temperature))
        with open(os.path.join(folder, METADATA_FILE)) as file:
            records.append(json.load(file))
    assert [(record["top_k"], record["temperature"]) for record in records] == [(4, 2.0), (4, 1.0), (3, 1.0)]
    assert len({record["dataset_fingerprint"] for record in records}) == 1  # one dataset, three caches


def test_top_k_cache_bounds_the_logits_of_each_teacher_forward(tmp_path, monkeypatch):
    import hf_distill.cache as cache_module

    teacher = tiny_llama(seed=2)
    dataset = toy_lm_dataset(8, min_length=6, max_length=10)
    unbounded = cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path / "unbounded"), top_k=4,
                                     max_batch_tokens=10**6)
    # Room for the float32 logits of 20 tokens per forward: at most 2 sequences of 6-10 tokens.
    monkeypatch.setattr(cache_module, "TOPK_LOGITS_BYTES_PER_FORWARD", 20 * 4 * LM_VOCAB_SIZE)
    shapes = []
    handle = teacher.register_forward_pre_hook(
        lambda _module, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    bounded = cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path / "bounded"), top_k=4)
    handle.remove()
    assert shapes and max(rows * width for rows, width in shapes) <= 20
    assert sum(rows for rows, _ in shapes) == len(dataset)
    for column in ("teacher_topk_ids", "teacher_topk_log_probs", "teacher_topk_rest"):
        for left, right in zip(bounded[column], unbounded[column]):
            np.testing.assert_allclose(left, right, rtol=1e-3, atol=1e-3)
