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
        "initialised from its layers 0, 3, 5, on the **sst2** task" in text


def test_trainer_writes_the_distillation_card_for_any_head(tmp_path):
    from conftest import PadCollator, tiny_bert, tiny_llama, toy_dataset, toy_lm_dataset

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    def args(name):
        return DistillationTrainingArguments(output_dir=str(tmp_path / name), use_cpu=True, report_to=[],
                                             teacher_cache_dir=str(tmp_path / "cache"), disable_tqdm=True,
                                             teacher_cache_top_k=8, hub_token=FAKE_TOKEN)

    lm = DistillationTrainer(model=tiny_llama(num_layers=1), teacher_model=tiny_llama(seed=2), args=args("lm"),
                             train_dataset=toy_lm_dataset(4), data_collator=PadCollator())
    card = lm.create_model_card(teacher_model_name="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="wikitext",
                                dataset_args="wikitext-2-raw-v1", eval_results={"eval_perplexity": 31.5},
                                extra_settings={"block_size": 128})
    data = ModelCard.load(tmp_path / "lm" / "README.md").data
    assert str(card) == str(ModelCard.load(tmp_path / "lm" / "README.md"))
    assert data.pipeline_tag == "text-generation" and "text-generation" in data.tags
    assert data.teacher_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.distillation["head"] == "causal_lm" and data.distillation["block_size"] == 128
    assert data.distillation["teacher_outputs"] == {"cached": True, "layout": "topk", "dtype": "float16",
                                                    "top_k": 8, "topk_tail": "rest"}
    [result] = data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_config) == ("perplexity", 31.5,
                                                                                  "wikitext-2-raw-v1")
    assert "AutoModelForCausalLM.from_pretrained" in card.text and FAKE_TOKEN not in str(card)

    classifier = DistillationTrainer(model=tiny_bert(), teacher_model=tiny_bert(hidden_size=48, seed=1),
                                     args=args("cls"), train_dataset=toy_dataset(4))
    data = classifier.create_model_card(dataset="glue", dataset_args="sst2").data
    assert data.pipeline_tag == "text-classification" and data.distillation["head"] == "sequence_classification"


def test_trainer_without_a_teacher_writes_trainers_card(tmp_path):
    from conftest import tiny_bert

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    trainer = DistillationTrainer(model=tiny_bert(), args=DistillationTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    assert trainer.create_model_card(model_name="plain") is None
    data = ModelCard.load(tmp_path / "README.md").data
    assert "distillation" not in data.to_dict() and data.to_dict()["model-index"][0]["name"] == "plain"
