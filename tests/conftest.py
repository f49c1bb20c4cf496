"""Shared helpers: tiny random BERT teachers and students, tokenized toy datasets, training arguments, reference
losses, and the GLUE recipe with its fixtures. No network, no ../shared."""

import collections
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from datasets import Dataset
from scipy.special import log_softmax, rel_entr
from transformers import BertConfig, BertForSequenceClassification

from hf_distill import DistillationTrainingArguments

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


def make_args(tmp_path, **overrides):
    """`DistillationTrainingArguments` for a short CPU run under `tmp_path`; `overrides` replace any field."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        teacher_cache_dir=str(tmp_path / "cache"),
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return DistillationTrainingArguments(**defaults)


def peaked_teacher(seed=1):
    """A random teacher whose predictions are confident and varied, so there is something to learn."""
    teacher = tiny_bert(hidden_size=48, num_layers=4, seed=seed)
    with torch.no_grad():
        teacher.classifier.weight.mul_(50.0)
    return teacher


def logits_of(model, dataset):
    """The model's logits `(num_examples, num_labels)`, one unpadded example at a time."""
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(input_ids=torch.tensor([row["input_ids"]])).logits.numpy() for row in dataset]
        )


def reference_kd(student_logits, teacher_logits, temperature):
    """T²-scaled KL(teacher_T ‖ student_T) averaged over examples, in numpy/scipy."""
    p = np.exp(log_softmax(teacher_logits / temperature, axis=-1))
    q = np.exp(log_softmax(student_logits / temperature, axis=-1))
    return float(np.mean([rel_entr(a, b).sum() for a, b in zip(p, q)]) * temperature**2)


def reference_ce(student_logits, labels):
    """Cross-entropy of integer `labels` averaged over examples, in numpy/scipy."""
    return float(-log_softmax(student_logits, axis=-1)[np.arange(len(labels)), labels].mean())


# ---- the GLUE recipe on the fixtures ----

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "glue")
"""Small GLUE-format files, one folder per task, for the recipe's tests."""
sys.path.insert(0, os.path.join(REPO, "recipes"))
import glue as recipe  # noqa: F401 (for the recipe's tests) - recipes/glue.py: recipes are scripts, not in the package


def fixture_words(count=94):
    """The `count` most common words of the fixtures' train files, for a tokenizer that covers them."""
    counter = collections.Counter()
    for task in ("sst2", "mrpc", "stsb"):
        with open(os.path.join(FIXTURES, task, "train.tsv"), encoding="utf-8") as file:
            counter.update(re.findall(r"[a-z]+", file.read().lower()))
    return [word for word, _ in counter.most_common(count)]


def save_teacher(folder, num_labels, **config_kwargs):
    """A tiny random teacher with a head for `num_labels` and a tokenizer over the fixtures' common words."""
    tiny_tokenizer(folder, fixture_words())
    teacher = tiny_bert(hidden_size=32, num_layers=4, num_labels=num_labels, seed=1, **config_kwargs)
    teacher.save_pretrained(folder)
    return folder


def recipe_args(task, teacher, output_dir, *extra):
    """Command-line arguments of a fast recipe run on the fixtures of `task`; `extra` are appended."""
    return [
        "--task_name", task,
        "--train_file", os.path.join(FIXTURES, task, "train.tsv"),
        "--validation_file", os.path.join(FIXTURES, task, "validation.tsv"),
        "--teacher_model_name_or_path", teacher,
        "--student_num_layers", "2",
        "--output_dir", output_dir,
        "--max_seq_length", "32",
        "--per_device_train_batch_size", "16",
        "--num_train_epochs", "1",
        "--teacher_num_train_epochs", "1",
        "--learning_rate", "1e-3",
        "--report_to", "none",
        "--save_strategy", "no",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--latency_batch_size", "16",
        "--teacher_cache_dir", os.path.join(output_dir + "_cache"),
        *extra,
    ]



# ---- the token-classification recipe on the NER fixtures ----

