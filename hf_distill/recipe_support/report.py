"""
Teacher vs baseline vs student: size, task metric and throughput, as JSON, a Markdown table and a bar chart.

`retention` is a model's task metric divided by the teacher's (the teacher's divided by the model's when lower is
better, e.g. perplexity), so 100% means the teacher's quality; `speedup` its throughput divided by the teacher's.
Throughput is in examples/s (classification) or tokens/s (language models); further metrics can be shown as
columns, and a language model's greedy generations side by side.
"""

import inspect
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from accelerate.utils import extract_model_from_parallel

logger = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin")
# `*.bin` files that `Trainer.save_model` writes beside the weights and that are not weights.
NOT_WEIGHT_FILES = {"training_args.bin"}
_BAR_COLORS = {"teacher": "#4c72b0", "ensemble": "#64b5cd", "baseline": "#8c8c8c", "student": "#dd8452"}


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of `model` (shared tensors counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def size_on_disk(path: str) -> int:
    """Bytes of the weight files (`*.safetensors`, `*.bin` other than `training_args.bin`) directly in the saved
    model folder `path`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a folder. Pass the folder written by `save_pretrained`.")
    sizes = [
        os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if name.endswith(WEIGHT_FILE_SUFFIXES) and name not in NOT_WEIGHT_FILES
        and os.path.isfile(os.path.join(path, name))
    ]
    if not sizes:
        raise FileNotFoundError(
            f"No weight file (*.safetensors, *.bin) in {path!r}. Save the model there with `save_pretrained` first."
        )
    return sum(sizes)


def _model_input_names(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters) - {"labels", "label", "kwargs", "args"}


@torch.inference_mode()
def measure_latency(
    model: torch.nn.Module,
    dataset,
    data_collator,
    batch_size: int = 32,
    num_warmup_batches: int = 2,
    max_batches: int | None = None,
) -> dict[str, float]:
    """
    Measure inference throughput of `model` over a tokenized `datasets.Dataset` (or list of dicts), in order.

    Only the columns `model.forward` accepts (e.g. `input_ids`, `attention_mask`, `token_type_ids`) are kept;
    labels, `idx` and teacher columns are dropped. Batches are collated before timing, so the time is the forward
    passes only. The first `num_warmup_batches` batches are run once untimed; then every batch (at most
    `max_batches`) is timed with `time.perf_counter`. Inputs go to the model's device; put the model on CPU for
    CPU figures.

    Returns:
        `{"examples_per_second", "ms_per_batch", "batch_size", "num_examples", "num_batches"}`.
    """
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; pass at least one tokenized example to measure latency.")
    model.eval()
    device = next(model.parameters()).device
    input_names = _model_input_names(model) & set(dataset[0].keys())
    if not input_names:
        raise ValueError(
            f"No column of the dataset ({sorted(dataset[0].keys())}) is an input of {type(model).__name__}.forward. "
            "Tokenize the dataset first (see `hf_distill.recipe_support.glue.tokenize_glue`)."
        )

    num_batches = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    batches = []
    for start in range(0, num_batches * batch_size, batch_size):
        rows = dataset[start : start + batch_size]
        if isinstance(rows, dict):
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        features = [{name: row[name] for name in input_names} for row in rows]
        batches.append({name: tensor.to(device) for name, tensor in data_collator(features).items()})

    for batch in batches[:num_warmup_batches]:
        model(**batch)
    _synchronize(device)
    start_time = time.perf_counter()
    for batch in batches:
        model(**batch)
    _synchronize(device)
    elapsed = time.perf_counter() - start_time

    num_examples = sum(len(batch["input_ids" if "input_ids" in batch else next(iter(batch))]) for batch in batches)
    return {
        "examples_per_second": num_examples / elapsed,
        "ms_per_batch": 1000 * elapsed / len(batches),
        "batch_size": batch_size,
        "num_examples": num_examples,
        "num_batches": len(batches),
    }


def without_autocast(model: torch.nn.Module) -> torch.nn.Module:
    """`model` without the autocast that accelerate's mixed precision wraps around a trained model's forward (and
    without a DDP wrapper), in place: a report runs every model in its own dtype, as it is saved and deployed."""
    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def compare_throughput(
    models: dict[str, torch.nn.Module], dataset, data_collator, batch_size: int = 32, rounds: int = 3
) -> dict[str, float]:
    """Examples per second of each model over `dataset`, measured in interleaved rounds; the best round counts.
    Every model runs in its own dtype (`without_autocast`): a model trained with `bf16=True` is not timed in bf16
    against a teacher in float32.

    Every round times one full pass of each model in turn, so load from other processes hits all models alike;
    the fastest pass of each model is the least disturbed one.

    Returns:
        `{name: examples_per_second}`.
    """
    models = {name: without_autocast(model) for name, model in models.items()}
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, model in models.items():
            result = measure_latency(model, dataset, data_collator, batch_size=batch_size)
            best[name] = max(best[name], result["examples_per_second"])
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ReportRow:
    """One model of the report: `name` is `"teacher"`, `"baseline"` or `"student"`."""

    name: str
    model_path: str
    metric_name: str
    metric_value: float
    num_parameters: int
    size_bytes: int
    examples_per_second: float
    all_metrics: dict[str, float] = field(default_factory=dict)


def model_row(
    name: str,
    model: torch.nn.Module,
    model_path: str,
    metrics: dict[str, float],
    main_metric: str,
    examples_per_second: float,
    metric_names=None,
) -> ReportRow:
    """The report row of a model saved in `model_path`: its metrics (`metric_names`, default every number in
    `metrics`), parameters, size on disk and throughput."""
    names = metric_names or [key for key, value in metrics.items() if isinstance(value, (int, float))]
    if main_metric not in metrics:
        raise ValueError(f"The metrics of {name!r} ({sorted(metrics)}) lack the report's main metric {main_metric!r}.")
    return ReportRow(
        name=name,
        model_path=model_path,
        metric_name=main_metric,
        metric_value=metrics[main_metric],
        num_parameters=count_parameters(model),
        size_bytes=size_on_disk(model_path),
        examples_per_second=examples_per_second,
        all_metrics={metric: metrics[metric] for metric in names},
    )


def combined_row(name: str, members: list[ReportRow], metrics: dict[str, float], main_metric: str,
                 metric_names=None) -> ReportRow:
    """The report row of models run one after another on every example (an ensemble of `members`): its own
    `metrics`, the members' parameters and sizes summed, and the throughput of running them all (their times per
    example add up)."""
    names = metric_names or [key for key, value in metrics.items() if isinstance(value, (int, float))]
    return ReportRow(
        name=name,
        model_path=", ".join(member.model_path for member in members),
        metric_name=main_metric,
        metric_value=metrics[main_metric],
        num_parameters=sum(member.num_parameters for member in members),
        size_bytes=sum(member.size_bytes for member in members),
        examples_per_second=1.0 / sum(1.0 / member.examples_per_second for member in members),
        all_metrics={metric: metrics[metric] for metric in names},
    )


def build_report(
    rows: list[ReportRow],
    main_metric: str,
    reference: str = "teacher",
    *,
    higher_is_better: bool = True,
    throughput_unit: str = "examples/s",
    columns: list[tuple[str, str, str]] | None = None,
    generations: dict | None = None,
) -> dict:
    """
    Combine the rows and add `retention` and `speedup` relative to the row named `reference` (the teacher; with
    several teachers, e.g. their `"ensemble"`).

    Args:
        rows: one per model.
        main_metric: the metric every row reports as `metric_value`.
        higher_is_better: False for metrics such as perplexity: retention is then teacher / model.
        throughput_unit: what `examples_per_second` counts (`"examples/s"` or `"tokens/s"`).
        columns: further table columns `(all_metrics key, header, format)`, e.g. `("teacher_agreement",
            "top-1 agreement", "{:.1%}")`.
        generations: `{"prompts": [...], <row name>: [continuations]}`, shown side by side.

    Returns:
        `{"main_metric": str, "rows": [dict of each `ReportRow` field plus "retention" and "speedup"], ...}` with the
        options above; the two ratios are `None` when there is no reference row or a value is 0.
    """
    teachers = [row for row in rows if row.name == reference]
    if len(teachers) > 1:
        raise ValueError(f"The report has more than one row named {reference!r}; give exactly one such row.")
    teacher = teachers[0] if teachers else None
    for row in rows:
        if row.metric_name != main_metric:
            raise ValueError(
                f"Row {row.name!r} reports {row.metric_name!r}, but the report compares {main_metric!r}. "
                "Use the task's main metric for every row."
            )

    def ratio(value, reference):
        return value / reference if reference else None

    def retention(row):
        if teacher is None:
            return None
        if higher_is_better:
            return ratio(row.metric_value, teacher.metric_value)
        return ratio(teacher.metric_value, row.metric_value)

    report = {
        "main_metric": main_metric,
        "higher_is_better": higher_is_better,
        "throughput_unit": throughput_unit,
        "rows": [
            {
                **asdict(row),
                "retention": retention(row),
                "speedup": ratio(row.examples_per_second, teacher.examples_per_second) if teacher else None,
            }
            for row in rows
        ],
    }
    if columns:
        report["columns"] = [list(column) for column in columns]
    if generations:
        report["generations"] = generations
    return report


def report_to_markdown(report: dict) -> str:
    """A Markdown table: model | metric | [columns] | params (M) | size (MB) | throughput | retention | speed-up;
    then the generations, when the report has them, one table per prompt."""

    def optional(value, template):
        return "–" if value is None else template.format(value)

    columns = report.get("columns", [])
    unit = report.get("throughput_unit", "examples/s")
    extra_headers = "".join(f" {header} |" for _, header, _ in columns)
    lines = [
        f"| model | {report['main_metric']} |{extra_headers} params (M) | size (MB) | {unit} | retention | speed-up |",
        "|---|---:|" + "---:|" * len(columns) + "---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        extra = "".join(f" {optional(row['all_metrics'].get(key), template)} |" for key, _, template in columns)
        lines.append(
            f"| {row['name']} | {row['metric_value']:.4f} |{extra} {row['num_parameters'] / 1e6:.2f} | "
            f"{row['size_bytes'] / 1e6:.1f} | {row['examples_per_second']:.1f} | "
            f"{optional(row['retention'], '{:.1%}')} | {optional(row['speedup'], '{:.2f}×')} |"
        )
    generations = report.get("generations")
    if generations:
        names = [row["name"] for row in report["rows"] if row["name"] in generations]
        lines += ["", "Greedy generations from the same prompts:"]
        for index, prompt in enumerate(generations["prompts"]):
            lines += ["", f"Prompt: `{_cell(prompt)}`", "", "| model | continuation |", "|---|---|"]
            lines += [f"| {name} | {_cell(generations[name][index])} |" for name in names]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, no pipe or backtick breaking the table."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")


def write_report(report: dict, output_dir: str) -> dict[str, str | None]:
    """
    Write `results.json`, `report.md` and `report.png` (task metric and throughput per model) to `output_dir`.

    The chart needs matplotlib (the `examples` extra); without it the PNG is skipped with a warning.

    Returns:
        `{"json": path, "markdown": path, "chart": path or None}`.
    """
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "results.json")
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
    markdown_path = os.path.join(output_dir, "report.md")
    with open(markdown_path, "w", encoding="utf-8") as file:
        file.write(report_to_markdown(report))
    return {"json": json_path, "markdown": markdown_path, "chart": _write_chart(report, output_dir)}


def _write_chart(report: dict, output_dir: str) -> str | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed, so report.png is skipped. Install it: `pip install matplotlib`.")
        return None
    names = [row["name"] for row in report["rows"]]
    colors = [_BAR_COLORS.get(name.split("_")[0], "#55a868") for name in names]  # student_deit: a student
    # Figure + Agg canvas rather than pyplot, so the caller's matplotlib backend is left alone.
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    metric_axes, speed_axes = figure.subplots(1, 2)
    for axes, key, title in (
        (metric_axes, "metric_value", report["main_metric"]),
        (speed_axes, "examples_per_second", f"throughput ({report.get('throughput_unit', 'examples/s')})"),
    ):
        values = [row[key] for row in report["rows"]]
        bars = axes.bar(names, values, color=colors)
        axes.bar_label(bars, fmt="%.3g")
        axes.set_title(title)
        axes.margins(y=0.15)
    chart_path = os.path.join(output_dir, "report.png")
    figure.savefig(chart_path, dpi=120)
    return chart_path
