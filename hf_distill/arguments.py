"""`DistillationTrainingArguments`: `TrainingArguments` plus the knobs of knowledge distillation."""

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from .losses import SPARSE_TARGETS, TEACHER_ENSEMBLES, TOPK_TAILS

DISTILLATION_LOSSES = ("auto", "kl", "reverse_kl", "jsd", "mse")
CACHE_DTYPES = ("float16", "float32")
# Classes a top-k teacher target keeps per token (cached, or online with online_top_k).
DEFAULT_TOP_K = 256
# Alignment-loss weight fields, each a term `loss_<name without _loss_weight>` in the logs.
ALIGNMENT_WEIGHTS = (
    "hidden_loss_weight",
    "embedding_loss_weight",
    "hidden_cosine_loss_weight",
    "attention_loss_weight",
    "attention_relation_loss_weight",
    "value_relation_loss_weight",
)


# repr=False keeps TrainingArguments' __repr__, which masks the Hub token; a generated one would print it.
@dataclass(repr=False)
class DistillationTrainingArguments(TrainingArguments):
    r"""
    Arguments for [`DistillationTrainer`]. Every [`~transformers.TrainingArguments`] field is accepted as well.

    The training loss is `logits_loss_weight * (alpha * loss_kd + (1 - alpha) * loss_ce)` plus the weighted
    alignment terms `sum_i weight_i * loss_i` of the layers paired by `layer_map`.

    Parameters that control the distillation loss:
        temperature (`float`, defaults to `2.0`):
            Temperature T that softens the teacher's distribution. Must be > 0.
        student_temperature (`float` or `None`, defaults to `None`):
            Temperature T_s applied to the student's logits; `None` uses `temperature`.
        alpha (`float`, defaults to `0.9`):
            Weight of the distillation term in [0, 1]; the label loss gets `1 - alpha`. Why 0.9: see
            `benchmarks/README.md`.
        distillation_loss (`str`, defaults to `"auto"`):
            `"kl"`: forward KL(teacher || student) on softened distributions, times `T * T_s` (T² when equal);
            `"reverse_kl"`: KL(student || teacher); `"jsd"`: generalized Jensen-Shannon with `jsd_beta` (TRL's
            GKD); `"mse"`: mean squared error between raw logits; `"auto"`: `"mse"` for regression heads
            (`num_labels == 1`), `"kl"` otherwise.
        jsd_beta (`float`, defaults to `0.5`):
            β of `"jsd"` in [0, 1]: 0 is forward KL, 1 reverse KL.
        distillation_head (`str` or `None`, defaults to `None`):
            Which outputs carry the teacher's distribution (`hf_distill.heads`): `None` chooses from the student's
            class; or one of `sequence_classification`, `token_classification`, `question_answering`,
            `causal_lm`, `seq2seq_lm`, `image_classification`, `deit_with_teacher`.
        logits_loss_weight (`float`, defaults to `1.0`):
            Weight of the whole prediction-layer term; `0` trains on the alignment losses only (TinyBERT's
            intermediate stage).

    Parameters that control on-policy distillation (causal LMs; GKD, Agarwal et al. 2024, as TRL's `lmbda`):
        lmbda (`float`, defaults to `0.0`):
            Probability in [0, 1] that a training micro-batch is trained on the student's own completions of its
            prompts instead of the dataset's continuations: the online teacher scores prompt + completion and the
            divergence counts the generated tokens only (the label term is off on those batches). The draw is
            seeded by `seed` and the step, the same on every process. `0` trains on the dataset only.
        max_new_tokens (`int`, defaults to `128`):
            Most tokens the student generates per prompt (a completion also ends at its first EOS).
        on_policy_temperature (`float`, defaults to `1.0`):
            Sampling temperature of the completions; `0` decodes greedily.
        on_policy_top_p (`float`, defaults to `1.0`):
            Nucleus sampling in (0, 1]; `1` samples from the whole distribution.
        prompt_length_column (`str`, defaults to `"prompt_length"`):
            Optional dataset column: how many leading tokens of each example's `input_ids` form its prompt.
        prompt_tokens (`int` or `None`, defaults to `None`):
            For plain text without that column: the first `prompt_tokens` tokens of each training block are its
            prompt.

    Parameters that control several teachers (`teacher_model` a list or a dict):
        teacher_weights (`list[float]` or `None`, defaults to `None`):
            One weight per teacher, in the order given; `None` weighs them equally.
        teacher_ensemble (`str`, defaults to `"mean_probs"`):
            The target: `"mean_probs"`, the weighted mean of the teachers' temperature-softened distributions, or
            `"mean_logits"`, the weighted mean of their logits (TextBrewer's choice; sharper).

    Parameters that control intermediate-layer alignment (the teacher then runs online; 0 turns a loss off):
        hidden_loss_weight (`float`, defaults to `0.0`):
            MSE between the hidden states of the layers paired by `layer_map` (TinyBERT). When the widths differ the
            student's states go through a learned linear projection, trained with the student and never exported.
        embedding_loss_weight (`float`, defaults to `0.0`):
            MSE between the embedding outputs (hidden state 0), through a projection when the widths differ.
        hidden_cosine_loss_weight (`float`, defaults to `0.0`):
            1 - cosine similarity of the paired hidden states (DistilBERT), through the projection when needed.
        attention_loss_weight (`float`, defaults to `0.0`):
            MSE between the paired layers' attention probabilities (TinyBERT). Needs equal head counts, or
            compares head-averaged maps when they differ. Switches both models to eager attention.
        attention_relation_loss_weight (`float`, defaults to `0.0`):
            MiniLM attention-distribution transfer: KL(teacher || student) between the paired layers' attention
            rows (any head counts). Switches both models to eager attention.
        value_relation_loss_weight (`float`, defaults to `0.0`):
            MiniLM value-relation transfer: KL between the token-token relations softmax(V Vᵀ / sqrt(d)) of the
            paired layers' attention values, split into `relation_heads` heads (any widths).
        relation_heads (`int` or `None`, defaults to `None`):
            Heads of the value relation; `None` uses the student's `num_attention_heads`. Must divide both widths.
        layer_map (`str` or `dict`, defaults to `"uniform"`):
            Student layer → teacher layer, 1-based: `"uniform"` (TinyBERT: student layer i ↔ teacher layer i·k),
            `"last"`, or `{student_layer: teacher_layer}` from Python, JSON or the command line
            (`--layer_map '{"1": 2, "2": 4}'`).

    Parameters that control the teacher's logits:
        teacher_logits_column (`str`, defaults to `"teacher_logits"`):
            Dataset column holding the teacher's logits, shape `(num_labels,)` per example.
        sample_weight_column (`str`, defaults to `"sample_weight"`):
            Optional dataset column of per-example loss weights; ignored when absent.
        use_teacher_cache (`bool`, defaults to `True`):
            When a `teacher_model` is given and a dataset lacks `teacher_logits_column`, compute the teacher's
            logits once and store them with the dataset instead of running the teacher every step.
        teacher_cache_dir (`str` or `None`, defaults to `None`):
            Folder of the logit caches. `None` uses `$HF_DATASETS_CACHE/hf_distill`.
        teacher_cache_dtype (`str`, defaults to `"float16"`):
            Storage dtype of cached logits: `"float16"` or `"float32"`.
        teacher_cache_batch_size (`int`, defaults to `256`):
            Most examples per forward of the teacher pass that builds the cache.
        teacher_cache_max_tokens (`int` or `None`, defaults to `None`):
            Optional budget of padded tokens per forward of that pass (examples of similar length are batched
            up to it).
        teacher_cache_bf16 (`bool`, defaults to `False`):
            Run the teacher's cache pass under bfloat16 autocast: about 2x faster on CPUs with AVX512-BF16 or AMX
            (and on GPUs), at logits further from float32 than float16 storage (on the SST-2 teacher: 0.018 at
            most, probabilities at T = 2 within 0.004).
        teacher_cache_top_k (`int`, defaults to `256`):
            Vocabulary-sized outputs (causal and seq2seq LMs) cache the teacher's top-k log-probabilities per token:
            1,540 bytes a token, 0.8 % of dense float32 logits over a 49,152 vocabulary. On SmolLM2 the student
            came closer to the full-distribution target as k grew (benchmarks/README.md).
        online_top_k (`bool`, defaults to `False`):
            With the teacher online on vocabulary-sized outputs, distil on the top-k target a cache would hold
            (`teacher_cache_top_k`, `topk_tail`) instead of the teacher's full distribution: online and cached runs
            train on the same loss, and the loss costs a few full-vocabulary passes less (benchmarks/README.md).
        fused_vocabulary_loss (`bool`, defaults to `True`):
            Vocabulary-sized outputs (causal and seq2seq LMs): compute the loss from the last hidden states and
            the output layer, a chunk of rows at a time, so the `(tokens, vocabulary)` logits of the student and
            of an online teacher never exist (`hf_distill.fused_vocabulary`). Same values as the unfused loss; an
            output layer that is not recognised, FSDP / DeepSpeed ZeRO (sharded output layers) and evaluation
            with `compute_metrics` (which needs the logits) use the unfused loss.
        sparse_target (`str`, defaults to `"top_k"`):
            Which `teacher_cache_top_k` classes per token a vocabulary-sized target keeps (cached, or online with
            `online_top_k`): `"top_k"`, the most likely ones and the probability of the rest; `"sampled"`, the
            classes of that many draws from the teacher's distribution, each at its share of the draws (Random-
            Sampling KD, Anshumann et al. 2025): unbiased where top-k never shows the student the teacher's tail;
            `"top_k_and_sampled"`, the k/2 most likely exactly and k/2 draws from the rest (unbiased, less
            variance). Forward KL (`distillation_loss` `"kl"` or `"auto"`) with `topk_tail="rest"` only. Cached
            draws are the same whatever `seed` (one cache serves every training seed); online ones are fresh
            every step.
        topk_tail (`str`, defaults to `"rest"`):
            How a top-k target treats the probability outside the k classes: `"rest"` compares (k+1)-bucket
            distributions (exact when k covers the vocabulary), `"renormalise"` compares both distributions
            renormalised over the k classes.
        overwrite_teacher_cache (`bool`, defaults to `False`):
            Rebuild a cache that other inputs (another tokenizer or teacher config under the same weights)
            produced instead of refusing it. Other build settings (dtype, k, temperature, bf16) are caches of
            their own and need no rebuild.
    """

    # Parameters that control the distillation loss
    temperature: float = field(
        default=2.0, metadata={"help": "Temperature that softens the teacher's distribution (> 0)."}
    )
    student_temperature: float | None = field(
        default=None, metadata={"help": "Temperature of the student's logits; defaults to `temperature`."}
    )
    alpha: float = field(
        default=0.9,
        metadata={"help": "Weight of the distillation term in [0, 1]; the label loss gets 1 - alpha."},
    )
    distillation_loss: str = field(
        default="auto",
        metadata={
            "help": "Distillation loss on logits: 'kl' (T²-scaled KL), 'mse', or 'auto' (mse for regression heads).",
            "choices": list(DISTILLATION_LOSSES),
        },
    )

    jsd_beta: float = field(
        default=0.5, metadata={"help": "Beta of the generalized JSD in [0, 1]: 0 forward KL, 1 reverse KL."}
    )
    distillation_head: str | None = field(
        default=None,
        metadata={"help": "Which outputs carry the teacher's distribution; default: chosen from the student's class."},
    )

    # Parameters that control on-policy distillation
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Probability in [0, 1] that a micro-batch trains on the student's own completions (GKD)."},
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Most tokens the student generates per prompt on on-policy batches."}
    )
    on_policy_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of on-policy completions; 0 decodes greedily."}
    )
    on_policy_top_p: float = field(default=1.0, metadata={"help": "Nucleus (top-p) of on-policy sampling."})
    prompt_length_column: str = field(
        default="prompt_length",
        metadata={"help": "Optional dataset column: the number of leading tokens of each example that are its prompt."},
    )
    prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "Without that column: the first prompt_tokens tokens of each block are its prompt."},
    )

    teacher_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per teacher (several teachers); default: equal weights."}
    )
    teacher_ensemble: str = field(
        default="mean_probs",
        metadata={"help": "Target of several teachers: 'mean_probs' or 'mean_logits'.",
                  "choices": list(TEACHER_ENSEMBLES)},
    )

    logits_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the prediction-layer term (KD + CE); 0 trains on alignment losses only."},
    )

    # Parameters that control intermediate-layer alignment
    hidden_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state MSE of the layers paired by layer_map."}
    )
    embedding_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the embedding-output MSE."})
    hidden_cosine_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state cosine loss (DistilBERT)."}
    )
    attention_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the attention-probability MSE (TinyBERT); uses eager attention."}
    )
    attention_relation_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the MiniLM attention-distribution KL; uses eager attention."}
    )
    value_relation_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the MiniLM value-relation KL."}
    )
    relation_heads: int | None = field(
        default=None, metadata={"help": "Heads of the value relation (default: the student's attention heads)."}
    )
    layer_map: dict | str | None = field(
        default="uniform",
        metadata={"help": "Student layer -> teacher layer (1-based): 'uniform', 'last' or a JSON dict."},
    )

    # Parameters that control the teacher's logits
    teacher_logits_column: str = field(
        default="teacher_logits", metadata={"help": "Dataset column holding the teacher's logits."}
    )
    sample_weight_column: str = field(
        default="sample_weight", metadata={"help": "Optional dataset column of per-example loss weights."}
    )
    use_teacher_cache: bool = field(
        default=True,
        metadata={"help": "Compute the teacher's logits once and store them with the dataset."},
    )
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder of the teacher-logit caches (default: $HF_DATASETS_CACHE/hf_distill)."}
    )
    teacher_cache_dtype: str = field(
        default="float16",
        metadata={"help": "Storage dtype of cached teacher logits.", "choices": list(CACHE_DTYPES)},
    )
    teacher_cache_batch_size: int = field(
        default=256, metadata={"help": "Batch size of the teacher pass that builds the cache."}
    )
    teacher_cache_max_tokens: int | None = field(
        default=None, metadata={"help": "Optional budget of padded tokens per forward of the cache-building pass."}
    )
    teacher_cache_bf16: bool = field(
        default=False, metadata={"help": "Run the cache-building teacher pass under bfloat16 autocast."}
    )
    teacher_cache_top_k: int = field(
        default=DEFAULT_TOP_K,
        metadata={"help": "Top-k log-probabilities cached per token for vocabulary-sized outputs."},
    )
    online_top_k: bool = field(
        default=False,
        metadata={"help": "Online teacher on vocabulary-sized outputs: distil on its top-k target, as a cache would."},
    )
    fused_vocabulary_loss: bool = field(
        default=True,
        metadata={"help": "Vocabulary-sized outputs: compute the loss from hidden states and the output layer in "
                          "chunks, never holding the (tokens, vocabulary) logits of student or online teacher."},
    )
    sparse_target: str = field(
        default="top_k",
        metadata={"help": "Classes a vocabulary-sized target keeps: the 'top_k' most likely, 'sampled' draws, or "
                          "'top_k_and_sampled' (half each).",
                  "choices": list(SPARSE_TARGETS)},
    )
    topk_tail: str = field(
        default="rest",
        metadata={"help": "Probability outside a top-k target: 'rest' bucket or 'renormalise'.",
                  "choices": list(TOPK_TAILS)},
    )
    overwrite_teacher_cache: bool = field(
        default=False,
        metadata={"help": "Rebuild a teacher-logit cache that other inputs produced instead of refusing it."},
    )

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "layer_map"]

    def __post_init__(self):
        _check_layer_map_json(self.layer_map)  # TrainingArguments parses it, with a bare JSONDecodeError
        super().__post_init__()
        if self.student_temperature is None:
            self.student_temperature = self.temperature
        for name in ("temperature", "student_temperature"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name, value, "> 0 and finite")
        _check(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "in [0, 1]")
        _check(self.distillation_loss in DISTILLATION_LOSSES, "distillation_loss", self.distillation_loss,
               f"one of {DISTILLATION_LOSSES}")
        _check(self.teacher_cache_dtype in CACHE_DTYPES, "teacher_cache_dtype", self.teacher_cache_dtype,
               f"one of {CACHE_DTYPES}")
        for name in ("logits_loss_weight", *ALIGNMENT_WEIGHTS):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _check(self.relation_heads is None or self.relation_heads >= 1, "relation_heads", self.relation_heads,
               ">= 1 or None")
        _check(self.layer_map is not None, "layer_map", self.layer_map, "'uniform', 'last' or a dict")
        _check(self.teacher_cache_batch_size >= 1, "teacher_cache_batch_size", self.teacher_cache_batch_size, ">= 1")
        _check(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", self.jsd_beta, "in [0, 1]")
        _check(self.teacher_cache_top_k >= 1, "teacher_cache_top_k", self.teacher_cache_top_k, ">= 1")
        _check(self.teacher_cache_max_tokens is None or self.teacher_cache_max_tokens >= 1,
               "teacher_cache_max_tokens", self.teacher_cache_max_tokens, ">= 1 or None")
        _check(self.topk_tail in TOPK_TAILS, "topk_tail", self.topk_tail, f"one of {TOPK_TAILS}")
        _check(self.sparse_target in SPARSE_TARGETS, "sparse_target", self.sparse_target, f"one of {SPARSE_TARGETS}")
        forward_kl_with_rest = self.distillation_loss in ("auto", "kl") and self.topk_tail == "rest"
        if self.sparse_target != "top_k" and not forward_kl_with_rest:
            raise ValueError(
                f"sparse_target={self.sparse_target!r} estimates the forward KL over the student's whole vocabulary; "
                f"distillation_loss={self.distillation_loss!r} with topk_tail={self.topk_tail!r} would compare the "
                "student with a distribution that is 0 outside the draws. Use distillation_loss='kl' and "
                "topk_tail='rest', or sparse_target='top_k'."
            )
        _check(0.0 <= self.lmbda <= 1.0, "lmbda", self.lmbda, "in [0, 1]")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        _check(math.isfinite(self.on_policy_temperature) and self.on_policy_temperature >= 0,
               "on_policy_temperature", self.on_policy_temperature, ">= 0 and finite")
        _check(0.0 < self.on_policy_top_p <= 1.0, "on_policy_top_p", self.on_policy_top_p, "in (0, 1]")
        _check(self.prompt_tokens is None or self.prompt_tokens >= 1, "prompt_tokens", self.prompt_tokens,
               ">= 1 or None")
        _check(self.teacher_ensemble in TEACHER_ENSEMBLES, "teacher_ensemble", self.teacher_ensemble,
               f"one of {TEACHER_ENSEMBLES}")
        weights = self.teacher_weights or []
        _check(all(math.isfinite(weight) and weight >= 0 for weight in weights) and (not weights or sum(weights) > 0),
               "teacher_weights", self.teacher_weights, "finite, >= 0 and not all 0")

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments) -> "DistillationTrainingArguments":
        """`args` with the distillation defaults added (a plain `TrainingArguments` given to the trainer)."""
        values = {}
        for training_field in dataclasses.fields(TrainingArguments):
            if not training_field.init:
                continue
            value = getattr(args, training_field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, list) and value and isinstance(value[0], enum.Enum):
                value = [item.value for item in value]
            values[training_field.name] = value
        return cls(**values)

    def __getstate__(self) -> dict:
        """The pickled state, without tokens: Trainer pickles the arguments into `training_args.bin` in every
        checkpoint and saved model, which `push_to_hub` uploads. The live object keeps its `hub_token` (so does a
        `dataclasses.replace` copy; a `copy.deepcopy` one does not)."""
        return {name: None if name.endswith("_token") else value for name, value in self.__dict__.items()}

    def intermediate_stage(self, num_train_epochs: float) -> "DistillationTrainingArguments":
        """TinyBERT's first stage: these arguments on the alignment losses only, for `num_train_epochs`.

        Uses this run's alignment weights, or `hidden_loss_weight=1, attention_loss_weight=1` (TinyBERT's
        transformer-layer distillation) when none is set.
        """
        weights = {name: getattr(self, name) for name in ALIGNMENT_WEIGHTS}
        if not any(weights.values()):
            weights.update(hidden_loss_weight=1.0, attention_loss_weight=1.0)
        return dataclasses.replace(self, logits_loss_weight=0.0, num_train_epochs=num_train_epochs, **weights)

    def prediction_stage(self) -> "DistillationTrainingArguments":
        """TinyBERT's second stage: these arguments on the logit losses only (the teacher's cache can serve)."""
        return dataclasses.replace(
            self, logits_loss_weight=1.0, **{name: 0.0 for name in ALIGNMENT_WEIGHTS}
        )

    def teacher_cache_kwargs(self) -> dict:
        """The keyword arguments of [`~hf_distill.cache_teacher_logits`] these arguments set."""
        return dict(
            cache_dir=self.teacher_cache_dir, dtype=self.teacher_cache_dtype, batch_size=self.teacher_cache_batch_size,
            max_batch_tokens=self.teacher_cache_max_tokens, overwrite=self.overwrite_teacher_cache,
            show_progress=not self.disable_tqdm, top_k=self.teacher_cache_top_k, temperature=self.temperature,
            bf16=self.teacher_cache_bf16, sparse_target=self.sparse_target,
        )

    @property
    def uses_alignment(self) -> bool:
        """Whether any intermediate-layer loss is on (the teacher then runs online)."""
        return any(getattr(self, name) > 0 for name in ALIGNMENT_WEIGHTS)


def _check_layer_map_json(layer_map) -> None:
    if isinstance(layer_map, str) and layer_map.startswith("{"):
        try:
            json.loads(layer_map)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"DistillationTrainingArguments.layer_map={layer_map!r} is not valid JSON ({error}): give a JSON "
                """dict of 1-based layers with quoted keys, e.g. '{"1": 2, "2": 4}', or 'uniform' or 'last'."""
            ) from None


def _check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"DistillationTrainingArguments.{name}={value!r} is invalid: it must be {allowed}.")
