"""`recipes/glue.py` with several teachers: per-teacher folders and report rows, the ensemble row, the card, cache
reuse across runs, fine-tuning one checkpoint with several seeds, and bad teacher sets refused before any work."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import FIXTURES, fixture_words, recipe, recipe_args, save_teacher, tiny_bert, tiny_tokenizer
from huggingface_hub import ModelCard
from scipy.special import softmax
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_distill.cache


def save_peaked_teacher(folder, seed):
    """A tiny random 2-label teacher (the fixtures' tokenizer), its head sharpened and centred so that it predicts
    each class for half of the validation sentences: teachers then disagree, and so do their mixtures."""
    tokenizer = tiny_tokenizer(folder, fixture_words())
    teacher = tiny_bert(hidden_size=32, num_layers=4, num_labels=2, seed=seed).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(20.0)
        logits = np.concatenate([
            teacher(**tokenizer(row["sentence"], truncation=True, max_length=32, return_tensors="pt")).logits.numpy()
            for row in validation_rows()
        ])
        teacher.classifier.bias[1] -= float(np.median(logits[:, 1] - logits[:, 0]))
    teacher.save_pretrained(folder)
    return folder


def recipe_with_teachers(teachers, output_dir, *extra):
    """The fast fixture run of `recipe_args` with `teachers` as --teacher_model_name_or_path."""
    args = recipe_args("sst2", "PLACEHOLDER", output_dir, *extra)
    at = args.index("PLACEHOLDER")
    return args[:at] + list(teachers) + args[at + 1 :]


def validation_rows():
    with open(os.path.join(FIXTURES, "sst2", "validation.tsv"), encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file, delimiter="\t"))


def reference_ensemble_accuracy(teacher_dirs, weights):
    """Accuracy of the weighted mixture of the teachers' probabilities, one unpadded example at a time."""
    rows = validation_rows()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dirs[0])
    mixture = 0
    for weight, folder in zip(weights, teacher_dirs):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = np.concatenate([
                model(**tokenizer(row["sentence"], truncation=True, max_length=32, return_tensors="pt")).logits.numpy()
                for row in rows
            ])
        mixture = mixture + weight / sum(weights) * softmax(logits, axis=-1)
    labels = np.array([int(row["label"]) for row in rows])
    return float((mixture.argmax(-1) == labels).mean())


def test_two_teachers_end_to_end(tmp_path, capsys):
    first, second = save_peaked_teacher(str(tmp_path / "a"), 1), save_peaked_teacher(str(tmp_path / "b"), 5)
    output_dir = str(tmp_path / "run")
    recipe.main(recipe_with_teachers(
        [first, second], output_dir, "--max_train_samples", "96", "--teacher_weights", "2", "1",
        "--teacher_hub_id", "org/teacher-a", "org/teacher-b",
    ))
    assert not os.path.exists(os.path.join(output_dir, "teacher"))
    teacher_dirs = [os.path.join(output_dir, name) for name in ("teacher_0", "teacher_1")]
    for folder, given in zip(teacher_dirs, (first, second)):  # used as given: each has a head for the task
        saved = AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
        original = AutoModelForSequenceClassification.from_pretrained(given).state_dict()
        assert all(torch.equal(saved[key], original[key]) for key in original)

    with open(os.path.join(output_dir, "results.json")) as file:
        report = json.load(file)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["teacher_0", "teacher_1", "ensemble", "baseline", "student"]
    ensemble = rows["ensemble"]
    assert ensemble["metric_value"] == pytest.approx(reference_ensemble_accuracy(teacher_dirs, [2, 1]))
    assert ensemble["num_parameters"] == rows["teacher_0"]["num_parameters"] + rows["teacher_1"]["num_parameters"]
    assert ensemble["size_bytes"] == rows["teacher_0"]["size_bytes"] + rows["teacher_1"]["size_bytes"]
    speeds = [rows[name]["examples_per_second"] for name in ("teacher_0", "teacher_1")]
    assert ensemble["examples_per_second"] == pytest.approx(1 / (1 / speeds[0] + 1 / speeds[1]))
    assert ensemble["retention"] == 1.0
    assert rows["student"]["retention"] == pytest.approx(rows["student"]["metric_value"] / ensemble["metric_value"])
    assert "| ensemble |" in capsys.readouterr().out

    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    assert card.data.teacher_model == ["org/teacher-a", "org/teacher-b"]
    assert card.data.base_model == "org/teacher-a"  # the student is built from the first teacher's layers
    assert card.data.distillation["teachers"] == {"teacher_0": {"model": "org/teacher-a"},
                                                  "teacher_1": {"model": "org/teacher-b"}}
    assert card.data.distillation["teacher_weights"] == [2.0, 1.0]
    assert card.data.distillation["teacher_ensemble"] == "mean_probs"
    assert "teacher_finetune" not in card.data.distillation
    assert "org/teacher-a" in card.text and "org/teacher-b" in card.text


