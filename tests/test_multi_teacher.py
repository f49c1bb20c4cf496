"""Several teachers: the ensemble target, per-teacher caches and agreement, and what is refused."""

import numpy as np
import pytest
import torch
from conftest import make_args, tiny_bert, tiny_llama, toy_dataset, toy_lm_dataset
from scipy.special import log_softmax, softmax

from hf_distill import DistillationTrainer
from hf_distill.losses import ensemble_logits


def peaked(seed):
    teacher = tiny_bert(hidden_size=48, num_layers=2, seed=seed)
    with torch.no_grad():
        teacher.classifier.weight.mul_(40.0)
    return teacher


def test_ensemble_targets_match_numpy():
    rng = np.random.default_rng(0)
    first, second = rng.normal(0, 3, (5, 4)), rng.normal(0, 3, (5, 4))
    mixture = ensemble_logits([torch.tensor(first), torch.tensor(second)], [3.0, 1.0], 2.0, "mean_probs")
    expected = 0.75 * softmax(first / 2.0, -1) + 0.25 * softmax(second / 2.0, -1)
    np.testing.assert_allclose(softmax(mixture.numpy() / 2.0, -1), expected, rtol=1e-5)
    mean = ensemble_logits([torch.tensor(first), torch.tensor(second)], [3.0, 1.0], 2.0, "mean_logits")
    np.testing.assert_allclose(mean.numpy(), 0.75 * first + 0.25 * second, rtol=1e-5)


def test_two_teachers_distil_their_weighted_mixture(tmp_path, tokenizer):
    teachers = [peaked(1), peaked(3)]
    dataset = toy_dataset(12)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2), teacher_model=teachers, args=make_args(tmp_path, alpha=1.0, teacher_weights=[2, 1],
                                                                        teacher_cache_dtype="float32"),
        train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
    )
    assert {"teacher_logits_0", "teacher_logits_1"} <= set(trainer.train_dataset.column_names)
    metrics = trainer.evaluate()
    with torch.no_grad():
        student, logits = [], []
        for row in dataset:
            inputs = {"input_ids": torch.tensor([row["input_ids"]])}
            student.append(trainer.student(**inputs).logits[0].numpy())
            logits.append([teacher(**inputs).logits[0].numpy() for teacher in teachers])
    student, logits = np.array(student), np.array(logits)
    target = 2 / 3 * softmax(logits[:, 0] / 2.0, -1) + 1 / 3 * softmax(logits[:, 1] / 2.0, -1)
    expected = (target * (np.log(target) - log_softmax(student / 2.0, -1))).sum(-1).mean() * 4.0
    assert metrics["eval_loss_kd"] == pytest.approx(expected, rel=1e-4)
    for name in ("0", "1"):
        agreement = (student.argmax(-1) == logits[:, int(name)].argmax(-1)).mean()
        assert metrics[f"eval_teacher_agreement_{name}"] == pytest.approx(agreement)


def test_cached_and_online_ensembles_agree(tmp_path, tokenizer):
    def logs(use_cache, name):
        trainer = DistillationTrainer(
            model=tiny_bert(seed=2), teacher_model={"a": peaked(1), "b": peaked(3)},
            args=make_args(tmp_path / name, use_teacher_cache=use_cache, teacher_cache_dtype="float32", max_steps=3),
            train_dataset=toy_dataset(24), processing_class=tokenizer,
        )
        trainer.train()
        return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "grad_norm" in entry]

    np.testing.assert_allclose(logs(True, "cached"), logs(False, "online"), rtol=1e-5)


def test_adding_a_teacher_reuses_the_others_caches(tmp_path):
    first, second = peaked(1), peaked(3)
    calls = []
    first.register_forward_hook(lambda *args: calls.append("first"))
    args = make_args(tmp_path)
    dataset = toy_dataset(8)
    DistillationTrainer(model=tiny_bert(seed=2), teacher_model={"a": first}, args=args, train_dataset=dataset)
    assert calls
    calls.clear()
    trainer = DistillationTrainer(model=tiny_bert(seed=2), teacher_model={"a": first, "b": second}, args=args,
                                  train_dataset=dataset)
    assert calls == [], "the first teacher ran again when a second one was added"
    assert {"teacher_logits_a", "teacher_logits_b"} <= set(trainer.train_dataset.column_names)
    card = trainer.create_model_card(teacher_model_name=["org/teacher-a", "org/teacher-b"])
    assert card.data.teacher_model == ["org/teacher-a", "org/teacher-b"]
    assert card.data.distillation["teachers"] == ["a", "b"] and "teachers `org/teacher-a`" not in card.text


@pytest.mark.parametrize(
    "teachers, overrides, message",
    [
        ([tiny_bert(seed=1), tiny_bert(seed=3)], {"teacher_weights": [1.0]}, "1 weights for 2 teacher"),
        ([tiny_bert(seed=1), tiny_bert(num_labels=2, seed=3)], {}, "num_labels=2 but the student has num_labels=3"),
        ([tiny_bert(seed=1)], {"teacher_weights": [-1.0]}, "teacher_weights.*finite, >= 0"),
    ],
)
def test_bad_teacher_sets_are_refused_before_any_work(tmp_path, teachers, overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=tiny_bert(seed=2), teacher_model=teachers, args=make_args(tmp_path, **overrides),
                            train_dataset=toy_dataset(8))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_several_language_model_teachers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not for the causal_lm head's top-k targets"):
        DistillationTrainer(model=tiny_llama(num_layers=1), teacher_model=[tiny_llama(seed=1), tiny_llama(seed=2)],
                            args=make_args(tmp_path), train_dataset=toy_lm_dataset(4))
