"""Token classification (`BertForTokenClassification`): a distribution per real token, labels per labelled token."""

import numpy as np
import pytest
import torch
from conftest import (
    cached_and_online_logs,
    full_and_accumulated_logs,
    make_args,
    reference_ce_rows,
    reference_kl_rows,
    tiny_bert_qa,
    tiny_bert_token,
    token_dataset,
    train_logs,
)
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from hf_distill import DistillationTrainer, cache_teacher_logits


def peaked_token_teacher(seed=1):
    """A random teacher whose per-token predictions are confident and varied, so there is something to learn."""
    teacher = tiny_bert_token(hidden_size=48, num_layers=3, seed=seed)
    with torch.no_grad():
        teacher.classifier.weight.mul_(20.0)
    return teacher


def token_logits(model, dataset):
    """Each example's logits `(length, num_labels)`, from an unpadded forward of that example alone."""
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row["input_ids"]])).logits[0].numpy() for row in dataset]


def reference_loss(student, teacher, dataset, alpha, temperature):
    """`(loss, kd, ce)`: KD averaged over every real token, CE over the tokens whose label is not -100."""
    student_logits, teacher_logits = token_logits(student, dataset), token_logits(teacher, dataset)
    kd = np.concatenate([reference_kl_rows(s, t, temperature) for s, t in zip(student_logits, teacher_logits)])
    ce = []
    for logits, labels in zip(student_logits, dataset["labels"]):
        labels = np.array(labels)
        ce.append(reference_ce_rows(logits[labels != -100], labels[labels != -100]))
    ce = np.concatenate(ce)
    return alpha * kd.mean() + (1 - alpha) * ce.mean(), kd.mean(), ce.mean()


def make_trainer(tmp_path, tokenizer, student, teacher=None, train=None, eval_dataset=None, **overrides):
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides), train_dataset=train,
        eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
    )


def new_student_trainer(tokenizer, **settings):
    """Builds trainers of a fresh `tiny_bert_token(seed=2)` (alpha 0.5, 3 steps) for the runs in conftest."""
    return lambda output_dir, teacher=None, train=None, **overrides: make_trainer(
        output_dir, tokenizer, tiny_bert_token(seed=2), teacher, train=train, alpha=0.5, max_steps=3,
        **settings, **overrides,
    )


@pytest.mark.parametrize("use_teacher_cache", [True, False])
def test_loss_matches_a_numpy_reference_over_tokens(tmp_path, tokenizer, use_teacher_cache):
    # 8 examples of lengths 4..12 (padding), -100 on special tokens and some words, examples 3 and 7 unlabelled.
    dataset = token_dataset(8, seed=3)
    assert all(label == -100 for label in dataset[3]["labels"])
    teacher, student = peaked_token_teacher(), tiny_bert_token(seed=2)
    expected, expected_kd, expected_ce = reference_loss(student, teacher, dataset, alpha=0.4, temperature=2.0)

    trainer = make_trainer(tmp_path, tokenizer, student, teacher, train=dataset, eval_dataset=dataset, alpha=0.4,
                           temperature=2.0, max_steps=1, learning_rate=0.0, teacher_cache_dtype="float32",
                           use_teacher_cache=use_teacher_cache)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert metrics["eval_loss_kd"] == pytest.approx(expected_kd, rel=1e-4)
    assert metrics["eval_loss_ce"] == pytest.approx(expected_ce, rel=1e-4)
    # One training step of one batch holding all 8 examples: the same sums over the same counted tokens.
    trainer.train()
    (loss, kd, ce), = train_logs(trainer, ("loss", "loss_kd", "loss_ce"))
    assert (loss, kd, ce) == pytest.approx((expected, expected_kd, expected_ce), rel=1e-4)


def test_cached_and_online_teachers_train_identically(tmp_path, tokenizer):
    teacher, dataset = peaked_token_teacher(), token_dataset(24)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path / "c"), dtype="float32")
    assert len(cached[0]["teacher_logits"]) == len(dataset[0]["input_ids"]) * 3  # (length, num_labels) flattened
    cached_logs, online_logs = cached_and_online_logs(tmp_path, new_student_trainer(tokenizer), teacher, dataset,
                                                      cached)
    np.testing.assert_allclose(online_logs, cached_logs, rtol=1e-4)


def test_gradient_accumulation_counts_the_tokens_of_the_whole_step(tmp_path, tokenizer):
    # Micro-batches hold different numbers of real and labelled tokens: a per-micro-batch mean would differ.
    dataset = cache_teacher_logits(peaked_token_teacher(), token_dataset(32), cache_dir=str(tmp_path / "c"),
                                   dtype="float32")
    full_logs, accumulated_logs = full_and_accumulated_logs(tmp_path, new_student_trainer(tokenizer), dataset)
    np.testing.assert_allclose(accumulated_logs, full_logs, rtol=1e-5)


def test_student_moves_toward_the_teacher(tmp_path, tokenizer):
    teacher, student = peaked_token_teacher(), tiny_bert_token(seed=2)
    # Unlabelled rows only: everything the student learns comes from the teacher.
    train = token_dataset(64, seed=0).map(lambda row: {"labels": [-100] * len(row["labels"])})
    held_out = token_dataset(16, seed=1)

    def held_out_kl():
        pairs = zip(token_logits(student, held_out), token_logits(teacher, held_out))
        return np.concatenate([reference_kl_rows(s, t, 1.0) for s, t in pairs]).mean()

    before = held_out_kl()
    make_trainer(tmp_path, tokenizer, student, teacher, train=train, alpha=0.9, num_train_epochs=4,
                 learning_rate=3e-3).train()
    assert held_out_kl() < 0.5 * before


def test_saved_student_reloads_with_the_same_logits(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, tiny_bert_token(seed=2), peaked_token_teacher(),
                           train=token_dataset(16), max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "student"))
    dataset = token_dataset(4, seed=5)
    for trained, loaded in zip(token_logits(trainer.model, dataset), token_logits(reloaded, dataset)):
        np.testing.assert_allclose(loaded, trained, atol=1e-6)


def test_teacher_with_another_label_space_is_refused_before_any_work(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="num_labels=5 but the student has num_labels=3"):
        make_trainer(tmp_path, tokenizer, tiny_bert_token(seed=2), tiny_bert_token(num_labels=5, seed=1),
                     train=token_dataset(8))
    with pytest.raises(ValueError, match="BertForQuestionAnswering .*question_answering.* BertForTokenClassification"):
        make_trainer(tmp_path, tokenizer, tiny_bert_token(seed=2), tiny_bert_qa(seed=1), train=token_dataset(8))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_online_top_k_is_refused_for_a_head_without_a_vocabulary(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="online_top_k=True applies to vocabulary-sized outputs.*token_classification"):
        make_trainer(tmp_path, tokenizer, tiny_bert_token(seed=2), tiny_bert_token(seed=1), train=token_dataset(8),
                     use_teacher_cache=False, online_top_k=True)
    assert not (tmp_path / "out").exists()
