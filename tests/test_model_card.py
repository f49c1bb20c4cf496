import re

import pytest
from huggingface_hub import ModelCard

from hf_distill.model_card import build_model_card

FAKE_TOKEN = "hf_" + "x1Y2" * 9


def card_arguments(**overrides):
    arguments = {
        "student_id_or_path_base": "google/bert_uncased_L-4_H-256_A-4",
        "teacher_model_id": "textattack/bert-base-uncased-SST-2",
        "task": "sst2",
        "dataset_id": "glue",
        "dataset_config": None,
        "model_name": "bert-mini-sst2-distilled",
        "eval_results": {"eval_accuracy": 0.9014, "eval_loss": 0.31, "epoch": 3.0},
        "distillation_settings": {
            "temperature": 2.0,
            "alpha": 0.5,
            "layer_map": {0: 1, 1: 3},
            "student_init": ("layers", [0, 3]),
            "hub_token": FAKE_TOKEN,
            "note": f"pushed with {FAKE_TOKEN}",
        },
        "report_markdown": "| model | accuracy |\n|---|---:|\n| teacher | 0.92 |\n",
        "chart_path": "report.png",
    }
    return arguments | overrides


def test_card_round_trips_offline(tmp_path):
    card = build_model_card(**card_arguments())
    parsed = ModelCard(str(card))  # validates model-index offline; raises on metadata errors
    data = parsed.data
    assert data.base_model == "google/bert_uncased_L-4_H-256_A-4"
    assert data.teacher_model == "textattack/bert-base-uncased-SST-2"
    assert {"distillation", "knowledge-distillation", "hf_distill", "sst2", "text-classification"} <= set(data.tags)
    assert data.datasets == ["glue"] and data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.pipeline_tag == "text-classification"
    assert data.distillation["temperature"] == 2.0 and data.distillation["layer_map"] == {"0": 1, "1": 3}
    [result] = data.eval_results  # eval_loss and epoch are not task metrics
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.9014)
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("glue", "sst2", "validation")
    assert parsed.data.to_dict()["model-index"][0]["name"] == "bert-mini-sst2-distilled"

    path = tmp_path / "README.md"
    card.save(path)
    assert ModelCard.load(path).data.teacher_model == "textattack/bert-base-uncased-SST-2"


def test_card_body():
    text = build_model_card(**card_arguments()).text
    for expected in (
        "# bert-mini-sst2-distilled",
        "distilled from the teacher [`textattack/bert-base-uncased-SST-2`]",
        "## Distillation",
        "- **temperature**: `2.0`",
        "| teacher | 0.92 |",
        "![Task metric and throughput of teacher, baseline and student](report.png)",
        "AutoModelForSequenceClassification.from_pretrained",
        "## Limitations",
    ):
        assert expected in text


def test_card_never_holds_a_token(monkeypatch):
    content = str(build_model_card(**card_arguments()))
    assert FAKE_TOKEN not in content
    assert "hub_token" not in content and "verify_token" not in content
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", content)


def test_local_student_and_data_regression(tmp_path):
    card = build_model_card(
        **card_arguments(
            student_id_or_path_base=str(tmp_path),
            task="stsb",
            dataset_id="local GLUE copy",
            eval_results={"pearson": 0.85, "spearmanr": 0.84},
            report_markdown=None,
            chart_path=None,
        )
    )
    data = ModelCard(str(card)).data
    assert data.base_model is None and data.datasets is None
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("pearsonr", 0.85), ("spearmanr", 0.84)]
    assert data.eval_results[0].dataset_config == "stsb"
    assert str(tmp_path) not in str(card)
    assert "report.png" not in card.text


@pytest.mark.parametrize("extra_tags", [("glue", "distillation"), ()])
def test_tags_are_unique(extra_tags):
    tags = ModelCard(str(build_model_card(**card_arguments(extra_tags=extra_tags)))).data.tags
    assert len(tags) == len(set(tags))


def test_body_names_the_teacher_layers_a_student_was_built_from():
    settings = card_arguments()["distillation_settings"] | {"student_init": {"from_teacher_layers": [0, 3, 5]}}
    text = build_model_card(**card_arguments(distillation_settings=settings)).text
    assert "textattack/bert-base-uncased-SST-2`](https://huggingface.co/textattack/bert-base-uncased-SST-2), " \
        "initialised from its layers 0, 3, 5, on the GLUE **sst2** task" in text
