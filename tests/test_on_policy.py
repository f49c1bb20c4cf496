"""On-policy distillation (`lmbda`): student completions distilled on exactly the generated tokens."""

import os

import numpy as np
import pytest
import torch
from conftest import LM_VOCAB_SIZE, PadCollator, tiny_bert, tiny_llama, toy_dataset, toy_lm_dataset
from datasets import Dataset
from scipy.special import log_softmax
from test_head_causal_lm import lm_args

from hf_distill import DistillationTrainer, DistillationTrainingArguments, cache_teacher_logits
from hf_distill.on_policy import ON_POLICY, OnPolicyBatches

EOS = 2  # tiny_llama's


class PromptCollator(PadCollator):
    """`PadCollator` plus the `prompt_length` column, when the rows have it."""

    def __call__(self, features):
        batch = super().__call__(features)
        if "prompt_length" in features[0]:
            batch["prompt_length"] = torch.tensor([feature["prompt_length"] for feature in features])
        return batch


def on_policy_trainer(tmp_path, dataset, **overrides):
    settings = dict(lmbda=1.0, prompt_tokens=3, max_new_tokens=4, on_policy_temperature=0.0)
    settings.update(overrides)
    return DistillationTrainer(
        model=tiny_llama(num_layers=1, seed=1), teacher_model=tiny_llama(num_layers=2, seed=2, logit_scale=30.0),
        args=lm_args(tmp_path, **settings), train_dataset=dataset, data_collator=PromptCollator(),
    )


def step_batch(trainer, step=0):
    """The train dataset as one micro-batch of optimizer step `step`, through `get_batch_samples`."""
    trainer.state.global_step = step
    batch = trainer.data_collator([dict(row) for row in trainer.train_dataset])
    [batch], _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    return batch


