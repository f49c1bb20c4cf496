"""Seq2seq LMs (`BartForConditionalGeneration`): decoder logits at every label position, the teacher fed the same
decoder inputs, a top-k cache per label position."""

import os

import numpy as np
import pytest
import torch
from conftest import (
    VOCAB_SIZE,
    cached_and_online_logs,
    full_and_accumulated_logs,
    make_args,
    reference_ce_rows,
    reference_kl_rows,
    seq2seq_dataset,
    tiny_bart,
    train_logs,
)
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq

from hf_distill import DistillationTrainer, cache_teacher_logits


def peaked_bart_teacher(seed=1):
    teacher = tiny_bart(d_model=48, seed=seed)
    with torch.no_grad():  # the LM head is tied to the embeddings: scale the decoder's last layer norm instead
        teacher.model.decoder.layers[-1].final_layer_norm.weight.mul_(8.0)
    return teacher


def decoder_logits(model, dataset):
    """Each example's decoder logits `(target_length, vocab)` from an unpadded forward of it alone, decoding its
    labels shifted right (-100 read as padding)."""
    model.eval()
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).logits[0].numpy()
            for row in dataset
        ]


def reference_loss(student, teacher, dataset, alpha, temperature):
    """`(loss, kd, ce)`, both terms averaged over every label position that is not -100."""
    kd, ce = [], []
    for student_logits, teacher_logits, labels in zip(
        decoder_logits(student, dataset), decoder_logits(teacher, dataset), dataset["labels"]
    ):
        labels = np.array(labels)
        counted = labels != -100
        kd.append(reference_kl_rows(student_logits[counted], teacher_logits[counted], temperature))
        ce.append(reference_ce_rows(student_logits[counted], labels[counted]))
    kd, ce = np.concatenate(kd).mean(), np.concatenate(ce).mean()
    return alpha * kd + (1 - alpha) * ce, kd, ce


def make_trainer(tmp_path, tokenizer, student, teacher=None, train=None, eval_dataset=None,
                 collator_builds_decoder_inputs=True, **overrides):
    collator = DataCollatorForSeq2Seq(tokenizer, model=student if collator_builds_decoder_inputs else None)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides), train_dataset=train,
        eval_dataset=eval_dataset, processing_class=tokenizer, data_collator=collator,
    )


def new_student_trainer(tokenizer, **settings):
    """Builds trainers of a fresh `tiny_bart(seed=2)` (alpha 0.5, 3 steps) for the runs in conftest."""
    return lambda output_dir, teacher=None, train=None, **overrides: make_trainer(
        output_dir, tokenizer, tiny_bart(seed=2), teacher, train=train, alpha=0.5, max_steps=3,
        **settings, **overrides,
    )


@pytest.mark.parametrize("use_teacher_cache, collator_builds_decoder_inputs", [(True, True), (False, False)])
def test_loss_matches_a_numpy_reference_over_label_positions(tmp_path, tokenizer, use_teacher_cache,
                                                             collator_builds_decoder_inputs):
    dataset = seq2seq_dataset(8, seed=3)
    # Targets of different lengths (the collator pads labels with -100), and one masked target token inside a row.
    dataset = dataset.map(lambda row, index: {"labels": [row["labels"][0], -100, *row["labels"][2:]]}
                          if index == 2 else row, with_indices=True)
    teacher, student = peaked_bart_teacher(), tiny_bart(seed=2)
    expected, expected_kd, expected_ce = reference_loss(student, teacher, dataset, alpha=0.4, temperature=2.0)
    # A top-k cache with k = the vocabulary is the dense distribution: the cached loss is the exact reference.
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, train=dataset, eval_dataset=dataset,
                           collator_builds_decoder_inputs=collator_builds_decoder_inputs, alpha=0.4, temperature=2.0,
                           max_steps=1, learning_rate=0.0, teacher_cache_dtype="float32",
                           teacher_cache_top_k=VOCAB_SIZE, use_teacher_cache=use_teacher_cache)
    metrics = trainer.evaluate()
    assert (metrics["eval_loss"], metrics["eval_loss_kd"], metrics["eval_loss_ce"]) == pytest.approx(
        (expected, expected_kd, expected_ce), rel=1e-4)
    trainer.train()
    (loss, kd, ce), = train_logs(trainer, ("loss", "loss_kd", "loss_ce"))
    assert (loss, kd, ce) == pytest.approx((expected, expected_kd, expected_ce), rel=1e-4)