def test_predictions_come_in_dataset_order_under_group_by_length(tmp_path):
    from conftest import logits_of, make_args, toy_dataset
    from transformers import DataCollatorWithPadding

    from hf_distill.recipe_support.stages import predict_model

    dataset, teacher = toy_dataset(40, num_labels=2, max_length=30), tiny_bert(num_labels=2, seed=3)
    args = make_args(tmp_path, train_sampling_strategy="group_by_length", per_device_eval_batch_size=8, seed=5)
    _, predictions, label_ids = predict_model(teacher, dataset, DataCollatorWithPadding(tiny_tokenizer(str(tmp_path))),
                                              None, args)
    np.testing.assert_allclose(predictions, logits_of(teacher, dataset), atol=1e-5)
    assert label_ids.tolist() == dataset["label"]


def test_a_rerun_reuses_every_teacher_cache(tmp_path, monkeypatch):
    built, build = [], hf_distill.cache._build

    def recording_build(**kwargs):  # the cache column each teacher pass builds
        built.append(os.path.basename(kwargs["path"]).split("-")[0])
        build(**kwargs)

    monkeypatch.setattr(hf_distill.cache, "_build", recording_build)
    teachers = [save_peaked_teacher(str(tmp_path / name), seed) for name, seed in (("a", 1), ("b", 5), ("c", 7))]
    output_dir = str(tmp_path / "run")
    extra = ("--max_train_samples", "48", "--baseline", "false", "--overwrite_output_dir", "true")
    recipe.main(recipe_with_teachers(teachers[:2], output_dir, *extra))
    assert set(built) == {"teacher_logits_0", "teacher_logits_1"}
    built.clear()
    recipe.main(recipe_with_teachers(teachers[:2], output_dir, *extra))
    assert built == []
    recipe.main(recipe_with_teachers(teachers, output_dir, *extra))  # a third teacher: only its own cache is built
    assert set(built) == {"teacher_logits_2"}


def test_one_checkpoint_fine_tuned_with_two_seeds(tmp_path):
    base = str(tmp_path / "base")
    tiny_tokenizer(base, fixture_words())
    tiny_bert(hidden_size=32, num_layers=4, num_labels=2, seed=1).bert.save_pretrained(base)
    output_dir = str(tmp_path / "run")
    recipe.main(recipe_with_teachers(
        [base], output_dir, "--teacher_seeds", "3", "4", "--teacher_hub_id", "someone/tiny-base", "--baseline",
        "false", "--max_train_samples", "48", "--teacher_ensemble", "mean_logits",
    ))
    first, second = (AutoModelForSequenceClassification.from_pretrained(os.path.join(output_dir, name))
                     for name in ("teacher_0", "teacher_1"))
    assert not torch.equal(first.classifier.weight, second.classifier.weight)
    assert not torch.equal(first.bert.encoder.layer[0].output.dense.weight,
                           second.bert.encoder.layer[0].output.dense.weight)  # both fine-tuned, differently
    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    assert card.data.teacher_model == "someone/tiny-base"
    assert card.data.distillation["teachers"] == {"teacher_0": {"model": "someone/tiny-base", "seed": 3},
                                                  "teacher_1": {"model": "someone/tiny-base", "seed": 4}}
    assert card.data.distillation["teacher_ensemble"] == "mean_logits"
    with open(os.path.join(output_dir, "results.json")) as file:
        assert [row["name"] for row in json.load(file)["rows"]] == ["teacher_0", "teacher_1", "ensemble", "student"]


