"""`recipes/image_classification.py` end to end on tiny random ViTs and scikit-learn digits (a few dozen images),
from arrays and from an image folder, a ViT and a DeiT student, and its bad-input errors."""

import glob
import json
import os
import sys  # noqa: E402,I001 - the recipe folder, after the package imports

import numpy as np
import pytest
import torch
from conftest import REPO
from datasets import Dataset, DatasetDict
from huggingface_hub import ModelCard
from PIL import Image
from sklearn.datasets import load_digits
from transformers import (
    AutoModelForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTImageProcessorPil,
)

from hf_distill.recipe_support.tasks.image_classification import arrays_dataset, mixup_copies, process_images

sys.path.insert(0, os.path.join(REPO, "recipes"))
import image_classification as recipe  # noqa: E402

TINY_VIT = "image_size=8,patch_size=4,num_channels=1,hidden_size=32,num_hidden_layers=2,num_attention_heads=2," \
    "intermediate_size=64"


def digit_arrays(folder, count=48, offset=0):
    """`count` scikit-learn digits as a .npz (uint8 8x8 images, labels 0-9)."""
    digits = load_digits()
    images = (digits.images[offset : offset + count] * (255 / 16)).astype(np.uint8)
    path = os.path.join(folder, f"digits_{offset}.npz")
    np.savez(path, images=images, labels=digits.target[offset : offset + count])
    return path


def image_args(tmp_path, *extra):
    return [
        "--train_file", digit_arrays(str(tmp_path), 64), "--validation_file", digit_arrays(str(tmp_path), 32, 64),
        "--teacher_model_type", "vit", "--teacher_config_overrides", TINY_VIT,
        "--teacher_num_train_epochs", "1", "--teacher_learning_rate", "1e-3",
        "--student_config_overrides", "num_hidden_layers=1,hidden_size=16,intermediate_size=32",
        "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "16", "--num_train_epochs", "1",
        "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
        "--disable_tqdm", "true", "--latency_batch_size", "16", "--latency_rounds", "1",
        "--teacher_cache_dir", str(tmp_path / "cache"), *extra,
    ]


def test_vit_and_deit_students_from_arrays(tmp_path, capsys):
    recipe.main(image_args(tmp_path, "--student_model_type", "vit", "deit"))
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == [
        "baseline_deit", "baseline_vit", "hf_distill_run.json", "report.md", "report.png", "results.json",
        "student_deit", "student_vit", "teacher",
    ]
    report = json.loads((run / "results.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["teacher", "baseline_vit", "student_vit", "baseline_deit", "student_deit"]
    assert report["main_metric"] == "accuracy"

    # The reported accuracy is the saved model's on the validation images, recomputed here.
    validation = np.load(tmp_path / "digits_64.npz")
    pixels = torch.tensor((validation["images"] / 255.0 - 0.5) / 0.5, dtype=torch.float32)[:, None]
    for name, model_class in (("student_vit", AutoModelForImageClassification),
                              ("student_deit", DeiTForImageClassificationWithTeacher)):
        model = model_class.from_pretrained(run / name).eval()
        with torch.no_grad():
            outputs = model(pixel_values=pixels)
        accuracy = (outputs.logits.argmax(-1).numpy() == validation["labels"]).mean()
        row = report["rows"][names.index(name)]
        assert row["metric_value"] == pytest.approx(accuracy)
        assert row["num_parameters"] < report["rows"][0]["num_parameters"]
        if name == "student_deit":  # DeiT's inference: the mean of its two heads
            torch.testing.assert_close(outputs.logits, (outputs.cls_logits + outputs.distillation_logits) / 2)
        card = ModelCard.load(run / name / "README.md")
        assert card.data.pipeline_tag == "image-classification" and "vision" in card.data.tags
        assert card.data.distillation["teacher_outputs"] == "cached"
        assert card.data.eval_results[0].metric_value == pytest.approx(accuracy)
    assert "| student_deit |" in capsys.readouterr().out


def test_image_folder_with_augmentation_runs_the_teacher_online(tmp_path):
    digits = load_digits()
    for split, start in (("train", 0), ("validation", 40)):
        for index in range(start, start + 40 if split == "train" else start + 20):
            folder = tmp_path / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[index] * 15).astype(np.uint8)).save(folder / f"{index}.png")
    args = image_args(tmp_path, "--train_dir", str(tmp_path / "train"),
                      "--validation_dir", str(tmp_path / "validation"), "--augment", "true", "--baseline", "false")
    args = [arg for index, arg in enumerate(args) if not (arg.endswith(".npz") or args[index - 1] in (
        "--train_file", "--validation_file") or arg in ("--train_file", "--validation_file"))]
    recipe.main(args)
    card = ModelCard.load(tmp_path / "run" / "student" / "README.md")
    assert card.data.distillation["teacher_outputs"] == "online"
    assert card.data.distillation["augmentation"] == {"max_shift": 1, "flip": False}
    assert not (tmp_path / "cache").exists()  # nothing cached: a cached logit belongs to one view


