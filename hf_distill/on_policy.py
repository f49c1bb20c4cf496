"""On-policy distillation of causal LMs (GKD, Agarwal et al. 2024; TRL's `lmbda`).

With probability `args.lmbda` a training micro-batch is replaced, before the step's counts are taken, by the
student's completions of its prompts: each row becomes `prompt + completion`, right-padded, with `labels` holding
the generated tokens (-100 on prompt and padding) and the `ON_POLICY` flag, which keeps those positions for the
distillation term and turns the label term off (`Units.without_labels`). The teacher columns of such a batch are
dropped, so the online teacher scores what the student wrote.
"""

import contextlib

import datasets
import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig

from .arguments import DistillationTrainingArguments
from .heads import CausalLMHead, DistillationHead
from .heads.token import token_mask

#: Batch key of an on-policy micro-batch: `(batch,)` bool, the rows whose labels are generated tokens.
ON_POLICY = "on_policy"


def check_on_policy(args: DistillationTrainingArguments, head: DistillationHead, student: nn.Module, train_dataset,
                    tokenizer) -> None:
    """Refuse, before any work, an on-policy setting (`lmbda > 0`) that cannot run (the trainer has refused one
    without a teacher model)."""
    if args.lmbda == 0:
        return
    if not isinstance(head, CausalLMHead):
        raise ValueError(f"lmbda={args.lmbda} trains on the student's generations, which needs a causal LM head; "
                         f"this student has the '{head.name}' head. Set lmbda=0.")
    if args.uses_alignment:
        raise ValueError(f"lmbda={args.lmbda} cannot be combined with intermediate-layer losses (hidden/embedding/"
                         "attention/relation weights > 0): set those weights to 0 or lmbda=0.")
    if args.fsdp:
        raise ValueError(f"lmbda={args.lmbda} generates with the student, which is not supported under FSDP; use DDP "
                         "or DeepSpeed ZeRO-3.")
    if pad_token_id(student, tokenizer) is None:
        raise ValueError("On-policy batches are padded, but neither the tokenizer nor the student's config has a "
                         "pad or EOS token id: set tokenizer.pad_token.")
    column = args.prompt_length_column
    if isinstance(train_dataset, datasets.Dataset) and column in train_dataset.column_names:
        lengths = train_dataset[column]
        shortest, longest, source = min(lengths), max(lengths), f"column '{column}'"
        if shortest < 1:
            raise ValueError(f"The train dataset's '{column}' holds a prompt of {shortest} tokens: every prompt "
                             "needs at least one token to be completed.")
    elif args.prompt_tokens is not None:
        longest, source = args.prompt_tokens, f"prompt_tokens={args.prompt_tokens}"
    else:
        raise ValueError(f"lmbda={args.lmbda} needs each example's prompt: add a '{column}' column (prompt length in "
                         "tokens) to the train dataset, or set prompt_tokens=N to take the first N tokens of each "
                         "block.")
    config = student.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is not None and longest + args.max_new_tokens > context:
        raise ValueError(f"A prompt of {longest} tokens ({source}) plus max_new_tokens={args.max_new_tokens} exceeds "
                         f"the student's context of {context} tokens: shorten the prompts or max_new_tokens.")


