"""Extractive question answering (SQuAD v1.1 / v2.0): loading and checking the `squad` columns, features with
overflowing windows (`doc_stride`), and start/end logits back to answer texts, as transformers' `run_qa.py` and
`utils_qa.py` do.

Rows have the Hub `squad` columns: `id`, `context`, `question`, `answers` = `{"text": [...], "answer_start": [...]}`
(`answer_start` a character offset into `context`; no answer at all: an unanswerable question, SQuAD v2.0 only).
A context longer than `max_seq_length` is split into overlapping windows, each a feature of its own; a feature's
`start_positions` / `end_positions` point at the answer's first and last token, or at `[CLS]` (index 0) when the
answer is not wholly inside the window or the question has none.
"""

import collections
import os

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from tqdm.auto import tqdm

IGNORE_INDEX = -100
"""Start/end position of a feature without a target (transfer questions whose answers are dropped): the
distillation term only."""
SQUAD_COLUMNS = ("id", "context", "question", "answers")


def _read_split(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No file at {path!r}: pass an existing JSON lines file with the squad columns.")
    if not path.endswith((".json", ".jsonl")):
        raise ValueError(f"{path!r} is not JSON lines: give .json/.jsonl rows with the columns {list(SQUAD_COLUMNS)}.")
    return load_dataset("json", data_files=path, split="train")


def check_squad_split(dataset: Dataset, split: str, version_2_with_negative: bool, need_answers: bool = True) -> None:
    """Refuse a split without the squad columns, with answers that are not where `answer_start` says, or (SQuAD
    v1.1) with unanswerable questions. Raises a `ValueError` that names the row and says what to fix."""
    if len(dataset) == 0:
        raise ValueError(f"The {split} split has no questions.")
    needed = SQUAD_COLUMNS if need_answers else SQUAD_COLUMNS[:3]
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {split} split lacks the column(s) {missing} (it has {dataset.column_names}). Each row needs the "
            'squad columns: id, context, question, answers = {"text": [...], "answer_start": [...]}.'
        )
    if not need_answers:
        return
    for row in dataset.select_columns(["id", "context", "answers"]):
        answers = row["answers"]
        texts, starts = answers.get("text") or [], answers.get("answer_start") or []
        if len(texts) != len(starts):
            raise ValueError(
                f"Question {row['id']!r} of the {split} split has {len(texts)} answer texts but {len(starts)} "
                "answer_start offsets: give one offset per text."
            )
        if not texts and not version_2_with_negative:
            raise ValueError(
                f"Question {row['id']!r} of the {split} split has no answer. SQuAD v1.1 questions all have one; "
                "pass --version_2_with_negative true for data with unanswerable questions (SQuAD v2.0)."
            )
        for text, start in zip(texts, starts):
            found = row["context"][start : start + len(text)]
            if found != text:
                raise ValueError(
                    f"Question {row['id']!r} of the {split} split: its answer {text!r} is not at answer_start={start} "
                    f"of the context (which reads {found!r} there). answer_start is the answer's character offset "
                    "into context; fix the offset or the text."
                )


def load_question_answering_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: dict[str, str] | None = None,
    version_2_with_negative: bool = False,
) -> DatasetDict:
    """
    Load extractive-QA splits with the squad columns, checked by `check_squad_split`.

    Args:
        dataset_name: Hub dataset (`"squad"`, `"squad_v2"`) when `data_files` is not given.
        data_files: `{split: path}` of local JSON lines files with the squad columns.
        version_2_with_negative: unanswerable questions (no answer) are allowed.

    Returns:
        The splits, each with the columns `id`, `context`, `question`, `answers` (and no others).
    """
    if data_files:
        raw = DatasetDict({split: _read_split(path) for split, path in data_files.items() if path})
    elif dataset_name:
        raw = load_dataset(dataset_name, dataset_config_name)
    else:
        raise ValueError("Give either --dataset_name (e.g. squad) or --train_file and --validation_file.")
    for split, dataset in raw.items():
        check_squad_split(dataset, split, version_2_with_negative)
        raw[split] = dataset.select_columns(list(SQUAD_COLUMNS))
    return raw


def _tokenize(batch, tokenizer, max_seq_length: int, doc_stride: int):
    pad_on_right = tokenizer.padding_side == "right"
    # Leading spaces of some questions take token room for nothing and could truncate the context (run_qa.py).
    questions = [question.lstrip() for question in batch["question"]]
    first, second = (questions, batch["context"]) if pad_on_right else (batch["context"], questions)
    return tokenizer(
        first, second, truncation="only_second" if pad_on_right else "only_first", max_length=max_seq_length,
        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
    ), (1 if pad_on_right else 0)


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: answer spans need the character offsets that only fast "
            "tokenizers give. Use a checkpoint with a tokenizer.json (a fast tokenizer)."
        )