NER_FIXTURES = os.path.join(REPO, "tests", "fixtures", "ner")
"""Made-up CoNLL-style sentences (tests/fixtures/ner/generate.py): train/validation JSON lines, a CoNLL file."""
import token_classification as ner_recipe  # noqa: E402, F401 (for the recipe's tests) - recipes/token_classification.py


def ner_words():
    """The fixtures' words, lower-cased; words of 6+ letters split into `abc ##rest` so sub-tokens occur."""
    import json

    words = set()
    for name in ("train.jsonl", "validation.jsonl"):
        with open(os.path.join(NER_FIXTURES, name), encoding="utf-8") as file:
            for line in file:
                words.update(word.lower() for word in json.loads(line)["tokens"])
    pieces = set()
    for word in words:
        pieces.update([word[:3], "##" + word[3:]] if len(word) >= 6 else [word])
    return sorted(pieces)


def save_ner_teacher(folder, with_head=False, num_labels=9, id2label=None):
    """A tiny random BERT (4 layers) with a tokenizer over the fixtures' words: a base model, or with a
    token-classification head."""
    from transformers import BertForTokenClassification

    tokenizer = tiny_tokenizer(folder, ner_words())
    torch.manual_seed(1)
    config = tiny_bert(hidden_size=32, num_layers=4).config
    config.vocab_size, config.num_labels = len(tokenizer), num_labels
    if id2label:
        config.id2label, config.label2id = id2label, {name: i for i, name in id2label.items()}
    model = BertForTokenClassification(config)
    (model if with_head else model.bert).save_pretrained(folder)
    return folder


def fast_one_teacher_args(teacher, output_dir):
    """The settings of a fast one-teacher recipe run (token classification, QA): a 2-layer student, one epoch of
    each training at 1e-3, one throughput round, nothing saved or reported beyond the run's folder."""
    return [
        "--teacher_model_name_or_path", teacher,
        "--student_num_layers", "2",
        "--output_dir", output_dir,
        "--per_device_train_batch_size", "16",
        "--num_train_epochs", "1",
        "--teacher_num_train_epochs", "1",
        "--learning_rate", "1e-3",
        "--teacher_learning_rate", "1e-3",
        "--report_to", "none",
        "--save_strategy", "no",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--latency_batch_size", "16",
        "--latency_rounds", "1",
        "--teacher_cache_dir", output_dir + "_cache",
    ]


def ner_recipe_args(teacher, output_dir, *extra):
    """Command-line arguments of a fast token-classification run on the NER fixtures; `extra` are appended."""
    return [
        "--train_file", os.path.join(NER_FIXTURES, "train.jsonl"),
        "--validation_file", os.path.join(NER_FIXTURES, "validation.jsonl"),
        "--max_seq_length", "48",
        *fast_one_teacher_args(teacher, output_dir),
        *extra,
    ]

LM_VOCAB_SIZE = 48


def tiny_llama(num_layers=2, seed=0, vocab_size=LM_VOCAB_SIZE, logit_scale=1.0, hidden_size=16):
    """A random `LlamaForCausalLM`; `logit_scale` sharpens its next-token distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
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


# ---- tiny models and datasets of the other heads (token classification, QA, seq2seq, images) ----

IMAGE_SIZE = 8


def _bert_config(hidden_size, num_layers, num_labels, **config_kwargs):
    return BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        intermediate_size=2 * hidden_size, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config_kwargs,
    )


def tiny_bert_token(hidden_size=32, num_layers=2, num_labels=NUM_LABELS, seed=0):
    """A random `BertForTokenClassification`, dropout off."""
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(_bert_config(hidden_size, num_layers, num_labels))


def tiny_bert_qa(hidden_size=32, num_layers=2, seed=0):
    """A random `BertForQuestionAnswering`, dropout off."""
    from transformers import BertForQuestionAnswering

    torch.manual_seed(seed)
    return BertForQuestionAnswering(_bert_config(hidden_size, num_layers, 2))


def tiny_bart(d_model=32, num_layers=2, seed=0):
    """A random `BartForConditionalGeneration` over `VOCAB_SIZE` tokens (pad 0, bos 2, eos 3), dropout off."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB_SIZE, d_model=d_model, encoder_layers=num_layers, decoder_layers=num_layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config)


