"""Without a teacher, `DistillationTrainer` is `transformers.Trainer`: same losses, logs, callbacks, checkpoints."""

import os

import numpy as np
import pytest
import torch
from conftest import tiny_bert, toy_dataset
from datasets import IterableDataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_distill import DistillationTrainer, DistillationTrainingArguments

TIMING_KEYS = ("runtime", "per_second", "total_flos")


def plain_args(tmp_path, name, **overrides):
    values = dict(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=5e-3, num_train_epochs=2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, eval_strategy="epoch",
    )
    values.update(overrides)
    return TrainingArguments(**values)


def history(trainer):
    return [
        {key: value for key, value in entry.items() if not any(part in key for part in TIMING_KEYS)}
        for entry in trainer.state.log_history
    ]


def run_both(tmp_path, make_model=tiny_bert, train_dataset=None, eval_dataset=None, **overrides):
    """Train a `Trainer` and a `DistillationTrainer` identically; return both."""
    trainers = []
    for cls in (Trainer, DistillationTrainer):
        trainer = cls(
            model=make_model(), args=plain_args(tmp_path, cls.__name__, **overrides),
            train_dataset=train_dataset if train_dataset is not None else toy_dataset(24),
            eval_dataset=eval_dataset if eval_dataset is not None else toy_dataset(12, seed=1),
            data_collator=_pad,
        )
        trainer.train()
        trainers.append(trainer)
    return trainers


def _pad(features):
    width = max(len(feature["input_ids"]) for feature in features)
    batch = {
        name: torch.tensor([feature[name] + [0] * (width - len(feature[name])) for feature in features])
        for name in ("input_ids", "attention_mask")
    }
    if "label" in features[0]:
        batch["labels"] = torch.tensor([feature["label"] for feature in features])
    return batch


def test_plain_training_arguments_get_the_distillation_defaults(tmp_path):
    args = plain_args(tmp_path, "out", learning_rate=3e-4, lr_scheduler_type="cosine", gradient_accumulation_steps=3,
                      eval_strategy="no")
    trainer = DistillationTrainer(model=tiny_bert(), args=args)
    assert isinstance(trainer.args, DistillationTrainingArguments)
    assert (trainer.args.learning_rate, trainer.args.gradient_accumulation_steps) == (3e-4, 3)
    assert trainer.args.lr_scheduler_type == args.lr_scheduler_type and trainer.args.alpha == 0.9


@pytest.mark.parametrize("overrides", [
    {}, {"gradient_accumulation_steps": 2}, {"label_smoothing_factor": 0.1},
], ids=["plain", "accumulation", "label-smoothing"])
def test_without_a_teacher_training_and_evaluation_are_trainers(tmp_path, overrides):
    plain, drop_in = run_both(tmp_path, **overrides)
    assert history(drop_in) == history(plain)
    assert any("eval_loss" in entry for entry in history(drop_in))
    for ours, theirs in zip(drop_in.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_predict_returns_trainers_predictions_and_loss(tmp_path):
    plain, drop_in = run_both(tmp_path, num_train_epochs=1)
    expected, got = plain.predict(toy_dataset(10, seed=3)), drop_in.predict(toy_dataset(10, seed=3))
    np.testing.assert_allclose(got.predictions, expected.predictions, rtol=1e-6)
    assert got.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"])


def test_compute_loss_func_is_used(tmp_path):
    calls = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        return nn.functional.cross_entropy(outputs.logits, labels) * 2.0

    args = plain_args(tmp_path, "out", num_train_epochs=1, eval_strategy="no")
    trainer = DistillationTrainer(model=tiny_bert(), args=args,
                                  train_dataset=toy_dataset(8), data_collator=_pad, compute_loss_func=loss_func)
    trainer.train()
    assert len(calls) == 2


class NoConfigModel(nn.Module):
    """A plain module: no config, returns a dict (or a tuple) with the loss first."""

    def __init__(self, as_tuple=False):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.EmbeddingBag(99, 8)
        self.classifier = nn.Linear(8, 3)
        self.as_tuple = as_tuple

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.classifier(self.embedding(input_ids))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        if self.as_tuple:
            return (loss, logits) if loss is not None else (logits,)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("as_tuple", [False, True])
def test_models_without_config_and_tuple_outputs(tmp_path, as_tuple):
    plain, drop_in = run_both(tmp_path, make_model=lambda: NoConfigModel(as_tuple), num_train_epochs=1)
    assert history(drop_in) == history(plain)


def test_iterable_datasets(tmp_path):
    rows = list(toy_dataset(16))

    def make():
        return IterableDataset.from_generator(lambda: iter(rows))

    plain, drop_in = run_both(tmp_path, train_dataset=make(), eval_dataset=make(), max_steps=4,
                              num_train_epochs=1)
    assert history(drop_in) == history(plain)


def test_checkpoints_rotate_and_resume_exactly(tmp_path):
    args = dict(save_strategy="steps", save_steps=2, save_total_limit=2, num_train_epochs=2, eval_strategy="no")
    plain, drop_in = run_both(tmp_path, **args)
    assert sorted(os.listdir(drop_in.args.output_dir)) == sorted(os.listdir(plain.args.output_dir))
    resumed = DistillationTrainer(model=tiny_bert(), args=plain_args(tmp_path, "DistillationTrainer", **args),
                                  train_dataset=toy_dataset(24), data_collator=_pad)
    resumed.train(resume_from_checkpoint=True)
    for ours, theirs in zip(resumed.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_best_model_is_loaded_at_the_end(tmp_path):
    args = dict(save_strategy="epoch", eval_strategy="epoch", load_best_model_at_end=True, num_train_epochs=3)
    plain, drop_in = run_both(tmp_path, **args)
    assert drop_in.state.best_model_checkpoint.endswith(os.path.basename(plain.state.best_model_checkpoint))
    for ours, theirs in zip(drop_in.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(ours, theirs)


class EventRecorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: self.events.append(name)
        return super().__getattribute__(name)


def test_callbacks_fire_in_trainers_order(tmp_path):
    recorders = []
    for cls in (Trainer, DistillationTrainer):
        recorder = EventRecorder()
        cls(model=tiny_bert(), args=plain_args(tmp_path, cls.__name__, num_train_epochs=1),
            train_dataset=toy_dataset(8), eval_dataset=toy_dataset(4), data_collator=_pad,
            callbacks=[recorder]).train()
        recorders.append(recorder.events)
    assert recorders[1] == recorders[0] and "on_evaluate" in recorders[0]


def test_resuming_without_any_checkpoint_raises_trainers_error(tmp_path):
    trainer = DistillationTrainer(model=tiny_bert(), args=plain_args(tmp_path, "out", eval_strategy="no"),
                                  train_dataset=toy_dataset(8), data_collator=_pad)
    with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
        trainer.train(resume_from_checkpoint=True)