def prepare_train_features(
    dataset: Dataset, tokenizer, max_seq_length: int, doc_stride: int, labelled: bool = True
) -> Dataset:
    """
    Tokenize questions with their contexts into windows of `max_seq_length` tokens overlapping by `doc_stride`.

    Each window is a feature with `start_positions` / `end_positions`: the answer's first and last token when the
    (first) answer lies wholly inside the window's context, else `[CLS]`'s index (as `run_qa.py`: a window that
    cuts the answer, or a question without one, teaches "no answer here"). `labelled=False` gives -100 to both
    (transfer questions: the teacher's start/end logits are the only target).

    Returns:
        One row per feature: `input_ids`, `attention_mask` (, `token_type_ids`), `start_positions`, `end_positions`.
    """
    _check_fast(tokenizer)

    def prepare(batch):
        encoded, context_index = _tokenize(batch, tokenizer, max_seq_length, doc_stride)
        sample_mapping = encoded.pop("overflow_to_sample_mapping")
        offset_mapping = encoded.pop("offset_mapping")
        encoded["start_positions"], encoded["end_positions"] = [], []
        for feature, offsets in enumerate(offset_mapping):
            input_ids = encoded["input_ids"][feature]
            cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
            answers = batch["answers"][sample_mapping[feature]] if labelled else None
            start = end = cls_index
            if answers is None:
                start = end = IGNORE_INDEX
            elif answers["answer_start"]:
                start_char = answers["answer_start"][0]
                end_char = start_char + len(answers["text"][0])
                sequence_ids = encoded.sequence_ids(feature)
                context = [index for index, sequence in enumerate(sequence_ids) if sequence == context_index]
                first, last = context[0], context[-1]
                if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                    start = first
                    while start + 1 <= last and offsets[start + 1][0] <= start_char:
                        start += 1
                    end = last
                    while end - 1 >= first and offsets[end - 1][1] >= end_char:
                        end -= 1
            encoded["start_positions"].append(start)
            encoded["end_positions"].append(end)
        return encoded

    return dataset.map(prepare, batched=True, remove_columns=dataset.column_names, desc="Tokenizing questions")


def prepare_validation_features(dataset: Dataset, tokenizer, max_seq_length: int, doc_stride: int) -> Dataset:
    """
    The windows of `prepare_train_features`, for evaluation: no positions, but each feature's `example_id` (the
    question's `id`) and `offset_mapping` (`(start, end)` characters into the context per token, `None` outside
    the context), which `postprocess_qa_predictions` needs. Trainer drops both columns before the forward.
    """
    _check_fast(tokenizer)

    def prepare(batch):
        encoded, context_index = _tokenize(batch, tokenizer, max_seq_length, doc_stride)
        sample_mapping = encoded.pop("overflow_to_sample_mapping")
        encoded["example_id"] = []
        for feature in range(len(encoded["input_ids"])):
            sequence_ids = encoded.sequence_ids(feature)
            encoded["example_id"].append(batch["id"][sample_mapping[feature]])
            encoded["offset_mapping"][feature] = [
                offset if sequence_ids[index] == context_index else None
                for index, offset in enumerate(encoded["offset_mapping"][feature])
            ]
        return encoded

    return dataset.map(prepare, batched=True, remove_columns=dataset.column_names, desc="Tokenizing questions")


def postprocess_qa_predictions(
    examples: Dataset,
    features: Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """
    Answer texts from the start/end logits of every feature, as `utils_qa.postprocess_qa_predictions`.

    For each question, over all its windows: the `n_best_size` best start and end tokens of each window are paired;
    pairs outside the context, reversed, or longer than `max_answer_length` tokens are dropped; the pair of highest
    `start_logit + end_logit` over all windows wins, and its text is the context's characters between the tokens'
    offsets. SQuAD v2.0: the answer is `""` when the smallest `[CLS]` score over the windows (start + end logit at
    index 0) beats the best span's score by more than `null_score_diff_threshold`. No valid span: `"empty"` with a
    score of 0, as `utils_qa.py` answers.

    Args:
        examples: the questions (`id`, `context`).
        features: their windows from `prepare_validation_features` (`example_id`, `offset_mapping`).
        start_logits, end_logits: `(num_features, seq_len)` in the features' order; positions beyond a feature's
            length (padding) are ignored.

    Returns:
        `{question id: answer text}` in the questions' order.
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(
            f"Got start/end logits for {len(start_logits)}/{len(end_logits)} features but there are "
            f"{len(features)}: pass the predictions of exactly these features, in their order."
        )
    features_per_example = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        features_per_example[example_id].append(index)
    offset_mappings = features["offset_mapping"]
    answers = {}
    for example_id, context in tqdm(zip(examples["id"], examples["context"]), total=len(examples),
                                    desc="Answer spans", leave=False):
        null_score, candidates = None, []
        for index in features_per_example[example_id]:
            starts, ends, offsets = start_logits[index], end_logits[index], offset_mappings[index]
            feature_null = float(starts[0] + ends[0])
            null_score = feature_null if null_score is None else min(null_score, feature_null)
            best_starts = np.argsort(starts[: len(offsets)])[::-1][:n_best_size]
            best_ends = np.argsort(ends[: len(offsets)])[::-1][:n_best_size]
            for start in best_starts:
                for end in best_ends:
                    if offsets[start] is None or offsets[end] is None:
                        continue
                    if end < start or end - start + 1 > max_answer_length:
                        continue
                    candidates.append((float(starts[start] + ends[end]), offsets[start][0], offsets[end][1]))
        # No valid span: utils_qa.py answers "empty" with a score of 0 (v2.0: unless the null score beats it).
        score, first_char, last_char = max(candidates, key=lambda candidate: candidate[0]) if candidates else (
            0.0, None, None)
        text = context[first_char:last_char] if candidates else "empty"
        if version_2_with_negative and null_score - score > null_score_diff_threshold:
            text = ""
        answers[example_id] = text
    return answers