def test_teachers_from_a_yaml_list_or_string(tmp_path):
    dataclasses = (recipe.ModelArguments, recipe.DataArguments, recipe.RecipeArguments,
                   recipe.DistillationTrainingArguments)
    for value, expected in (("[a, b]", ["a", "b"]), ("a", ["a"])):
        config = tmp_path / "run.yaml"
        config.write_text(f"task_name: sst2\nteacher_model_name_or_path: {value}\nteacher_seeds: [1, 2]\n"
                          f"output_dir: {tmp_path / 'out'}\n")
        model_args = recipe.parse_args(dataclasses, [str(config)])[0]
        assert model_args.teacher_model_name_or_path == expected and model_args.teacher_seeds == [1, 2]



def test_a_config_file_then_command_line_settings_that_override_it(tmp_path):
    dataclasses = (recipe.ModelArguments, recipe.DataArguments, recipe.RecipeArguments,
                   recipe.DistillationTrainingArguments)
    config = tmp_path / "run.yaml"
    config.write_text(f"task_name: sst2\nteacher_model_name_or_path: a\nseed: 3\nlearning_rate: 1.0e-4\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    model_args, data_args, _, training_args = recipe.parse_args(
        dataclasses, [str(config), "--seed", "43", "--output_dir", str(tmp_path / "out43")]
    )
    assert model_args.teacher_model_name_or_path == ["a"] and data_args.task_name == "sst2"
    assert (training_args.seed, training_args.learning_rate) == (43, 1e-4)
    assert training_args.output_dir == str(tmp_path / "out43")
    config.write_text("task_name: sst2\nteacher_model_name_or_path: a\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"sets \['learning_rat'\], which no argument of this recipe has"):
        recipe.parse_args(dataclasses, [str(config)])

# ---- bad teacher sets: a clear error before any work, the output folder unclaimed ----


def _headed(tmp_path):
    return save_peaked_teacher(str(tmp_path / "a"), 1), save_peaked_teacher(str(tmp_path / "b"), 5)


def _other_labels(tmp_path):
    return save_peaked_teacher(str(tmp_path / "a"), 1), save_teacher(str(tmp_path / "c"), 3)


def _other_tokenizer(tmp_path):
    other = str(tmp_path / "d")
    tiny_tokenizer(other)
    tiny_bert(hidden_size=32, num_layers=4, num_labels=2, seed=5).save_pretrained(other)
    return save_peaked_teacher(str(tmp_path / "a"), 1), other


@pytest.mark.parametrize(
    "make_teachers, extra, message",
    [
        (_headed, ["--teacher_seeds", "1", "2", "3"], "--teacher_seeds has 3 seeds for 2 teachers"),
        (_headed, ["--teacher_weights", "1"], "--teacher_weights has 1 weights for 2 teacher"),
        (_headed, ["--teacher_hub_id", "org/a"], "--teacher_hub_id has 1 ids for 2"),
        (_headed, ["--intermediate_epochs", "1"], "with several teachers, leave them at 0"),
        (_headed, ["--teacher_seeds", "1", "2"], "seed the teachers' fine-tuning.*--finetune_teacher yes"),
        (lambda tmp_path: [_headed(tmp_path)[0]] * 2, [], "names the same checkpoint twice.*--teacher_seeds"),
        (_other_labels, [], "head of another shape.*2 labels"),
        (_other_tokenizer, [], "have different tokenizers"),
    ],
)
def test_bad_teacher_sets_are_refused_before_any_work(tmp_path, make_teachers, extra, message):
    output_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        recipe.main(recipe_with_teachers(make_teachers(tmp_path), output_dir, *extra))
    assert not os.path.exists(output_dir) and not os.path.exists(output_dir + "_cache")
