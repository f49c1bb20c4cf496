import json
import sys
from pathlib import Path

import pytest
from conftest import toy_dataset
from transformers import DataCollatorWithPadding

from hf_distill.recipe_support.report import (
    ReportRow,
    build_report,
    compare_throughput,
    count_parameters,
    measure_latency,
    report_to_markdown,
    size_on_disk,
    without_autocast,
    write_report,
)


def make_rows():
    return [
        ReportRow("teacher", "t", "accuracy", 0.92, 110_000_000, 440_000_000, 100.0, {"accuracy": 0.92}),
        ReportRow("baseline", "b", "accuracy", 0.85, 11_000_000, 44_000_000, 300.0),
        ReportRow("student", "s", "accuracy", 0.90, 11_000_000, 44_000_000, 290.0),
    ]


def test_build_report_ratios():
    report = build_report(make_rows(), "accuracy")
    ratios = {row["name"]: (row["retention"], row["speedup"]) for row in report["rows"]}
    assert ratios["teacher"] == (1.0, 1.0)
    assert ratios["baseline"] == pytest.approx((0.85 / 0.92, 3.0))
    assert ratios["student"] == pytest.approx((0.90 / 0.92, 2.9))
    assert report["rows"][0]["all_metrics"] == {"accuracy": 0.92}


def test_report_without_teacher_and_metric_mismatch():
    report = build_report(make_rows()[1:], "accuracy")
    assert all(row["retention"] is None and row["speedup"] is None for row in report["rows"])
    assert "| – | – |" in report_to_markdown(report)
    with pytest.raises(ValueError, match="reports 'accuracy'.*compares 'f1'"):
        build_report(make_rows(), "f1")


def test_markdown_table():
    lines = report_to_markdown(build_report(make_rows(), "accuracy")).strip().splitlines()
    assert lines[0] == "| model | accuracy | params (M) | size (MB) | examples/s | retention | speed-up |"
    assert len(lines) == 2 + 3
    assert lines[4] == "| student | 0.9000 | 11.00 | 44.0 | 290.0 | 97.8% | 2.90× |"


def test_write_report(tmp_path):
    pytest.importorskip("matplotlib")
    report = build_report(make_rows(), "accuracy")
    paths = write_report(report, str(tmp_path / "out"))
    assert json.loads(Path(paths["json"]).read_text()) == report
    assert Path(paths["markdown"]).read_text() == report_to_markdown(report)
    assert Path(paths["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # makes the import fail
    paths = write_report(build_report(make_rows(), "accuracy"), str(tmp_path))
    assert paths["chart"] is None and "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "report.png").exists()


def test_count_parameters_and_size_on_disk(student, tmp_path):
    assert count_parameters(student) == sum(p.numel() for p in student.parameters()) > 0
    student.save_pretrained(tmp_path)
    assert size_on_disk(str(tmp_path)) == (tmp_path / "model.safetensors").stat().st_size
    # Trainer.save_model writes training_args.bin beside the weights: not part of the model's size.
    (tmp_path / "training_args.bin").write_bytes(b"x" * 5000)
    assert size_on_disk(str(tmp_path)) == (tmp_path / "model.safetensors").stat().st_size
    with pytest.raises(FileNotFoundError, match="No weight file"):
        size_on_disk(str(tmp_path / ".."))


def test_measure_latency(student, tokenizer):
    dataset = toy_dataset(num_examples=7)
    dataset = dataset.add_column("idx", list(range(7))).add_column("teacher_logits", [[0.1, 0.2, 0.3]] * 7)
    seen_keys = set()
    padding_collator = DataCollatorWithPadding(tokenizer)

    def collator(features):
        seen_keys.update(key for feature in features for key in feature)
        return padding_collator(features)

    result = measure_latency(student, dataset, collator, batch_size=3, num_warmup_batches=1)
    assert seen_keys == {"input_ids", "attention_mask"}
    assert result["num_examples"] == 7 and result["num_batches"] == 3 and result["batch_size"] == 3
    assert result["examples_per_second"] > 0 and result["ms_per_batch"] > 0
    limited = measure_latency(student, dataset, collator, batch_size=2, max_batches=2)
    assert (limited["num_examples"], limited["num_batches"]) == (4, 2)


def test_compare_throughput_keeps_each_models_fastest_round(student, teacher, tokenizer, monkeypatch):
    import hf_distill.recipe_support.report as report

    collator = DataCollatorWithPadding(tokenizer)
    dataset = toy_dataset(6)
    calls = []
    speeds = iter([10.0, 50.0, 30.0, 20.0, 20.0, 40.0])  # round-robin: student, teacher, student, teacher, ...

    def fake_latency(model, dataset, data_collator, batch_size):
        calls.append(model)
        return {"examples_per_second": next(speeds)}

    monkeypatch.setattr(report, "measure_latency", fake_latency)
    result = compare_throughput({"student": student, "teacher": teacher}, dataset, collator, batch_size=3, rounds=3)
    assert calls == [student, teacher] * 3
    assert result == {"student": 30.0, "teacher": 50.0}


def test_throughput_runs_a_model_trained_in_bf16_without_its_autocast(tmp_path, tokenizer):
    """A Trainer with bf16=True leaves the model's forward wrapped in autocast: timed like that, a student would run
    in bfloat16 against a float32 teacher. `without_autocast` restores the model's own float32 forward."""
    import copy

    import torch
    from conftest import tiny_bert
    from transformers import Trainer, TrainingArguments

    model = tiny_bert(hidden_size=64, num_layers=2)
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=1, report_to=[],
                             save_strategy="no", per_device_train_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset(8),
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    reference = copy.deepcopy(trainer.model)
    reference.forward = type(reference).forward.__get__(reference)
    batch = {"input_ids": torch.randint(5, 90, (2, 9))}
    with torch.no_grad():
        expected = reference(**batch).logits
        assert not torch.equal(trainer.model(**batch).logits, expected)  # the bf16 forward
        unwrapped = without_autocast(trainer.model)
        assert unwrapped is model and torch.equal(model(**batch).logits, expected)
