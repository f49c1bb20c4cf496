"""Intermediate-layer alignment inside `DistillationTrainer`: losses, eager switch, projections, checkpoints."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_args, tiny_bert, toy_dataset
from safetensors.torch import load_file
from scipy.special import log_softmax, rel_entr
from transformers import AutoModelForSequenceClassification, HfArgumentParser, TrainerCallback

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.wrapper import PROJECTIONS_FILE, DistillWrapper


def padded_batch(dataset):
    """The whole dataset as one right-padded batch of tensors."""
    width = max(len(ids) for ids in dataset["input_ids"])
    pad = lambda rows: torch.tensor([row + [0] * (width - len(row)) for row in rows])  # noqa: E731
    return {
        "input_ids": pad(dataset["input_ids"]),
        "attention_mask": pad(dataset["attention_mask"]),
        "labels": torch.tensor(dataset["label"]),
    }


def reference_masked_mse(student, teacher, mask):
    """Per example: squared error over real tokens / (real tokens * width); then the mean over examples."""
    student, teacher, mask = student.numpy(), teacher.numpy(), mask.numpy().astype(bool)
    per_example = [((s[m] - t[m]) ** 2).sum() / (m.sum() * s.shape[-1]) for s, t, m in zip(student, teacher, mask)]
    return float(np.mean(per_example))


def reference_attention_mse(student, teacher, mask):
    student, teacher, mask = student.numpy(), teacher.numpy(), mask.numpy().astype(bool)
    per_example = []
    for s, t, m in zip(student, teacher, mask):
        real = np.outer(m, m)
        per_example.append(((s - t) ** 2)[:, real].sum() / (real.sum() * s.shape[0]))
    return float(np.mean(per_example))


def test_the_loss_adds_weighted_alignment_terms_to_the_logit_loss(tmp_path):
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), tiny_bert(hidden_size=32, num_layers=2, seed=2)
    data = toy_dataset(6, seed=3)
    args = make_args(
        tmp_path, alpha=0.3, temperature=3.0, logits_loss_weight=0.7, hidden_loss_weight=2.0,
        attention_loss_weight=5.0, embedding_loss_weight=0.5,
    )
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data, teacher_model=teacher)
    assert trainer.layer_map == {1: 2, 2: 4}
    assert student.config._attn_implementation == "eager" and teacher.config._attn_implementation == "eager"

    batch = padded_batch(data)
    student.eval()
    loss = trainer.compute_loss(student, dict(batch)).item()

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True, output_attentions=True)
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    mask, labels = batch["attention_mask"], batch["labels"].numpy()
    p = np.exp(log_softmax(t.logits.numpy() / 3.0, axis=-1))
    q = np.exp(log_softmax(s.logits.numpy() / 3.0, axis=-1))
    kd = np.mean([rel_entr(a, b).sum() for a, b in zip(p, q)]) * 9.0
    ce = -log_softmax(s.logits.numpy(), axis=-1)[np.arange(len(labels)), labels].mean()
    hidden = np.mean([reference_masked_mse(s.hidden_states[i], t.hidden_states[j], mask) for i, j in [(1, 2), (2, 4)]])
    attention = np.mean(
        [reference_attention_mse(s.attentions[i - 1], t.attentions[j - 1], mask) for i, j in [(1, 2), (2, 4)]]
    )
    embedding = reference_masked_mse(s.hidden_states[0], t.hidden_states[0], mask)
    expected = 0.7 * (0.3 * kd + 0.7 * ce) + 2.0 * hidden + 5.0 * attention + 0.5 * embedding
    assert loss == pytest.approx(expected, rel=1e-4)
    recorded = {name: float(value) for name, value in trainer._terms["eval"].sums.items()}
    assert recorded["loss_hidden"] == pytest.approx(hidden, rel=1e-4)
    assert recorded["loss_attention"] == pytest.approx(attention, rel=1e-4)
    assert recorded["loss_embedding"] == pytest.approx(embedding, rel=1e-4)


def test_alignment_terms_are_logged_in_training_and_evaluation(tmp_path, tokenizer):
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), tiny_bert(hidden_size=32, num_layers=2, seed=2)
    args = make_args(
        tmp_path, hidden_cosine_loss_weight=1.0, attention_relation_loss_weight=1.0, value_relation_loss_weight=1.0,
        relation_heads=2, layer_map="last", logits_loss_weight=0.0,
    )
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=toy_dataset(16), eval_dataset=toy_dataset(8, seed=1),
        teacher_model=teacher, processing_class=tokenizer,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    for term in ("loss_hidden_cosine", "loss_attention_relation", "loss_value_relation", "loss_kd", "loss_ce"):
        assert np.isfinite(logged[term]), term
    # logits_loss_weight=0: the loss is the alignment terms alone.
    alignment_sum = logged["loss_hidden_cosine"] + logged["loss_attention_relation"] + logged["loss_value_relation"]
    assert logged["loss"] == pytest.approx(alignment_sum, rel=1e-3)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(
        metrics["eval_loss_hidden_cosine"] + metrics["eval_loss_attention_relation"]
        + metrics["eval_loss_value_relation"], rel=1e-4,
    )


def test_the_student_learns_the_teachers_hidden_states(tmp_path, tokenizer):
    teacher, student = tiny_bert(hidden_size=32, num_layers=2, seed=1), tiny_bert(hidden_size=32, num_layers=2, seed=2)
    data = toy_dataset(64, seed=0)
    args = make_args(tmp_path, hidden_loss_weight=1.0, logits_loss_weight=0.0, num_train_epochs=5, learning_rate=3e-3)
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=data, teacher_model=teacher, processing_class=tokenizer
    )
    first = trainer.evaluate(data)["eval_loss_hidden"]
    trainer.train()
    assert trainer.evaluate(data)["eval_loss_hidden"] < 0.5 * first


def test_projections_are_trained_checkpointed_and_never_exported(tmp_path, tokenizer):
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), tiny_bert(hidden_size=16, num_layers=2, seed=2)
    args = make_args(
        tmp_path, hidden_loss_weight=1.0, embedding_loss_weight=1.0, save_strategy="steps", save_steps=2,
    )
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=toy_dataset(32), teacher_model=teacher, processing_class=tokenizer
    )
    assert isinstance(trainer.model, DistillWrapper) and trainer.student is student
    projections = trainer.model.projections.projections
    assert sorted(projections) == ["0", "1", "2"]
    assert all(layer.weight.shape == (32, 16) for layer in projections.values())
    assert trainer.label_names == ["labels"]
    before = {name: layer.weight.clone() for name, layer in projections.items()}
    trainer.train()
    assert all(not torch.equal(before[name], layer.weight) for name, layer in projections.items())

    checkpoint = os.path.join(args.output_dir, "checkpoint-4")
    saved = load_file(os.path.join(checkpoint, PROJECTIONS_FILE))
    assert torch.equal(saved["projections.1.weight"], projections["1"].weight)

    export = str(tmp_path / "export")
    trainer.save_model(export)
    assert not os.path.exists(os.path.join(export, PROJECTIONS_FILE))
    assert not any("projection" in key for key in load_file(os.path.join(export, "model.safetensors")))
    reloaded = AutoModelForSequenceClassification.from_pretrained(export)
    for name, value in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


class LoggedLosses(TrainerCallback):
    """The per-step total and hidden losses logged during this `train()` call (not those restored from a checkpoint)."""

    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss_hidden" in logs:
            self.losses[state.global_step] = (logs["loss"], logs["loss_hidden"])


def test_resume_reproduces_the_uninterrupted_run_projections_included(tmp_path, tokenizer):
    def run(output_dir, resume=None):
        teacher = tiny_bert(hidden_size=32, num_layers=4, seed=1)
        student = tiny_bert(hidden_size=16, num_layers=2, seed=2, dropout=0.0)
        args = make_args(
            tmp_path, output_dir=str(output_dir), hidden_loss_weight=1.0, save_strategy="steps", save_steps=2,
            num_train_epochs=2,
        )
        trainer = DistillationTrainer(
            model=student, args=args, train_dataset=toy_dataset(32), teacher_model=teacher,
            processing_class=tokenizer,
        )
        logged = LoggedLosses()
        trainer.add_callback(logged)
        trainer.train(resume_from_checkpoint=resume)
        return logged.losses, trainer.model.projections.projections["2"].weight.detach().clone()

    full_losses, full_projection = run(tmp_path / "full")
    resumed_losses, resumed_projection = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert min(resumed_losses) == 5
    assert {step: full_losses[step] for step in resumed_losses} == resumed_losses
    assert torch.equal(full_projection, resumed_projection)

    os.remove(tmp_path / "full" / "checkpoint-4" / PROJECTIONS_FILE)
    with pytest.raises(ValueError, match=f"has no {PROJECTIONS_FILE}.*restart them from scratch"):
        run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-4"))


def test_equal_widths_need_no_projection(tmp_path):
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), tiny_bert(hidden_size=32, num_layers=2, seed=2)
    args = make_args(tmp_path, hidden_loss_weight=1.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=toy_dataset(8), teacher_model=teacher)
    assert trainer.model is student


def test_layer_map_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(DistillationTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--hidden_loss_weight", "1", "--layer_map", json.dumps({"1": 1, "2": 3})]
    )
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), tiny_bert(hidden_size=32, num_layers=2, seed=2)
    args.use_cpu, args.report_to = True, []
    trainer = DistillationTrainer(model=student, args=args, train_dataset=toy_dataset(8), teacher_model=teacher)
    assert trainer.layer_map == {1: 1, 2: 3}


# ---- bad input: clear errors before anything is written ----


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layer_map": {"3": 4}}, "student layer 3 is out of range 1..2"),
        ({"layer_map": {"1": 9}}, "teacher layer 9 is out of range 1..4"),
        ({"layer_map": "every-other"}, "neither 'uniform', 'last' nor a JSON dict"),
        ({"value_relation_loss_weight": 1.0, "relation_heads": 3}, "relation_heads=3 does not divide"),
    ],
)
def test_bad_alignment_settings(tmp_path, overrides, message):
    teacher, student = tiny_bert(hidden_size=32, num_layers=4, seed=1), tiny_bert(hidden_size=32, num_layers=2, seed=2)
    args = make_args(tmp_path, hidden_loss_weight=1.0, **overrides)
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student, args=args, train_dataset=toy_dataset(8), teacher_model=teacher)
    assert not os.path.exists(args.output_dir)


def test_alignment_without_a_teacher(tmp_path):
    args = make_args(tmp_path, attention_loss_weight=1.0)
    with pytest.raises(ValueError, match="need the teacher online: pass teacher_model"):
        DistillationTrainer(model=tiny_bert(), args=args, train_dataset=toy_dataset(8))


def test_negative_loss_weight(tmp_path):
    with pytest.raises(ValueError, match=r"hidden_loss_weight=-1.0 is invalid: it must be >= 0"):
        make_args(tmp_path, hidden_loss_weight=-1.0)


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_alignment_on_decoder_and_vision_stacks(tmp_path, family):
    """Hidden-state, attention and value-relation losses need no input_ids or padding: decoders and ViTs work."""
    from conftest import PadCollator, tiny_llama, toy_lm_dataset
    from datasets import Dataset
    from transformers import ViTConfig, ViTForImageClassification

    def vit(layers, hidden, seed):
        torch.manual_seed(seed)
        return ViTForImageClassification(ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                                   intermediate_size=32, image_size=8, patch_size=4, num_labels=4))

    if family == "llama":
        student, teacher = tiny_llama(1, seed=1), tiny_llama(2, seed=2)
        dataset, collator = toy_lm_dataset(8), PadCollator()
    else:
        rng = np.random.default_rng(0)
        dataset = Dataset.from_dict({"pixel_values": rng.normal(size=(8, 3, 8, 8)).astype("float32").tolist(),
                                     "labels": rng.integers(0, 4, 8).tolist()})
        student, teacher, collator = vit(1, 16, 1), vit(2, 32, 2), None
    args = make_args(tmp_path, hidden_loss_weight=1.0, attention_loss_weight=1.0, value_relation_loss_weight=1.0,
                     relation_heads=2, per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=collator)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss_hidden", "loss_attention", "loss_value_relation", "loss_kd"} <= logged.keys()
    assert all(np.isfinite(logged[key]) for key in ("loss", "loss_hidden", "loss_attention"))