def greedy_completion(model, prompt, max_new_tokens):
    """The model's greedy continuation of one unpadded prompt, up to and including EOS."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
            if tokens[-1] == EOS:
                break
    return tokens[len(prompt):]


def reference_divergence(student, teacher, rows, prompt_lengths, kind, temperature, beta):
    """Numpy divergence × T² averaged over the positions that predict generated tokens, one unpadded row at a time."""
    values = []
    with torch.no_grad():
        for tokens, prompt_length in zip(rows, prompt_lengths):
            ids = torch.tensor([tokens])
            positions = np.arange(prompt_length - 1, len(tokens) - 1)  # logits t predict token t + 1
            q = log_softmax(student(input_ids=ids).logits[0].double().numpy()[positions] / temperature, axis=-1)
            p = log_softmax(teacher(input_ids=ids).logits[0].double().numpy()[positions] / temperature, axis=-1)
            if kind == "kl":
                values.append((np.exp(p) * (p - q)).sum(-1))
            elif kind == "reverse_kl":
                values.append((np.exp(q) * (q - p)).sum(-1))
            else:
                m = np.log(beta * np.exp(p) + (1 - beta) * np.exp(q))
                values.append(beta * (np.exp(p) * (p - m)).sum(-1) + (1 - beta) * (np.exp(q) * (q - m)).sum(-1))
    return np.concatenate(values).mean() * temperature**2


@pytest.mark.parametrize("kind, lmbda, prompt_source, extra", [
    ("kl", 1.0, "prompt_tokens", {}), ("reverse_kl", 0.5, "column", {}), ("jsd", 0.5, "prompt_tokens", {}),
    # An online top-k target as wide as the vocabulary is the teacher's whole distribution.
    ("kl", 1.0, "prompt_tokens", dict(online_top_k=True, teacher_cache_top_k=LM_VOCAB_SIZE)),
])
def test_generated_batch_loss_is_the_reference_over_exactly_the_generated_tokens(tmp_path, kind, lmbda,
                                                                                  prompt_source, extra):
    dataset = toy_lm_dataset(6, min_length=6, prompt_length=2)
    prompt_lengths = [3] * len(dataset)
    overrides = {**dict(distillation_loss=kind, jsd_beta=0.3, lmbda=lmbda, teacher_cache_top_k=4), **extra}
    if prompt_source == "column":
        prompt_lengths = [2, 3, 4, 2, 3, 4]
        dataset = dataset.add_column("prompt_length", prompt_lengths)
        overrides["prompt_tokens"] = None
    trainer = on_policy_trainer(tmp_path, dataset, **overrides)
    # lmbda < 1: the cache (a 4-class top-k) is built for the off-policy batches; take an on-policy step.
    assert ("teacher_topk_ids" in trainer.train_dataset.column_names) == (lmbda < 1)
    step = next(step for step in range(100) if trainer.on_policy.is_on_policy(step, 0))
    trainer.model.train()
    batch = step_batch(trainer, step)
    student, teacher = trainer.model, trainer.teacher_model

    rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    for tokens, source, prompt_length in zip(rows, dataset["input_ids"], prompt_lengths):
        assert tokens[:prompt_length] == source[:prompt_length]
        student.eval()
        assert tokens[prompt_length:] == greedy_completion(student, source[:prompt_length], 4)
    labels = batch["labels"]
    for tokens, row_labels, prompt_length in zip(rows, labels.tolist(), prompt_lengths):
        assert row_labels[:len(tokens)] == [-100] * prompt_length + tokens[prompt_length:]
        assert set(row_labels[len(tokens):]) <= {-100}

    student.train()
    loss = trainer.compute_loss(student, batch)
    expected = reference_divergence(student, teacher, rows, prompt_lengths, kind, 2.0, 0.3)
    # The label term is off on generated tokens: the loss is alpha × the divergence (online, full distribution).
    np.testing.assert_allclose(float(loss.detach()), 0.5 * expected, rtol=1e-5)
    assert float(trainer._terms["train"].counts["loss_ce"]) == 0.0
    assert student.training


def test_lmbda_zero_is_todays_training_and_off_policy_steps_are_unchanged_by_generation(tmp_path):
    dataset = toy_lm_dataset(8, min_length=6, prompt_length=2)

    def history(name, **overrides):
        trainer = on_policy_trainer(tmp_path / name, dataset, max_steps=3, per_device_train_batch_size=2,
                                    on_policy_temperature=1.0, **overrides)
        trainer.train()
        return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]

    _, today = history("today", lmbda=0.0, prompt_tokens=None)
    _, zero = history("zero", lmbda=0.0)
    assert zero == today  # bit for bit, and no on_policy term
    mixed_trainer, mixed = history("mixed", lmbda=0.5)
    draws = [mixed_trainer.on_policy.is_on_policy(step, 0) for step in range(3)]
    assert draws == [False, False, True]  # seed 0: two off-policy steps, then one on-policy
    assert [entry["on_policy"] for entry in mixed] == [0.0, 0.0, 1.0]
    # Generation forks the RNG: the off-policy steps before it are today's, bit for bit.
    assert [entry["loss"] for entry in mixed[:2]] == [entry["loss"] for entry in today[:2]]
    assert "loss_ce" not in mixed[2] and "loss_ce" in mixed[1]


def test_lmbda_one_never_reads_the_dataset_continuations(tmp_path):
    dataset = toy_lm_dataset(8, min_length=6, prompt_length=2)
    other = [row[:3] + [(token + 7) % 40 + 3 for token in row[3:]] for row in dataset["input_ids"]]
    changed = Dataset.from_dict({"input_ids": other, "attention_mask": dataset["attention_mask"],
                                 "labels": [[-100] * len(row) for row in other]})

    def history(name, data):
        trainer = on_policy_trainer(tmp_path / name, data, max_steps=2, on_policy_temperature=1.0)
        trainer.train()
        return [entry for entry in trainer.state.log_history if "loss" in entry]

    first = history("first", dataset)
    assert first == history("changed", changed)
    assert [entry["on_policy"] for entry in first] == [1.0, 1.0]
    assert not os.path.exists(tmp_path / "first" / "cache")  # no cache built: it would read the continuations


def test_seeded_runs_repeat_exactly(tmp_path):
    dataset = toy_lm_dataset(8, min_length=6, prompt_length=2)

    def run(name, seed):
        trainer = on_policy_trainer(tmp_path / name, dataset, lmbda=0.5, max_steps=4, per_device_train_batch_size=2,
                                    on_policy_temperature=1.0, on_policy_top_p=0.9, seed=seed)
        trainer.train()
        return trainer.on_policy.batches, [entry for entry in trainer.state.log_history if "loss" in entry]

    first = run("first", 0)
    assert first == run("again", 0)
    assert first[0] == [(2, 0)]
    assert run("other", 3) != first


def test_gradient_accumulation_counts_the_steps_generated_tokens(tmp_path):
    dataset = toy_lm_dataset(8, min_length=6, prompt_length=2)

    def first_step(name, **overrides):
        trainer = on_policy_trainer(tmp_path / name, dataset, max_steps=1, **overrides)
        trainer.train()
        return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]

    full = first_step("full", per_device_train_batch_size=8)
    accumulated = first_step("ga", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    np.testing.assert_allclose(accumulated, full, rtol=1e-5)


def test_generation_runs_in_eval_mode_and_leaves_the_student_training_and_the_rng_alone(tmp_path):
    student = tiny_llama(num_layers=1, seed=1)
    args = DistillationTrainingArguments(output_dir=str(tmp_path), lmbda=1.0, prompt_tokens=2, max_new_tokens=3,
                                         use_cpu=True, report_to=[])
    modes = []
    student.model.layers[0].register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    student.train()
    rng = torch.get_rng_state()
    batch = PadCollator()([dict(row) for row in toy_lm_dataset(4, min_length=5)])
    rebuilt = OnPolicyBatches(args, pad_token_id=0)(student, batch, step=0, index=0, label_name="labels")
    assert modes and not any(modes)
    assert student.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert rebuilt[ON_POLICY].tolist() == [True] * 4


@pytest.mark.parametrize("overrides, match", [
    (dict(lmbda=1.5), r"lmbda=1.5 is invalid: it must be in \[0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens=0 is invalid"),
    (dict(on_policy_top_p=0.0), "on_policy_top_p=0.0 is invalid"),
])
def test_bad_settings_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        lm_args(tmp_path, **overrides)


@pytest.mark.parametrize("case, match", [
    ("sequence_classification", "needs a causal LM head"),
    ("alignment", "intermediate-layer losses"),
    ("long_prompt", "plus max_new_tokens=8 exceeds the student's context of 64 tokens"),
    ("no_prompt", "needs each example's prompt"),
    ("empty_prompt", "holds a prompt of 0 tokens"),
    ("no_teacher", "needs the teacher online"),
    ("no_teacher_nor_column", "needs the teacher online"),
])
def test_settings_that_cannot_work_are_refused_before_any_step(tmp_path, case, match):
    dataset = toy_lm_dataset(4, min_length=6)
    student, teacher = tiny_llama(num_layers=1, seed=1), tiny_llama(num_layers=1, seed=2)
    overrides = dict(lmbda=0.5, prompt_tokens=3, max_new_tokens=8)
    if case == "sequence_classification":
        student, teacher, dataset = tiny_bert(seed=1), tiny_bert(seed=2), toy_dataset(4)
    elif case == "alignment":
        overrides["hidden_loss_weight"] = 1.0
    elif case == "long_prompt":
        overrides["prompt_tokens"] = 60
    elif case == "no_prompt":
        overrides["prompt_tokens"] = None
    elif case == "empty_prompt":
        dataset = dataset.add_column("prompt_length", [0, 2, 2, 2])
    elif case == "no_teacher":
        dataset = cache_teacher_logits(teacher, dataset, cache_dir=str(tmp_path / "cache"), show_progress=False)
        teacher = None
    elif case == "no_teacher_nor_column":
        teacher = None
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=student, teacher_model=teacher, args=lm_args(tmp_path, **overrides),
                            train_dataset=dataset, data_collator=PadCollator())
    assert not os.path.exists(tmp_path / "out")


def test_a_lora_student_generates_with_its_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(tiny_llama(num_layers=1, seed=1),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    dataset = toy_lm_dataset(4, min_length=6)
    trainer = DistillationTrainer(
        model=student, teacher_model=tiny_llama(num_layers=2, seed=2, logit_scale=30.0), train_dataset=dataset,
        args=lm_args(tmp_path, lmbda=1.0, prompt_tokens=3, max_new_tokens=4, on_policy_temperature=0.0),
        data_collator=PadCollator(),
    )
    trainer.model.train()
    batch = step_batch(trainer)
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    student.eval()
    completions = [tokens[3:] for tokens in rows]
    assert completions == [greedy_completion(student, source[:3], 4) for source in dataset["input_ids"]]
    with student.disable_adapter():  # the adapter changes them: it was on during generation
        assert completions != [greedy_completion(student, source[:3], 4) for source in dataset["input_ids"]]
    student.train()
    loss = trainer.compute_loss(trainer.model, batch)
    expected = reference_divergence(student, trainer.teacher_model, rows, [3] * len(rows), "kl", 2.0, 0.5)
    np.testing.assert_allclose(float(loss.detach()), 0.5 * expected, rtol=1e-5)