def processed_digits(count, augment=None):
    """The first `count` scikit-learn digits as a processed train split (ViT's processor, 8x8, [-1, 1])."""
    images = (load_digits().images[:count] * 15).astype(np.uint8)
    processor = ViTImageProcessorPil(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5])
    return process_images(DatasetDict({"train": arrays_dataset(images, np.arange(count))}), processor, 1,
                          augment)["train"]


def test_augmented_views_differ_and_keep_their_size():
    processed = processed_digits(4, {"max_shift": 2, "flip": False})
    first, second = np.asarray(processed[0]["pixel_values"]), np.asarray(processed[0]["pixel_values"])
    assert first.shape == (1, 8, 8) and not np.array_equal(first, second)


def test_mixup_copies_mix_two_train_images_without_a_label():
    train = processed_digits(6)
    mixed = mixup_copies(train, copies=2, alpha=0.5, seed=3)
    assert len(mixed) == 12 and set(mixed["labels"]) == {-1}
    pixels = np.stack(train.with_format("numpy")["pixel_values"])
    rng = np.random.default_rng(3)  # the draws mixup_copies makes, in its order
    for copy in range(2):
        partners = rng.permutation(6)
        weights = rng.beta(0.5, 0.5, size=6).astype(np.float32)
        for row in range(6):
            expected = weights[row] * pixels[row] + (1 - weights[row]) * pixels[partners[row]]
            np.testing.assert_allclose(np.asarray(mixed[copy * 6 + row]["pixel_values"]), expected, atol=1e-6)


def test_students_distil_on_the_train_images_and_their_mixup_copies(tmp_path):
    recipe.main(image_args(tmp_path, "--mixup_copies", "2"))
    # The teacher labelled the 64 train images and 2 x 64 mixed ones (and the 32 validation images), once for both
    # students.
    cache_files = glob.glob(str(tmp_path / "cache" / "*" / "teacher_outputs.arrow"))
    assert sorted(len(Dataset.from_file(path)) for path in cache_files) == [32, 64 * 3]
    card = ModelCard.load(tmp_path / "run" / "student" / "README.md")
    assert card.data.distillation["transfer_data"].startswith("2 mixup copies of the train images")
    assert json.loads((tmp_path / "run" / "hf_distill_run.json").read_text())["DataArguments"]["mixup_copies"] == 2