def test_cached_and_online_teachers_train_identically(tmp_path, tokenizer):
    teacher, dataset = peaked_bart_teacher(), seq2seq_dataset(24)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path / "c"), dtype="float32",
                                  top_k=VOCAB_SIZE, temperature=2.0)
    assert len(cached[0]["teacher_topk_ids"]) == len(dataset[0]["labels"]) * VOCAB_SIZE
    cached_logs, online_logs = cached_and_online_logs(
        tmp_path, new_student_trainer(tokenizer, teacher_cache_top_k=VOCAB_SIZE), teacher, dataset, cached
    )
    np.testing.assert_allclose(online_logs, cached_logs, rtol=1e-4)


def test_gradient_accumulation_counts_the_label_tokens_of_the_whole_step(tmp_path, tokenizer):
    dataset = cache_teacher_logits(peaked_bart_teacher(), seq2seq_dataset(32), cache_dir=str(tmp_path / "c"),
                                   dtype="float32", top_k=8, temperature=2.0)
    full_logs, accumulated_logs = full_and_accumulated_logs(
        tmp_path, new_student_trainer(tokenizer, teacher_cache_top_k=8), dataset
    )
    np.testing.assert_allclose(accumulated_logs, full_logs, rtol=1e-5)


def test_student_moves_toward_the_teacher(tmp_path, tokenizer):
    teacher, student = peaked_bart_teacher(), tiny_bart(seed=2)
    held_out = seq2seq_dataset(16, seed=1)

    def held_out_kl():
        pairs = zip(decoder_logits(student, held_out), decoder_logits(teacher, held_out))
        return np.concatenate([reference_kl_rows(s, t, 1.0) for s, t in pairs]).mean()

    before = held_out_kl()
    make_trainer(tmp_path, tokenizer, student, teacher, train=seq2seq_dataset(64), alpha=1.0, num_train_epochs=6,
                 learning_rate=1e-2).train()
    assert held_out_kl() < 0.5 * before


def test_saved_student_reloads_with_the_same_logits(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, tiny_bart(seed=2), peaked_bart_teacher(), train=seq2seq_dataset(16),
                           max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "student"))
    dataset = seq2seq_dataset(4, seed=5)
    for trained, loaded in zip(decoder_logits(trainer.model, dataset), decoder_logits(reloaded, dataset)):
        np.testing.assert_allclose(loaded, trained, atol=1e-5)


def test_batches_without_labels_are_refused_by_message(tmp_path, tokenizer):
    unlabelled = seq2seq_dataset(8, with_labels=False)
    # Cached: refused before the teacher runs, nothing written.
    with pytest.raises(ValueError, match="no 'labels' column .* Give every example its 'labels'"):
        make_trainer(tmp_path, tokenizer, tiny_bart(seed=2), peaked_bart_teacher(), train=unlabelled)
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "out")
    # Online: refused at the first batch, before any step.
    trainer = make_trainer(tmp_path, tokenizer, tiny_bart(seed=2), peaked_bart_teacher(), train=unlabelled,
                           use_teacher_cache=False)
    with pytest.raises(ValueError, match="A seq2seq batch has no 'labels'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_teacher_with_another_vocabulary_is_refused(tmp_path, tokenizer):
    student = tiny_bart(seed=2)
    student.resize_token_embeddings(80)
    with pytest.raises(ValueError, match=f"vocabulary has {VOCAB_SIZE} tokens but the student's has 80"):
        make_trainer(tmp_path, tokenizer, student, peaked_bart_teacher(), train=seq2seq_dataset(8))
