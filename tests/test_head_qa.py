"""Extractive QA (`BertForQuestionAnswering`): start and end distributions over each example's real tokens."""

import numpy as np
import pytest
import torch
from conftest import (
    cached_and_online_logs,
    full_and_accumulated_logs,
    make_args,
    qa_dataset,
    reference_ce_rows,
    reference_kl_rows,
    tiny_bert,
    tiny_bert_qa,
    train_logs,
)
from transformers import AutoModelForQuestionAnswering

from hf_distill import DistillationTrainer, cache_teacher_logits


def peaked_qa_teacher(seed=1):
    teacher = tiny_bert_qa(hidden_size=48, num_layers=3, seed=seed)
    with torch.no_grad():
        teacher.qa_outputs.weight.mul_(20.0)
    return teacher


def span_logits(model, dataset):
    """Each example's `(start_logits, end_logits)`, each `(length,)`, from an unpadded forward of it alone."""
    model.eval()
    with torch.no_grad():
        outputs = [model(input_ids=torch.tensor([row["input_ids"]])) for row in dataset]
    return [(output.start_logits[0].numpy(), output.end_logits[0].numpy()) for output in outputs]


def reference_loss(student, teacher, dataset, alpha, temperature):
    """`(loss, kd, ce)`: per example the mean of the start and end terms, then the mean over examples; answers
    outside an example's tokens leave that example out of the label term (as `ForQuestionAnsweringLoss` does)."""
    kd, ce = [], []
    for (student_start, student_end), (teacher_start, teacher_end), start, end in zip(
        span_logits(student, dataset), span_logits(teacher, dataset), dataset["start_positions"],
        dataset["end_positions"],
    ):
        kd.append(np.mean([reference_kl_rows(student_start, teacher_start, temperature),
                           reference_kl_rows(student_end, teacher_end, temperature)]))
        if 0 <= start < len(student_start) and 0 <= end < len(student_end):
            ce.append(np.mean([reference_ce_rows(student_start[None], [start]),
                               reference_ce_rows(student_end[None], [end])]))
    return alpha * np.mean(kd) + (1 - alpha) * np.mean(ce), np.mean(kd), np.mean(ce)


def make_trainer(tmp_path, tokenizer, student, teacher=None, train=None, eval_dataset=None, **overrides):
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides), train_dataset=train,
        eval_dataset=eval_dataset, processing_class=tokenizer,
    )


def new_student_trainer(tokenizer, **settings):
    """Builds trainers of a fresh `tiny_bert_qa(seed=2)` (alpha 0.5, 3 steps) for the runs in conftest."""
    return lambda output_dir, teacher=None, train=None, **overrides: make_trainer(
        output_dir, tokenizer, tiny_bert_qa(seed=2), teacher, train=train, alpha=0.5, max_steps=3,
        **settings, **overrides,
    )


@pytest.mark.parametrize("use_teacher_cache", [True, False])
def test_loss_matches_a_numpy_reference_over_real_positions(tmp_path, tokenizer, use_teacher_cache):
    dataset = qa_dataset(8, seed=3)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert lengths[1] < max(lengths)
    # Answers beyond the batch's window (truncated away; row 5) or on the padding after an example (row 6): no
    # label term for them, the distillation term only.
    outside = {5: 40, 1: lengths[1]}
    dataset = dataset.map(
        lambda row, index: {"start_positions": outside[index], "end_positions": outside[index]}
        if index in outside else row, with_indices=True)
    teacher, student = peaked_qa_teacher(), tiny_bert_qa(seed=2)
    expected, expected_kd, expected_ce = reference_loss(student, teacher, dataset, alpha=0.4, temperature=2.0)
    received = {}

    def compute_metrics(prediction):
        received["predictions"], received["label_ids"] = prediction.predictions, prediction.label_ids
        return {}

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
        compute_metrics=compute_metrics,
        args=make_args(tmp_path, alpha=0.4, temperature=2.0, max_steps=1, learning_rate=0.0,
                          teacher_cache_dtype="float32", use_teacher_cache=use_teacher_cache),
    )
    metrics = trainer.evaluate()
    assert (metrics["eval_loss"], metrics["eval_loss_kd"], metrics["eval_loss_ce"]) == pytest.approx(
        (expected, expected_kd, expected_ce), rel=1e-4)
    start_logits, end_logits = received["predictions"]
    for row, (start, end) in enumerate(span_logits(student, dataset)):
        np.testing.assert_allclose(start_logits[row, : len(start)], start, atol=1e-5)
        np.testing.assert_allclose(end_logits[row, : len(end)], end, atol=1e-5)
    np.testing.assert_array_equal(received["label_ids"][0], dataset["start_positions"])
    trainer.train()
    (loss, kd, ce), = train_logs(trainer, ("loss", "loss_kd", "loss_ce"))
    assert (loss, kd, ce) == pytest.approx((expected, expected_kd, expected_ce), rel=1e-4)


def test_cached_and_online_teachers_train_identically(tmp_path, tokenizer):
    teacher, dataset = peaked_qa_teacher(), qa_dataset(24)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path / "c"), dtype="float32")
    assert len(cached[0]["teacher_logits"]) == len(dataset[0]["input_ids"]) * 2  # (length, start/end) flattened
    cached_logs, online_logs = cached_and_online_logs(tmp_path, new_student_trainer(tokenizer), teacher, dataset,
                                                      cached)
    np.testing.assert_allclose(online_logs, cached_logs, rtol=1e-4)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tokenizer):
    dataset = cache_teacher_logits(peaked_qa_teacher(), qa_dataset(32), cache_dir=str(tmp_path / "c"),
                                   dtype="float32")
    full_logs, accumulated_logs = full_and_accumulated_logs(tmp_path, new_student_trainer(tokenizer), dataset)
    np.testing.assert_allclose(accumulated_logs, full_logs, rtol=1e-5)


def test_student_moves_toward_the_teacher(tmp_path, tokenizer):
    teacher, student = peaked_qa_teacher(), tiny_bert_qa(seed=2)
    held_out = qa_dataset(16, seed=1)

    def held_out_kl():
        return np.mean([reference_kl_rows(s, t, 1.0) for pair_s, pair_t in
                        zip(span_logits(student, held_out), span_logits(teacher, held_out))
                        for s, t in zip(pair_s, pair_t)])

    before = held_out_kl()
    make_trainer(tmp_path, tokenizer, student, teacher, train=qa_dataset(64), alpha=1.0, num_train_epochs=4,
                 learning_rate=3e-3).train()
    assert held_out_kl() < 0.5 * before


def test_saved_student_reloads_with_the_same_logits(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, tiny_bert_qa(seed=2), peaked_qa_teacher(), train=qa_dataset(16),
                           max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "student"))
    dataset = qa_dataset(4, seed=5)
    for trained, loaded in zip(span_logits(trainer.model, dataset), span_logits(reloaded, dataset)):
        np.testing.assert_allclose(loaded, trained, atol=1e-6)


def test_qa_teacher_for_a_classification_student_is_refused_before_any_work(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"teacher is a BertForQuestionAnswering \(question_answering outputs\) but "
                                         r"the student is a BertForSequenceClassification"):
        make_trainer(tmp_path, tokenizer, tiny_bert(seed=2), tiny_bert_qa(seed=1), train=qa_dataset(8))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