def test_students_distil_an_ensemble_of_teachers_trained_with_two_seeds(tmp_path):
    from scipy.special import softmax

    recipe.main(image_args(tmp_path, "--teacher_seeds", "1", "2", "--student_model_type", "vit", "deit"))
    run = tmp_path / "run"
    assert {"teacher_0", "teacher_1"} <= set(os.listdir(run)) and "teacher" not in os.listdir(run)
    report = json.loads((run / "results.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows)[:3] == ["teacher_0", "teacher_1", "ensemble"]

    # The two seeds gave two teachers; the ensemble row is their mean probability, recomputed from the saved ones.
    validation = np.load(tmp_path / "digits_64.npz")
    pixels = torch.tensor((validation["images"] / 255.0 - 0.5) / 0.5, dtype=torch.float32)[:, None]
    probs = []
    for name in ("teacher_0", "teacher_1"):
        with torch.no_grad():
            logits = AutoModelForImageClassification.from_pretrained(run / name).eval()(pixel_values=pixels).logits
        probs.append(softmax(logits.numpy(), -1))
        assert rows[name]["metric_value"] == pytest.approx((probs[-1].argmax(-1) == validation["labels"]).mean())
    assert not np.allclose(probs[0], probs[1])
    ensemble_accuracy = ((probs[0] + probs[1]).argmax(-1) == validation["labels"]).mean()
    assert rows["ensemble"]["metric_value"] == pytest.approx(ensemble_accuracy)
    assert rows["student_vit"]["retention"] == pytest.approx(rows["student_vit"]["metric_value"] / ensemble_accuracy)
    # Each teacher's logits are cached once, for both students (and the validation images).
    assert len(glob.glob(str(tmp_path / "cache" / "*" / "teacher_outputs.arrow"))) == 2 * 2
    card = ModelCard.load(run / "student_deit" / "README.md")
    assert card.data.distillation["teacher_training"]["seeds"] == [1, 2]


# ---- bad input ----


def test_teacher_given_twice_or_not_at_all(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --teacher_model_name_or_path .* and --teacher_model_type"):
        recipe.main(image_args(tmp_path, "--teacher_model_name_or_path", "some/vit"))


def test_unknown_student_type(tmp_path):
    with pytest.raises(ValueError, match=r"--student_model_type \['resnet'\]: use one or more of"):
        recipe.main(image_args(tmp_path, "--student_model_type", "resnet"))


def test_student_with_another_patch_size(tmp_path):
    with pytest.raises(ValueError, match="must keep the teacher's image_size and patch_size"):
        recipe.main(image_args(tmp_path, "--student_config_overrides", "patch_size=2"))
    assert not (tmp_path / "run").exists()


def test_bad_overrides_and_arrays(tmp_path):
    with pytest.raises(ValueError, match="'hidden_size' is not key=value"):
        recipe.main(image_args(tmp_path, "--student_config_overrides", "hidden_size"))
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8)), labels=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="must be uint8"):
        recipe.main(image_args(tmp_path, "--train_file", str(tmp_path / "float.npz")))


def test_mixup_copies_with_random_views_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--mixup_copies mixes stored images: drop --augment"):
        recipe.main(image_args(tmp_path, "--mixup_copies", "1", "--augment", "true"))
    assert not (tmp_path / "run").exists()


def test_two_data_sources(tmp_path):
    with pytest.raises(ValueError, match="exactly one data source"):
        recipe.main(image_args(tmp_path, "--dataset_name", "sklearn_digits"))


def test_teacher_seeds_need_teachers_trained_here_and_one_weight_each(tmp_path):
    with pytest.raises(ValueError, match="--teacher_weights has 3 weights for 2 teacher"):
        recipe.main(image_args(tmp_path, "--teacher_seeds", "1", "2", "--teacher_weights", "1", "1", "1"))
    config = ViTConfig(**recipe.parse_overrides(TINY_VIT, "overrides"), num_labels=10)
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "trained")
    args = image_args(tmp_path, "--teacher_seeds", "1", "2")
    args[args.index("--teacher_model_type"):args.index("--teacher_model_type") + 4] = [
        "--teacher_model_name_or_path", str(tmp_path / "trained")]
    with pytest.raises(ValueError, match="--teacher_seeds trains one teacher per seed, but .* used as given"):
        recipe.main(args)
    assert not (tmp_path / "run").exists()
