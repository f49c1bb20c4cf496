"""Causal language modelling: text loading (Hub or local files), blocks of `block_size` tokens (transformers'
`run_clm.py` grouping), the checks to run before any work, held-out perplexity, next-token agreement with the
teacher, and greedy generations.

A block is `block_size` consecutive tokens of the concatenated, tokenized text (no padding); `labels` equal
`input_ids`, so the causal-LM head and the model's own loss shift them by one.
"""

import hashlib
import os
from itertools import chain

import torch
from datasets import DatasetDict, load_dataset

from ...cache import tokenizer_digest

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json"}


def load_text_data(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_column: str = "text",
    validation_split_percentage: int = 5,
) -> DatasetDict:
    """`{"train", "validation"}` text splits from the Hub (`dataset_name`) or local files (plain text, one line a
    row, or JSON lines with a `text_column` field); without a validation split, the last
    `validation_split_percentage`% of the train rows is held out.

    Raises:
        ValueError: for no source, an unknown file type, a missing text column or an empty split.
    """
    if dataset_name is None and train_file is None:
        raise ValueError("Give the training text: --dataset_name (a Hub dataset) or --train_file (a local file).")
    if train_file is not None:
        files = {"train": train_file, **({"validation": validation_file} if validation_file else {})}
        raw = {}
        for split, path in files.items():
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in TEXT_SUFFIXES:
                raise ValueError(
                    f"--{split}_file {path} has the suffix {suffix!r}; use plain text (.txt, .text) or JSON lines "
                    "(.json, .jsonl)."
                )
            if not os.path.isfile(path):
                raise ValueError(f"--{split}_file {path} does not exist.")
            builder = TEXT_SUFFIXES[suffix]
            # Plain text keeps each line's newline (run_clm.py's keep_linebreaks), so blocks read as the text does.
            options = {"keep_linebreaks": True} if builder == "text" else {}
            raw[split] = load_dataset(builder, data_files={split: path}, split=split, **options)
    else:
        raw = load_dataset(dataset_name, dataset_config_name)
    raw = DatasetDict(raw)
    if "validation" not in raw:
        if not 0 < validation_split_percentage < 100:
            raise ValueError("There is no validation split: give --validation_file or a validation_split_percentage "
                             "in (0, 100).")
        train = raw["train"]
        held_out = max(1, len(train) * validation_split_percentage // 100)
        raw = DatasetDict({"train": train.select(range(len(train) - held_out)),
                           "validation": train.select(range(len(train) - held_out, len(train)))})
    for split in ("train", "validation"):
        dataset = raw[split]
        if text_column not in dataset.column_names:
            raise ValueError(
                f"The {split} split has no text column {text_column!r} (columns: {dataset.column_names}); name the "
                "column holding the text with --text_column."
            )
        if len(dataset) == 0:
            raise ValueError(f"The {split} split is empty.")
    return DatasetDict({split: raw[split].select_columns([text_column]) for split in ("train", "validation")})


def model_context_length(config) -> int | None:
    """Positions the model can attend over (`max_position_embeddings`, GPT-2's `n_positions`), or None."""
    text_config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_block_size(block_size: int, configs: dict) -> None:
    """Raise when `block_size` exceeds the context of any model in `{name: config}`."""
    if block_size < 2:
        raise ValueError(f"--block_size={block_size} must be at least 2: a block predicts each next token.")
    for name, config in configs.items():
        context = model_context_length(config)
        if context is not None and block_size > context:
            raise ValueError(
                f"--block_size={block_size} exceeds the {name}'s context of {context} positions "
                f"(max_position_embeddings): use --block_size {context} or less."
            )


def check_top_k(top_k: int, vocab_size: int) -> None:
    """Raise when the cache would keep more log-probabilities per token than the vocabulary has."""
    if top_k > vocab_size:
        raise ValueError(
            f"--teacher_cache_top_k={top_k} is larger than the teacher's vocabulary of {vocab_size} tokens: use "
            f"--teacher_cache_top_k {vocab_size} or less (the full distribution)."
        )


def group_texts(raw: DatasetDict, tokenizer, text_column: str, block_size: int,
                max_blocks: dict[str, int | None] | None = None) -> DatasetDict:
    """Tokenize every split, concatenate its token ids and cut them into full `block_size` blocks (the tail that
    does not fill a block is dropped); `max_blocks` keeps the first blocks of a split.

    Returns:
        `DatasetDict` of `input_ids`, `attention_mask` (all ones) and `labels` (= `input_ids`), `(block_size,)` each.
    """

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]}

    def blocks(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // block_size * block_size
        rows = [ids[start: start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": rows, "attention_mask": [[1] * block_size for _ in rows],
                "labels": [list(row) for row in rows]}

    grouped = {}
    for split, dataset in raw.items():
        # Fingerprints from what the blocks depend on (the text, the tokenizer's content, the block size), not
        # from where the tokenizer was loaded: another teacher with the same tokenizer then finds, and is refused,
        # the same teacher cache, and every run and process names the blocks alike.
        fingerprint = hashlib.sha256(
            f"{dataset._fingerprint}|{tokenizer_digest(tokenizer)}|{text_column}|{block_size}".encode()
        ).hexdigest()[:16]
        tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names,
                                desc=f"Tokenizing {split}", new_fingerprint=f"{fingerprint}-tokens")
        # One map batch over the whole split: blocks run across line boundaries, as in the text.
        result = tokenized.map(blocks, batched=True, batch_size=len(tokenized) or 1, desc=f"Grouping {split}",
                               new_fingerprint=f"{fingerprint}-blocks")
        if len(result) == 0:
            raise ValueError(
                f"The {split} text holds fewer than --block_size={block_size} tokens: give more text or a smaller "
                "--block_size."
            )
        limit = (max_blocks or {}).get(split)
        grouped[split] = result.select(range(min(limit, len(result)))) if limit else result
    return DatasetDict(grouped)


@torch.inference_mode()
def evaluate_lm(model, dataset, batch_size: int = 8, teacher_predictions: torch.Tensor | None = None) -> dict:
    """Held-out next-token metrics of `model` over full blocks.

    Returns:
        `{"perplexity": exp(mean NLL), "loss": mean NLL, "num_tokens": predicted tokens, "predictions": argmax
        next-token ids (blocks, block_size - 1)}`, plus `"teacher_agreement"` (share of positions whose argmax
        equals `teacher_predictions`) when given.
    """
    model.eval()
    device = next(model.parameters()).device
    nll, count, predictions = 0.0, 0, []
    for start in range(0, len(dataset), batch_size):
        ids = torch.tensor(dataset[start: start + batch_size]["input_ids"], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
        count += targets.numel()
        predictions.append(logits.argmax(-1).cpu())
    predictions = torch.cat(predictions)
    loss = nll / count
    metrics = {"perplexity": float(torch.tensor(loss).exp()), "loss": loss, "num_tokens": count,
               "predictions": predictions}
    if teacher_predictions is not None:
        metrics["teacher_agreement"] = float((predictions == teacher_predictions).float().mean())
    return metrics


def generation_prompts(texts: list[str], num_prompts: int, prompt_words: int = 8) -> list[str]:
    """The first `prompt_words` words of the first `num_prompts` lines that are prose (not blank, not a
    ` = heading = ` line)."""
    prompts = []
    for text in texts:
        words = text.split()
        if len(words) < 2 * prompt_words or text.strip().startswith("="):
            continue
        prompts.append(" " + " ".join(words[:prompt_words]) if text.startswith(" ") else " ".join(words[:prompt_words]))
        if len(prompts) == num_prompts:
            break
    return prompts


@torch.inference_mode()
def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation (the new text only), one prompt at a time so no padding is involved."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


@torch.inference_mode()
def teacher_scored_continuations(model, teacher, prompts: torch.Tensor, max_new_tokens: int,
                                 batch_size: int = 8) -> dict:
    """How likely the teacher finds `model`'s greedy continuations of `prompts` `(num_prompts, prompt_length)`
    (full-length token prompts, e.g. the starts of held-out blocks): the quantity on-policy distillation raises.
    Every continuation has exactly `max_new_tokens` tokens (end-of-text is suppressed until then).

    Returns:
        `{"teacher_log_likelihood": mean log-probability a generated token has under the teacher, "num_tokens"}`.
    """
    model.eval()
    teacher.eval()
    config = model.generation_config
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    total, count = 0.0, 0
    for batch in prompts.split(batch_size):
        batch = batch.to(next(model.parameters()).device)
        generated = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        generated = generated.to(next(teacher.parameters()).device)
        logits = teacher(input_ids=generated).logits[:, batch.shape[1] - 1: -1].float()
        new_tokens = generated[:, batch.shape[1]:]
        total += logits.log_softmax(-1).gather(-1, new_tokens[..., None]).sum().item()
        count += new_tokens.numel()
    return {"teacher_log_likelihood": total / count, "num_tokens": count}
