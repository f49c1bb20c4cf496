"""Teacher-logit cache: values, order, reuse, stale refusal, atomic builds and bad input."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_llama, toy_dataset, toy_lm_dataset

from hf_distill import cache_teacher_logits
from hf_distill.cache import MAX_PADDING_FRACTION, METADATA_FILE, cache_folder


def reference_logits(teacher, dataset):
    """One unpadded forward per example, in dataset order."""
    teacher.eval()
    with torch.no_grad():
        return np.stack(
            [teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0].numpy() for row in dataset]
        )


class CountingForward:
    """Wraps `teacher.forward` to count calls."""

    def __init__(self, teacher):
        self.calls = 0
        self.forward = teacher.forward
        teacher.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.forward(*args, **kwargs)


def test_logits_match_unbatched_forward_in_original_order(teacher, cache_dir):
    dataset = toy_dataset(40)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, dtype="float32", batch_size=7)
    assert cached.column_names == ["input_ids", "attention_mask", "label", "teacher_logits"]
    assert cached["label"] == dataset["label"]
    np.testing.assert_allclose(np.array(cached["teacher_logits"]), reference_logits(teacher, dataset), atol=1e-5)


def test_teacher_batches_are_length_grouped_within_the_padding_and_token_budgets(teacher, cache_dir):
    dataset = toy_dataset(300, min_length=3, max_length=40, seed=3)
    shapes = []
    hook = teacher.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["attention_mask"].sum(1).tolist()), with_kwargs=True
    )
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, dtype="float32", batch_size=64,
                                  max_batch_tokens=400)
    hook.remove()
    assert sorted(length for batch in shapes for length in batch) == sorted(map(len, dataset["input_ids"]))
    for lengths in shapes:
        padded = len(lengths) * max(lengths)
        assert len(lengths) <= 64 and (padded <= 400 or len(lengths) == 1)
        assert padded <= (1 + MAX_PADDING_FRACTION) * sum(lengths) or len(lengths) == 1
    # Batches stay large where lengths allow it (a length holds ~8 of the 300 examples), not one length each.
    assert len(shapes) < len(set(map(len, dataset["input_ids"])))
    np.testing.assert_allclose(np.array(cached["teacher_logits"]), reference_logits(teacher, dataset), atol=1e-5)


def test_float16_storage(teacher, cache_dir):
    dataset = toy_dataset(12)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    assert cached.features["teacher_logits"].feature.dtype == "float16"
    expected = reference_logits(teacher, dataset)
    np.testing.assert_allclose(np.array(cached["teacher_logits"]), expected, atol=1e-3, rtol=1e-3)


def test_bf16_teacher_pass_is_close_to_float32_and_part_of_the_fingerprint(teacher, cache_dir):
    dataset = toy_dataset(24)
    expected = reference_logits(teacher, dataset)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, dtype="float32", bf16=True)
    values = np.array(cached["teacher_logits"])
    assert not np.array_equal(values, expected)  # the pass did run in bfloat16 (8-bit mantissa)
    np.testing.assert_allclose(values, expected, atol=0.05 * np.abs(expected).max())
    # A float32 pass is another cache, beside the bf16 one: it holds float32's logits.
    full = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, dtype="float32")
    np.testing.assert_allclose(np.array(full["teacher_logits"]), expected, atol=1e-5)
    assert cache_folder(full) != cache_folder(cached)


def test_matching_cache_is_reused_without_running_the_teacher(teacher, cache_dir):
    dataset = toy_dataset(16)
    first = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    counter = CountingForward(teacher)
    second = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    assert counter.calls == 0
    assert second["teacher_logits"] == first["teacher_logits"]


def test_another_teacher_gets_a_cache_of_its_own(cache_dir):
    """A retrained teacher (a recipe run at another seed) builds its own cache; the first one stays valid."""
    dataset = toy_dataset(16)
    teacher, other_teacher = tiny_bert(48, 4, seed=1), tiny_bert(48, 4, seed=7)
    cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    other = cache_teacher_logits(other_teacher, dataset, cache_dir=cache_dir, dtype="float32")
    np.testing.assert_allclose(np.array(other["teacher_logits"]), reference_logits(other_teacher, dataset), atol=1e-5)
    counter = CountingForward(teacher)
    first = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    assert counter.calls == 0
    np.testing.assert_allclose(np.array(first["teacher_logits"]), reference_logits(teacher, dataset), atol=2e-3)
    assert len([name for name in os.listdir(cache_dir) if not name.endswith(".lock")]) == 2


def test_other_build_settings_get_a_cache_of_their_own(teacher, cache_dir):
    """Switching a setting (here the dtype; likewise k, temperature, bf16, the sparse target) and back finds each
    build's cache again, rather than refusing or replacing the other."""
    dataset = toy_dataset(16)
    half = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    full = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, dtype="float32")
    np.testing.assert_allclose(np.array(full["teacher_logits"]), reference_logits(teacher, dataset), atol=1e-5)
    assert cache_folder(half) != cache_folder(full)
    counter = CountingForward(teacher)
    again = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    assert counter.calls == 0 and again["teacher_logits"] == half["teacher_logits"]


def test_stale_tokenizer_is_refused_with_the_differences(teacher, cache_dir, tokenizer, tmp_path):
    dataset = toy_dataset(8)
    cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, tokenizer=tokenizer)
    tokenizer.add_tokens(["brandnewtoken"])
    with pytest.raises(ValueError, match=r"(?s)tokenizer_digest: cached '\w+', now '\w+'.*Delete that folder"):
        cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, tokenizer=tokenizer)
    rebuilt = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, tokenizer=tokenizer, overwrite=True)
    np.testing.assert_allclose(np.array(rebuilt["teacher_logits"]), reference_logits(teacher, dataset), atol=2e-3)