def pad_token_id(student: nn.Module, tokenizer) -> int | None:
    """The pad id of generated batches: the tokenizer's, else the student's config's, else its EOS."""
    config = student.config
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                  *_as_list(getattr(config, "eos_token_id", None))):
        if value is not None:
            return int(value)
    return None


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class OnPolicyBatches:
    """Draws which micro-batches are on-policy and rebuilds them from the student's completions.

    Args:
        args: the run's settings (`lmbda`, generation settings, prompt source, `seed`).
        pad_token_id: the id that pads prompts (left, for generation) and rebuilt rows (right).
    """

    def __init__(self, args: DistillationTrainingArguments, pad_token_id: int):
        self.args, self.pad_token_id = args, pad_token_id
        #: `(global step, micro-batch index)` of every on-policy micro-batch of this run so far.
        self.batches: list[tuple[int, int]] = []

    def is_on_policy(self, step: int, index: int) -> bool:
        """The draw of micro-batch `index` of optimizer step `step`: from its own generator seeded by `args.seed`
        and the step, so every process draws the same and the global RNG (dropout, data order) is untouched."""
        return bool(np.random.default_rng([self.args.seed, step, index]).random() < self.args.lmbda)

    def __call__(self, student: nn.Module, batch: dict, step: int, index: int, label_name: str,
                 process_index: int = 0, engine: nn.Module | None = None) -> dict:
        """`batch`, or its on-policy replacement when the draw says so.

        Args:
            student: the unwrapped student (`PreTrainedModel` or PEFT model), which generates.
            batch: a collated micro-batch `{"input_ids": (batch, seq_len), "attention_mask": ..., ...}`.
            label_name: the label field of the rebuilt batch.
            process_index: seeds the sampling apart on each process.
            engine: the DeepSpeed engine under ZeRO-3, whose sharded weights are gathered for generation.
        """
        if not self.is_on_policy(step, index):
            return batch
        self.batches.append((step, index))
        prompts = self._prompts(batch)
        seed = int(np.random.SeedSequence([self.args.seed, step, index, process_index]).generate_state(1)[0])
        completions = self._complete(student, prompts, seed, engine)
        rebuilt = self._rebuild(prompts, completions, label_name)
        if self.args.sample_weight_column in batch:
            rebuilt[self.args.sample_weight_column] = batch[self.args.sample_weight_column]
        return rebuilt

    def _prompts(self, batch: dict) -> list[torch.Tensor]:
        """Each row's prompt `(length,)`: its first real tokens, as many as its prompt-length column or
        `prompt_tokens` says (the whole row when shorter)."""
        lengths = batch.get(self.args.prompt_length_column)
        if lengths is None:
            if self.args.prompt_tokens is None:
                raise ValueError(f"An on-policy batch has no '{self.args.prompt_length_column}' field and "
                                 "prompt_tokens is not set: the prompts are unknown.")
            lengths = [self.args.prompt_tokens] * batch["input_ids"].shape[0]
        else:
            lengths = lengths.tolist()
        real = token_mask(batch)
        return [row[mask][: int(length)] for row, mask, length in zip(batch["input_ids"], real, lengths)]

    def _generation_config(self, eos_token_id) -> GenerationConfig:
        args = self.args
        if args.on_policy_temperature > 0:
            # top_k=0: sample from the whole (top-p) distribution, not generate's default top 50.
            sampling = dict(do_sample=True, temperature=args.on_policy_temperature, top_p=args.on_policy_top_p,
                            top_k=0)
        else:
            sampling = dict(do_sample=False)
        return GenerationConfig(max_new_tokens=args.max_new_tokens, pad_token_id=self.pad_token_id,
                                eos_token_id=eos_token_id, **sampling)

    def _complete(self, student: nn.Module, prompts: list[torch.Tensor], seed: int, engine) -> list[torch.Tensor]:
        """Each prompt's completion `(new,)`, up to and including its first EOS, generated without gradient in eval
        mode (no dropout) under a forked RNG seeded by `seed`; the student's mode is restored afterwards."""
        device = prompts[0].device
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left-padded: every row continues from its last prompt token
            input_ids[row, width - len(prompt):] = prompt
            attention_mask[row, width - len(prompt):] = 1
        eos = _as_list(getattr(student.config, "eos_token_id", None))
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), _gathered(engine), torch.random.fork_rng(
                    devices=[device] if device.type == "cuda" else [], device_type=device.type):
                torch.default_generator.manual_seed(seed)
                if device.type == "cuda":
                    torch.cuda.manual_seed(seed)
                output = student.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=self._generation_config(eos or None))
        finally:
            student.train(was_training)
        completions = []
        for row in output[:, width:]:
            ends = torch.isin(row, torch.tensor(eos, device=row.device)).nonzero() if eos else []
            completions.append(row[: int(ends[0]) + 1] if len(ends) else row)
        return completions

    def _rebuild(self, prompts: list[torch.Tensor], completions: list[torch.Tensor], label_name: str) -> dict:
        """The training batch of `prompt + completion` rows, right-padded, labelled on the completions only."""
        width = max(len(prompt) + len(completion) for prompt, completion in zip(prompts, completions))
        device = prompts[0].device
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            end = len(prompt) + len(completion)
            input_ids[row, :end] = torch.cat([prompt, completion.to(device)])
            attention_mask[row, :end] = 1
            labels[row, len(prompt):end] = completion
        return {"input_ids": input_ids, "attention_mask": attention_mask, label_name: labels,
                ON_POLICY: torch.ones(len(prompts), dtype=torch.bool, device=device)}


def _gathered(engine):
    """Under DeepSpeed ZeRO-3, the student's weights gathered on every process for the length of generation."""
    if engine is None or getattr(engine, "zero_optimization_stage", lambda: 0)() != 3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)
