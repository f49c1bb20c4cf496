"""
A model card for a distilled student: Hub metadata (`model-index`, `base_model`, tags, `teacher_model`,
`distillation`) and a Markdown body, built offline, for any task (`pipeline_tag`).

The card is plain text passed to `huggingface_hub.ModelCard`, which parses and checks the metadata without network
(`ModelCard.validate()` would need the Hub and is not called). Settings whose key names a secret (`hub_token`,
`api_key`, ...) are left out and token-like values are redacted, so a card never carries credentials.
"""

import json
import os
import re
from collections.abc import Iterable, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .arguments import ALIGNMENT_WEIGHTS, DistillationTrainingArguments
from .heads import TOPK, DistillationHead
from .teacher import model_config

BASE_TAGS = ("distillation", "knowledge-distillation", "hf_distill")
# The auto class that loads a student of each pipeline, for the card's usage snippet.
_AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "text-generation": "AutoModelForCausalLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
}
_EXAMPLE_INPUTS = {
    "text-classification": 'inputs = tokenizer("a sentence to classify", return_tensors="pt")',
    "token-classification": 'inputs = tokenizer("A sentence with entities in Paris", return_tensors="pt")',
    "question-answering": 'inputs = tokenizer("a question", "a context that answers it", return_tensors="pt")',
    "text-generation": 'inputs = tokenizer("The capital of France is", return_tensors="pt")',
    "text2text-generation": 'inputs = tokenizer("a text to transform", return_tensors="pt")',
}

# Names the Hub's model-index uses for our metric names.
_METRIC_TYPES = {"pearson": "pearsonr", "spearmanr": "spearmanr"}
_METRIC_DISPLAY_NAMES = {
    "accuracy": "Accuracy",
    "exact_match": "Exact match",
    "f1": "F1",
    "matthews_correlation": "Matthews correlation",
    "pearson": "Pearson correlation",
    "spearmanr": "Spearman correlation",
}
# `Trainer.evaluate()` keys that are not task metrics.
_NON_METRIC_KEYS = {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time"}
_SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key|apikey|credentials?)$", re.IGNORECASE)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


#: Pipelines whose card names the labels (`id2label`).
LABELLED_PIPELINES = ("text-classification", "token-classification", "image-classification")


def distillation_settings(args: DistillationTrainingArguments, head: DistillationHead, distillation_loss: str,
                          teacher_names: list[str], layer_map: dict[int, int], student_config, cached: bool,
                          top_k: int) -> dict:
    """The card's `distillation` metadata: head, temperatures, alpha, losses and weights, layer map, student
    initialisation and the teacher's cache settings (`cached`: the train set holds the teacher's outputs)."""
    settings = {
        "head": head.name,
        "temperature": args.temperature,
        "student_temperature": args.student_temperature,
        "alpha": args.alpha,
        "distillation_loss": distillation_loss,
    }
    if distillation_loss == "jsd":
        settings["jsd_beta"] = args.jsd_beta
    if len(teacher_names) > 1:
        settings["teachers"] = teacher_names
        settings["teacher_weights"] = args.teacher_weights or [1.0] * len(teacher_names)
        settings["teacher_ensemble"] = args.teacher_ensemble
    settings["loss_weights"] = {
        name: getattr(args, name) for name in ("logits_loss_weight", *ALIGNMENT_WEIGHTS) if getattr(args, name)
    }
    if layer_map:
        settings["layer_map"] = layer_map
    if args.lmbda > 0:
        settings["on_policy"] = {"lmbda": args.lmbda, "max_new_tokens": args.max_new_tokens,
                                 "temperature": args.on_policy_temperature, "top_p": args.on_policy_top_p}
    settings.update(num_train_epochs=args.num_train_epochs, learning_rate=args.learning_rate)
    init_layers = getattr(student_config, "hf_distill_init_layers", None)
    if init_layers is not None:
        settings["student_init"] = {"from_teacher_layers": init_layers}
    outputs = settings["teacher_outputs"] = {"cached": cached, "layout": head.cache_layout}
    if cached:
        outputs["dtype"] = args.teacher_cache_dtype
        if args.teacher_cache_bf16:
            outputs["teacher_autocast"] = "bfloat16"
    if head.cache_layout == TOPK and (cached or args.online_top_k):
        outputs.update(top_k=top_k, topk_tail=args.topk_tail)
        if args.sparse_target != "top_k":
            outputs["sparse_target"] = args.sparse_target
    return settings


def teacher_names(teacher_models: dict[str, nn.Module]) -> str | list[str]:
    """The card's name of the teacher (its `name_or_path`), or of each of several."""
    names = [
        getattr(model_config(model), "_name_or_path", None) or f"teacher {name}".strip()
        for name, model in teacher_models.items()
    ] or ["an unnamed teacher"]
    return names[0] if len(names) == 1 else names