def test_interrupted_build_leaves_nothing_that_reads_as_valid(teacher, cache_dir):
    dataset = toy_dataset(30)
    counter = CountingForward(teacher)

    def fail_on_third_batch(*args, **kwargs):
        counter.calls += 1
        if counter.calls == 3:
            raise KeyboardInterrupt
        return counter.forward(*args, **kwargs)

    teacher.forward = fail_on_third_batch
    with pytest.raises(KeyboardInterrupt):
        cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, batch_size=8)
    assert not os.path.exists(cache_dir) or [name for name in os.listdir(cache_dir) if not name.endswith(".lock")] == []

    teacher.forward = counter.forward
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, batch_size=8, dtype="float32")
    np.testing.assert_allclose(np.array(cached["teacher_logits"]), reference_logits(teacher, dataset), atol=1e-5)


def test_interrupted_write_is_cleaned_up(teacher, cache_dir, monkeypatch):
    dataset = toy_dataset(8)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("datasets.arrow_writer.ArrowWriter.write_table", fail)
    with pytest.raises(OSError, match="disk full"):
        cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    assert [name for name in os.listdir(cache_dir) if not name.endswith(".lock")] == []  # the lock file stays


def test_record_names_what_produced_the_cache(teacher, cache_dir, tokenizer):
    dataset = toy_dataset(8, max_length=10)
    path = cache_folder(cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, tokenizer=tokenizer))
    assert os.path.dirname(path) == cache_dir
    with open(os.path.join(path, METADATA_FILE)) as file:
        record = json.load(file)
    assert record["dataset_fingerprint"] == dataset._fingerprint
    assert record["max_length"] == max(len(ids) for ids in dataset["input_ids"])
    assert record["dtype"] == "float16"
    assert record["num_classes"] == 3
    assert record["head"] == "sequence_classification" and record["layout"] == "dense"
    assert len(record["teacher_weights_digest"]) == 64 and len(record["tokenizer_digest"]) == 64


def test_bad_input(teacher, cache_dir):
    with pytest.raises(ValueError, match="dataset is empty"):
        cache_teacher_logits(teacher, toy_dataset(4).select([]), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="no 'input_ids' column.*tokenize it"):
        cache_teacher_logits(teacher, toy_dataset(4).remove_columns("input_ids"), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="dtype='bfloat16' is not supported"):
        cache_teacher_logits(teacher, toy_dataset(4), cache_dir=cache_dir, dtype="bfloat16")
    assert not os.path.exists(cache_dir)


def test_overflowing_logits_are_refused(teacher, cache_dir):
    with torch.no_grad():
        teacher.classifier.bias.fill_(1e5)
    dataset = toy_dataset(4)
    with pytest.raises(ValueError, match="exceed float16's range.*teacher_cache_dtype='float32'"):
        cache_teacher_logits(teacher, dataset, cache_dir=cache_dir)
    assert [name for name in os.listdir(cache_dir) if not name.endswith(".lock")] == []
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, dtype="float32")
    assert np.isfinite(np.array(cached["teacher_logits"])).all()


def test_cache_key_ignores_the_tokenizers_call_state(tmp_path, tokenizer):
    """Tokenizing a dataset leaves truncation settings in the tokenizer; a process that loaded the tokenized data
    from the datasets cache never has them, and must still accept the cache."""
    teacher, dataset = tiny_bert(hidden_size=48, num_layers=4, seed=1), toy_dataset(8)
    cache_dir = str(tmp_path / "cache")
    first = cache_teacher_logits(teacher, dataset, tokenizer=tokenizer, cache_dir=cache_dir)
    tokenizer(["w5 w6 w7"], truncation=True, max_length=32)
    counting = CountingForward(teacher)
    again = cache_teacher_logits(teacher, dataset, tokenizer=tokenizer, cache_dir=cache_dir)
    assert counting.calls == 0
    assert again["teacher_logits"] == first["teacher_logits"]


@pytest.mark.parametrize("show_progress", [True, False])
def test_progress_bar_follows_show_progress(teacher, cache_dir, capsys, show_progress):
    cache_teacher_logits(teacher, toy_dataset(8), cache_dir=cache_dir, show_progress=show_progress)
    assert ("Caching teacher outputs" in capsys.readouterr().err) == show_progress


def test_top_k_ids_beyond_float16s_range_are_cached_in_float16_storage(cache_dir):
    vocabulary = 70_000  # Llama-3 and Qwen vocabularies pass float16's largest value, 65,504
    teacher = tiny_llama(num_layers=1, seed=3, vocab_size=vocabulary)
    with torch.no_grad():
        teacher.lm_head.weight[-3:] *= 50  # the most likely tokens sit at the end of the vocabulary
    dataset = toy_lm_dataset(4, vocab_size=1000)
    cached = cache_teacher_logits(teacher, dataset, cache_dir=cache_dir, dtype="float16", top_k=4)
    ids = np.concatenate([np.asarray(row).reshape(-1, 4) for row in cached["teacher_topk_ids"]])
    with torch.no_grad():
        expected = teacher(input_ids=torch.tensor(dataset[0]["input_ids"])[None]).logits[0].topk(4).indices
    np.testing.assert_array_equal(ids[: len(expected)], expected.numpy())
    assert ids.max() >= vocabulary - 3
