"""Sequence-level distillation as a data step (Kim & Rush 2016; TRL's `seq_kd`): the teacher continues prompts
taken from the training blocks, and its texts join the training data, learned with the token-level loss.

Each generated example is one block: the first `prompt_tokens` ids of a training block (labels -100) followed by
the teacher's `block_size - prompt_tokens` new tokens (end-of-sequence suppressed, so every example is a full
block). Generations are stored as a dataset in a folder named by the SHA-256 of everything that produced them
(teacher weights and config, tokenizer, the blocks' fingerprint, the generation settings), written atomically,
and reused by any later run with the same inputs; other inputs get another folder.
"""

import hashlib
import json
import os

import torch
from accelerate import PartialState
from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets.config import HF_DATASETS_CACHE
from tqdm.auto import tqdm

from ...cache import tokenizer_digest, weights_digest, write_folder_atomically

GENERATIONS_FORMAT_VERSION = 1


def generations_record(teacher, tokenizer, blocks: Dataset, **settings) -> dict:
    """What a set of teacher generations depends on."""
    return {
        "format_version": GENERATIONS_FORMAT_VERSION,
        "teacher_config_digest": hashlib.sha256(teacher.config.to_json_string(use_diff=False).encode()).hexdigest(),
        "teacher_weights_digest": weights_digest(teacher),
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "blocks_fingerprint": blocks._fingerprint,
        **settings,
    }


@torch.inference_mode()
def generate_continuations(teacher, prompts: torch.Tensor, new_tokens: int, do_sample: bool, temperature: float,
                           seed: int, batch_size: int = 16, show_progress: bool = True) -> torch.Tensor:
    """The teacher's continuations `(num_prompts, new_tokens)` of equal-length `prompts` `(num_prompts, length)`."""
    teacher.eval()
    device = next(teacher.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    outputs = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="Teacher generations", disable=not show_progress):
            batch = prompts[start: start + batch_size].to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {
                "do_sample": False}
            generated = teacher.generate(
                batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=teacher.config.eos_token_id if teacher.config.pad_token_id is None
                else teacher.config.pad_token_id, **sampling,
            )
            outputs.append(generated[:, batch.shape[1]:].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(outputs)


def with_teacher_generations(teacher, tokenizer, blocks: Dataset, *, prompt_tokens: int, max_prompts: int | None,
                             do_sample: bool, temperature: float, seed: int, cache_dir: str | None = None,
                             overwrite: bool = False, show_progress: bool = True) -> Dataset:
    """`blocks` followed by one teacher-written block per prompt (the first `max_prompts` blocks, or all).

    Raises:
        ValueError: when `prompt_tokens` leaves no room for a continuation in a block.
    """
    block_size = len(blocks[0]["input_ids"])
    if not 1 <= prompt_tokens < block_size:
        raise ValueError(
            f"--generation_prompt_tokens={prompt_tokens} must be in 1..{block_size - 1}: the teacher writes the rest "
            f"of each {block_size}-token block."
        )
    num_prompts = len(blocks) if max_prompts is None else min(max_prompts, len(blocks))
    settings = dict(prompt_tokens=prompt_tokens, num_prompts=num_prompts, block_size=block_size, do_sample=do_sample,
                    temperature=temperature if do_sample else None, seed=seed if do_sample else None)
    record = generations_record(teacher, tokenizer, blocks, **settings)
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir or os.path.join(HF_DATASETS_CACHE, "hf_distill")
    path = os.path.join(root, f"teacher_generations-{key}")
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and (overwrite or not os.path.exists(os.path.join(path, "record.json"))):
            prompts = torch.tensor(blocks.select(range(num_prompts))["input_ids"])[:, :prompt_tokens]
            continuations = generate_continuations(teacher, prompts, block_size - prompt_tokens, do_sample,
                                                   temperature, seed, show_progress=show_progress)
            ids = torch.cat([prompts, continuations], dim=1).tolist()
            labels = [[-100] * prompt_tokens + row[prompt_tokens:] for row in ids]
            generated = Dataset.from_dict(
                {"input_ids": ids, "attention_mask": [[1] * block_size for _ in ids], "labels": labels},
                features=blocks.features,
            )
            with write_folder_atomically(path) as tmp_path:
                generated.save_to_disk(os.path.join(tmp_path, "data"))
                with open(os.path.join(tmp_path, "record.json"), "w") as file:
                    json.dump(record, file, indent=2)
    generated = load_from_disk(os.path.join(path, "data"))
    return concatenate_datasets([blocks, generated.cast(blocks.features)])
