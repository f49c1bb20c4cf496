"""Shared helpers: tiny random BERT teachers and students, and tokenized toy datasets. No network, no ../shared."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

# One intra-op thread: tiny matrices gain nothing from more, and on a busy machine two threads ran them ~50x slower.
torch.set_num_threads(1)

VOCAB_SIZE = 99
NUM_LABELS = 3


def tiny_bert(hidden_size=32, num_layers=2, num_labels=NUM_LABELS, seed=0, dropout=0.0, **config_kwargs):
    """A random `BertForSequenceClassification`; dropout off by default so runs are exactly comparable."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **config_kwargs,
    )
    return BertForSequenceClassification(config)


def toy_dataset(num_examples=32, num_labels=NUM_LABELS, min_length=4, max_length=12, seed=0, with_labels=True):
    """Tokenized examples of random lengths: `input_ids`, `attention_mask` and `label`."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=num_examples)
    columns = {
        "input_ids": [[2, *rng.integers(5, VOCAB_SIZE, size=length - 2).tolist(), 3] for length in lengths],
        "attention_mask": [[1] * int(length) for length in lengths],
    }
    if with_labels:
        if num_labels == 1:
            columns["label"] = rng.uniform(0, 5, size=num_examples).tolist()
        else:
            columns["label"] = rng.integers(0, num_labels, size=num_examples).tolist()
    return Dataset.from_dict(columns)


@pytest.fixture
def teacher():
    return tiny_bert(hidden_size=48, num_layers=4, seed=1)


@pytest.fixture
def student():
    return tiny_bert(hidden_size=32, num_layers=2, seed=2)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "teacher_cache")


def tiny_tokenizer(folder, words=None):
    """A BERT WordPiece tokenizer over `[PAD] [UNK] [CLS] [SEP] [MASK]` + `words` (default `w5 … w98`, ids matching
    `toy_dataset`), saved in `folder` so that `from_pretrained(folder)` loads it."""
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(5, VOCAB_SIZE)] if words is None else list(words)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture
def tokenizer(tmp_path):
    return tiny_tokenizer(str(tmp_path))


LM_VOCAB_SIZE = 48


def tiny_llama(num_layers=2, seed=0, vocab_size=LM_VOCAB_SIZE, logit_scale=1.0):
    """A random `LlamaForCausalLM` (hidden 16); `logit_scale` sharpens its next-token distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def toy_lm_dataset(num_examples=16, min_length=4, max_length=12, seed=0, vocab_size=LM_VOCAB_SIZE, prompt_length=0):
    """Token sequences with `labels` = `input_ids`, the first `prompt_length` labels -100 (a prompt)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, vocab_size, size=int(n)).tolist() for n in rng.integers(min_length, max_length + 1,
                                                                                    size=num_examples)]
    labels = [[-100] * min(prompt_length, len(row)) + row[prompt_length:] for row in ids]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "labels": labels})


class PadCollator:
    """Right-pads `input_ids` (0), `attention_mask` (0) and `labels` (-100) to the longest row."""

    def __call__(self, features):
        width = max(len(feature["input_ids"]) for feature in features)
        return {
            name: torch.tensor([feature[name] + [pad] * (width - len(feature[name])) for feature in features])
            for name, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))
        }