def build_model_card(
    *,
    student_id_or_path_base: str | None,
    teacher_model_id: str | list[str],
    task: str | None,
    dataset_id: str,
    dataset_config: str | None,
    model_name: str,
    eval_results: Mapping[str, float],
    distillation_settings: Mapping,
    report_markdown: str | None = None,
    chart_path: str | None = None,
    license: str | None = "apache-2.0",
    extra_tags: Iterable[str] = (),
    dataset_split: str = "validation",
    pipeline_tag: str = "text-classification",
    id2label: Mapping[int, str] | None = None,
    example_inputs: str | None = None,
) -> ModelCard:
    """
    Build the model card of a student distilled from a teacher.

    Args:
        student_id_or_path_base: Hub id the student was initialised from (its `base_model`); `None` or a local path
            when there is none (e.g. a student built from a config), and then `base_model` is left out.
        teacher_model_id: Hub id or name of the teacher, or of each teacher (`teacher_model` metadata).
        task: the task's name (e.g. `"sst2"`, `"conll2003"`), a tag and the default `dataset_config`; or `None`.
        dataset_id: Hub dataset id (`"glue"`, `"nyu-mll/glue"`) or a short description of local data
            (`"local GLUE copy"`), which is shown in the body but kept out of the `datasets` metadata.
        dataset_config: dataset config, e.g. `"sst2"`; defaults to the task name.
        model_name: name of the model in `model-index` and the card title.
        eval_results: `{metric name: value}` on `dataset_split`; `Trainer.evaluate()` output works too (the
            `eval_` prefix and non-metric keys such as `eval_loss` are dropped).
        distillation_settings: temperature, alpha, loss weights, layer map, student initialisation, ...; stored
            under the `distillation` metadata key and listed in the body.
        report_markdown: a Markdown table comparing teacher, baseline and student (see `report_to_markdown`).
        chart_path: file name, relative to the card's folder, of a PNG chart to embed.
        license: licence id for the metadata.
        extra_tags: tags added to the defaults.
        dataset_split: split the results were measured on (`"validation_matched"` for mnli).
        pipeline_tag: the Hub pipeline of the student (`"text-classification"`, `"text-generation"`, ...).
        id2label: the student's named labels, listed in the body; `None` when it has none.
        example_inputs: the usage snippet's line that builds `inputs`; a default per pipeline.

    Returns:
        `huggingface_hub.ModelCard`; `card.save(os.path.join(output_dir, "README.md"))` writes it.
    """
    dataset_config = dataset_config or task
    metrics = _task_metrics(eval_results)
    settings = _yaml_safe(_without_secrets(dict(distillation_settings)))
    base_model = student_id_or_path_base if _is_hub_id(student_id_or_path_base) else None
    hub_dataset = dataset_id if _is_hub_id(dataset_id) else None
    dataset_type = hub_dataset or "local"
    dataset_name = " ".join(part for part in (dataset_id, (dataset_config or "").upper()) if part)
    task_title = pipeline_tag.replace("-", " ").title()

    tags = list(dict.fromkeys([*BASE_TAGS, pipeline_tag, *([task] if task else []), *extra_tags]))
    card_data = ModelCardData(
        base_model=base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        eval_results=[
            EvalResult(
                task_type=pipeline_tag,
                task_name=task_title,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                dataset_split=dataset_split,
                metric_type=_METRIC_TYPES.get(name, name),
                metric_name=_METRIC_DISPLAY_NAMES.get(name, name),
                metric_value=value,
            )
            for name, value in metrics.items()
        ]
        or None,
        library_name="transformers",
        license=license,
        model_name=model_name,
        pipeline_tag=pipeline_tag,
        tags=tags,
        teacher_model=teacher_model_id,
        distillation=settings,
    )
    body = _card_body(
        model_name=model_name,
        base_model=student_id_or_path_base,
        teacher_model_id=teacher_model_id,
        task=task,
        pipeline_tag=pipeline_tag,
        id2label=id2label,
        example_inputs=example_inputs
        or _EXAMPLE_INPUTS.get(pipeline_tag, 'inputs = processor(image, return_tensors="pt")'),
        dataset_description=(
            f"dataset `{hub_dataset}`" + (f", config `{dataset_config}`" if dataset_config else "")
            if hub_dataset
            else dataset_id
        ),
        dataset_split=dataset_split,
        metrics=metrics,
        settings=settings,
        report_markdown=report_markdown,
        chart_path=chart_path,
    )
    return ModelCard(_redact(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def _is_hub_id(name: str | None) -> bool:
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(name))


def _task_metrics(eval_results: Mapping[str, float]) -> dict[str, float]:
    metrics = {}
    for key, value in eval_results.items():
        name = key.removeprefix("eval_")
        if name in _NON_METRIC_KEYS or not isinstance(value, (int, float)):
            continue
        metrics[name] = float(value)
    return metrics


def _without_secrets(settings: dict) -> dict:
    return {
        key: _without_secrets(value) if isinstance(value, dict) else value
        for key, value in settings.items()
        if not _SECRET_KEY.search(str(key))
    }


def _yaml_safe(value):
    """Plain YAML/JSON types only: string keys, lists for tuples, `str()` for anything else."""
    if isinstance(value, Mapping):
        return {str(key): _yaml_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _redact(text: str) -> str:
    return _TOKEN_VALUE.sub("<redacted>", text)


def _card_body(
    *,
    model_name,
    base_model,
    teacher_model_id,
    task,
    pipeline_tag,
    id2label,
    example_inputs,
    dataset_description,
    dataset_split,
    metrics,
    settings,
    report_markdown,
    chart_path,
) -> str:
    task_text = f"the **{task}** task" if task else f"a {pipeline_tag.replace('-', ' ')} task"
    teachers = [teacher_model_id] if isinstance(teacher_model_id, str) else list(teacher_model_id)
    student_init = settings.get("student_init")
    teacher_layers = student_init.get("from_teacher_layers") if isinstance(student_init, dict) else None
    if teacher_layers:
        init_text = f", initialised from its layers {', '.join(map(str, teacher_layers))}"
    else:
        init_text = f", initialised from {_hub_link(base_model)}" if _is_hub_id(base_model) else ""
    lines = [
        f"# {model_name}",
        "",
        (
            f"This model is a student distilled from the teacher{'s' if len(teachers) > 1 else ''} "
            f"{', '.join(map(_hub_link, teachers))}{init_text}, on "
            f"{task_text} ({dataset_description}), with `hf_distill`, a knowledge-distillation extension for "
            "Hugging Face Transformers."
        ),
        "",
    ]
    if id2label:
        lines += ["Labels: " + ", ".join(f"{i} = `{name}`" for i, name in id2label.items()) + ".", ""]

    lines += ["## Distillation", ""]
    setting_lines = [f"- **{key}**: {_format_setting(value)}" for key, value in settings.items()]
    lines += setting_lines or ["- (no settings recorded)"]
    lines += [""]

    lines += ["## Results", ""]
    if metrics:
        lines += [f"On the `{dataset_split}` split:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_METRIC_DISPLAY_NAMES.get(name, name)} | {value:.4f} |" for name, value in metrics.items()]
        lines += [""]
    if report_markdown:
        lines += [
            "Teacher, baseline (the student architecture fine-tuned without distillation) and student:",
            "",
            report_markdown.strip(),
            "",
        ]
    if not metrics and not report_markdown:
        lines += ["No evaluation results were recorded.", ""]
    if chart_path:
        lines += [f"![Task metric and throughput of teacher, baseline and student]({chart_path})", ""]

    auto_class = _AUTO_CLASSES.get(pipeline_tag, "AutoModel")
    loader, loader_name = (
        ("AutoImageProcessor", "processor") if pipeline_tag.startswith("image") else ("AutoTokenizer", "tokenizer")
    )
    lines += [
        "## How to use",
        "",
        "```python",
        f"from transformers import {auto_class}, {loader}",
        "",
        'model_id = "<this repository or folder>"',
        f"{loader_name} = {loader}.from_pretrained(model_id)",
        f"model = {auto_class}.from_pretrained(model_id)",
        example_inputs,
        *(
            ["outputs = model.generate(**inputs, max_new_tokens=32)",
             "print(tokenizer.decode(outputs[0], skip_special_tokens=True))"]
            if pipeline_tag in ("text-generation", "text2text-generation")
            else ["outputs = model(**inputs)"]
        ),
        "```",
        "",
        "## Limitations",
        "",
        "- The student is trained and evaluated on one task only; it is not a general-purpose model.",
        "- It inherits the teacher's errors and biases as well as those of the training data.",
        f"- Results are for the `{dataset_split}` split and may not carry over to other domains or text styles.",
        "- Throughput figures, when given, depend on the hardware, batch size and sequence lengths of the benchmark.",
        "",
    ]
    return "\n".join(lines)


def _hub_link(name: str) -> str:
    return f"[`{name}`](https://huggingface.co/{name})" if _is_hub_id(name) else f"`{name}`"


def _format_setting(value) -> str:
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"