def _vit_config_kwargs(hidden_size, num_layers, num_labels):
    return dict(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, intermediate_size=2 * hidden_size, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_vit(hidden_size=32, num_layers=2, num_labels=NUM_LABELS, seed=0):
    """A random `ViTForImageClassification` on 3x8x8 images (4 patches), dropout off."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**_vit_config_kwargs(hidden_size, num_layers, num_labels)))


def tiny_deit_with_teacher(hidden_size=32, num_layers=2, num_labels=NUM_LABELS, seed=0):
    """A random `DeiTForImageClassificationWithTeacher` on 3x8x8 images, dropout off."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**_vit_config_kwargs(hidden_size, num_layers, num_labels)))
    # transformers initialises both tokens and the position embeddings to zeros: the two tokens then start identical
    # and the first layer norm sees a constant vector (first-step gradient norms ~1e4). Pretrained weights differ.
    with torch.no_grad():
        for parameter in (model.deit.embeddings.cls_token, model.deit.embeddings.distillation_token,
                          model.deit.embeddings.position_embeddings):
            parameter.normal_(std=0.02)
    return model


def _random_lengths(rng, num_examples, min_length, max_length):
    return rng.integers(min_length, max_length + 1, size=num_examples)


def token_dataset(num_examples=32, num_labels=NUM_LABELS, min_length=4, max_length=12, seed=0):
    """Tokenized examples with per-token `labels`: -100 on the special tokens and on a random fifth of the words,
    and every fourth example wholly unlabelled (all -100)."""
    rng = np.random.default_rng(seed)
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    for index, length in enumerate(_random_lengths(rng, num_examples, min_length, max_length)):
        words = length - 2
        labels = rng.integers(0, num_labels, size=words)
        labels[rng.random(words) < 0.2] = -100
        if index % 4 == 3:
            labels[:] = -100
        columns["input_ids"].append([2, *rng.integers(5, VOCAB_SIZE, size=words).tolist(), 3])
        columns["attention_mask"].append([1] * int(length))
        columns["labels"].append([-100, *labels.tolist(), -100])
    return Dataset.from_dict(columns)


def qa_dataset(num_examples=32, min_length=6, max_length=14, seed=0):
    """Tokenized examples with an answer span `start_positions <= end_positions` inside each sequence."""
    rng = np.random.default_rng(seed)
    columns = {"input_ids": [], "attention_mask": [], "start_positions": [], "end_positions": []}
    for length in _random_lengths(rng, num_examples, min_length, max_length):
        start = int(rng.integers(1, length - 1))
        columns["input_ids"].append([2, *rng.integers(5, VOCAB_SIZE, size=length - 2).tolist(), 3])
        columns["attention_mask"].append([1] * int(length))
        columns["start_positions"].append(start)
        columns["end_positions"].append(int(rng.integers(start, length - 1)))
    return Dataset.from_dict(columns)


def seq2seq_dataset(num_examples=32, min_length=4, max_length=10, seed=0, with_labels=True):
    """Source `input_ids` and target `labels` (ending in eos 3) of random, different lengths."""
    rng = np.random.default_rng(seed)
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    for source_length, target_length in zip(
        _random_lengths(rng, num_examples, min_length, max_length),
        _random_lengths(rng, num_examples, min_length - 1, max_length - 2),
    ):
        columns["input_ids"].append([*rng.integers(5, VOCAB_SIZE, size=source_length - 1).tolist(), 3])
        columns["attention_mask"].append([1] * int(source_length))
        columns["labels"].append([*rng.integers(5, VOCAB_SIZE, size=target_length - 1).tolist(), 3])
    if not with_labels:
        del columns["labels"]
    return Dataset.from_dict(columns)


def image_dataset(num_examples=32, num_labels=NUM_LABELS, seed=0, unlabelled_every=4):
    """Random 3x8x8 `pixel_values` and integer `labels`, every `unlabelled_every`-th example labelled -100."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, size=num_examples)
    if unlabelled_every:
        labels[unlabelled_every - 1 :: unlabelled_every] = -100
    pixels = rng.standard_normal((num_examples, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()})


def reference_kl_rows(student_logits, teacher_logits, temperature):
    """KL(softmax(teacher / T) || softmax(student / T)) * T² per row of `(rows, classes)` numpy logits, by scipy."""
    from scipy.special import log_softmax, rel_entr

    p = np.exp(log_softmax(np.asarray(teacher_logits, dtype=np.float64) / temperature, axis=-1))
    q = np.exp(log_softmax(np.asarray(student_logits, dtype=np.float64) / temperature, axis=-1))
    return rel_entr(p, q).sum(axis=-1) * temperature**2


def reference_ce_rows(logits, targets):
    """Cross-entropy per row of `(rows, classes)` numpy logits against integer `targets` `(rows,)`."""
    from scipy.special import log_softmax

    log_probs = log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    return -log_probs[np.arange(len(targets)), np.asarray(targets)]


def train_logs(trainer, keys=("loss", "grad_norm", "loss_kd", "loss_ce")):
    """`(steps, len(keys))` of the training logs of `trainer.train()`, one row per logged step."""
    return np.array([[log[key] for key in keys] for log in trainer.state.log_history if "loss" in log])


def cached_and_online_logs(tmp_path, new_trainer, teacher, dataset, cached):
    """`train_logs` of one student trained on the `cached` teacher outputs, then on `dataset` with `teacher`
    online. `new_trainer(output_dir, teacher=..., train=..., use_teacher_cache=...)` builds a fresh student."""
    logs = []
    for name, train, online_teacher in (("cached", cached, None), ("online", dataset, teacher)):
        trainer = new_trainer(tmp_path / name, teacher=online_teacher, train=train, use_teacher_cache=False)
        trainer.train()
        logs.append(train_logs(trainer))
    return logs


def full_and_accumulated_logs(tmp_path, new_trainer, dataset):
    """`train_logs` of one student trained on batches of 8, then on batches of 4 accumulated over 2 micro-batches."""
    logs = []
    for name, batch_size, accumulation in (("full", 8, 1), ("accumulated", 4, 2)):
        trainer = new_trainer(tmp_path / name, train=dataset, per_device_train_batch_size=batch_size,
                              gradient_accumulation_steps=accumulation)
        trainer.train()
        logs.append(train_logs(trainer))
    return logs


# ---- the causal-LM recipe on the text fixtures ----

LM_FIXTURES = os.path.join(REPO, "tests", "fixtures", "lm")
"""Short sentences in the WikiText layout (`make_text.py` wrote them): train.txt, validation.txt/.jsonl."""
import causal_lm as lm_recipe  # noqa: E402,F401 (for the recipe's tests) - recipes/causal_lm.py


def lm_fixture_tokenizer(folder):
    """A word-level fast tokenizer over the fixtures' words (`<pad>`, `<s>`, `</s>`, `<unk>` first), saved in
    `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for name in ("train.txt", "validation.txt"):
        with open(os.path.join(LM_FIXTURES, name), encoding="utf-8") as file:
            words.update(file.read().split())
    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_lm_teacher(folder, architecture="llama", num_layers=4, vocab_padding=0, context=64, seed=3):
    """A tiny random causal LM (Llama with tied embeddings, or GPT-2) over the fixture tokenizer, saved in
    `folder`; `vocab_padding` adds embedding rows that no token uses."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = lm_fixture_tokenizer(folder)
    vocab_size = len(tokenizer) + vocab_padding
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=num_layers, n_head=4,
                                           n_positions=context, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(folder)
    return folder


def lm_recipe_args(teacher, output_dir, *extra, train_file="train.txt", validation_file="validation.txt"):
    """Command-line arguments of a fast causal-LM recipe run on the text fixtures; `extra` are appended."""
    return [
        "--teacher_model_name_or_path", teacher,
        "--train_file", os.path.join(LM_FIXTURES, train_file),
        "--validation_file", os.path.join(LM_FIXTURES, validation_file),
        "--student_num_layers", "2",
        "--block_size", "32",
        "--max_train_blocks", "48",
        "--teacher_cache_top_k", "8",
        "--output_dir", output_dir,
        "--per_device_train_batch_size", "8",
        "--max_steps", "4",
        "--learning_rate", "1e-3",
        "--report_to", "none",
        "--save_strategy", "no",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--latency_batch_size", "8",
        "--latency_rounds", "1",
        "--latency_max_blocks", "8",
        "--num_sample_generations", "2",
        "--sample_max_new_tokens", "4",
        "--scored_prompts", "3",
        "--scored_prompt_tokens", "8",
        "--scored_new_tokens", "4",
        "--teacher_cache_dir", output_dir + "_cache",
        *extra,
    ]


# ---- multi-process runs ----


def accelerate_launch(script, args, num_processes=2, timeout=1200):
    """`(exit code, log)` of `accelerate launch` running `script` with `args` in `num_processes` CPU processes
    over gloo (`ACCELERATE_USE_CPU=true` with `--multi_gpu` gives `MULTI_CPU`), one thread each, importing this
    checkout's hf_distill. A launch still running after `timeout` seconds (a hung rank) is killed."""
    import contextlib
    import subprocess

    import psutil

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        # Port 0: the launcher binds a free port itself, which no other job can take first.
        "--main_process_port", "0", script, *args,
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
        "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: the launcher's process group does not hold them.
        for member in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        log, _ = process.communicate()
        log += f"\n[accelerate_launch] killed after {timeout} s: a rank hung"
    return process.returncode, log


# ---- the question-answering recipe on the QA fixtures ----

QA_FIXTURES = os.path.join(REPO, "tests", "fixtures", "qa")
"""Made-up paragraphs and questions in the squad columns (tests/fixtures/qa/generate.py)."""
import question_answering as qa_recipe  # noqa: E402, F401 (for the recipe's tests) - recipes/question_answering.py


def qa_words():
    """The fixtures' words and punctuation, lower-cased as BERT's basic tokenizer splits them; words of 7+ letters
    split into `abcd ##rest` so that answers may start or end inside a word's pieces."""
    import json
    import re

    words = set()
    for name in ("train.jsonl", "validation_v2.jsonl"):
        with open(os.path.join(QA_FIXTURES, name), encoding="utf-8") as file:
            for line in file:
                row = json.loads(line)
                words.update(re.findall(r"\w+|[^\w\s]", (row["context"] + " " + row["question"]).lower()))
    pieces = set()
    for word in words:
        pieces.update([word[:4], "##" + word[4:]] if len(word) >= 7 else [word])
    return sorted(pieces)


def save_qa_teacher(folder, with_head=False, seed=1):
    """A tiny random BERT (4 layers, 64 positions) with a tokenizer over the fixtures' words: a base model, or with a
    question-answering head."""
    from transformers import BertForQuestionAnswering

    tokenizer = tiny_tokenizer(folder, qa_words())
    torch.manual_seed(seed)
    config = tiny_bert(hidden_size=32, num_layers=4).config
    config.vocab_size, config.num_labels = len(tokenizer), 2
    model = BertForQuestionAnswering(config)
    (model if with_head else model.bert).save_pretrained(folder)
    return folder


def qa_recipe_args(teacher, output_dir, *extra, validation_file="validation.jsonl"):
    """Command-line arguments of a fast question-answering run on the QA fixtures; `extra` are appended."""
    return [
        "--train_file", os.path.join(QA_FIXTURES, "train.jsonl"),
        "--validation_file", os.path.join(QA_FIXTURES, validation_file),
        "--max_seq_length", "40",
        "--doc_stride", "12",
        "--max_answer_length", "12",
        *fast_one_teacher_args(teacher, output_dir),
        *extra,
    ]
