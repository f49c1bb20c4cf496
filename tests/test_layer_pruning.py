"""Depth pruning by measurement: skipped layers against a student built without them, block influence against the
hidden states, and the greedy removal against a brute-force search over shallower copies."""

import numpy as np
import pytest
import torch
from conftest import PadCollator, tiny_bert, tiny_llama, toy_lm_dataset

from hf_distill.layer_pruning import (
    block_influence,
    greedy_layer_removal,
    kept_layers,
    mean_loss,
    most_influential,
    skipped_layers,
)
from hf_distill.student_init import init_student_from_teacher


def lm_batches(num_batches=2, batch_size=4, seed=0):
    """Right-padded LM batches (rows of different lengths), labels = inputs, padding -100."""
    rows = toy_lm_dataset(num_examples=num_batches * batch_size, seed=seed)
    collate = PadCollator()
    return [collate([rows[i] for i in range(start, start + batch_size)])
            for start in range(0, len(rows), batch_size)]


def sharpened_llama(num_layers, seed):
    """A random Llama whose layers differ enough in effect that the removal order is not a near tie."""
    model = tiny_llama(num_layers=num_layers, seed=seed, logit_scale=4.0).eval()
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(1 + 3 * index % 4)
    return model


def test_skipped_layers_equal_a_student_built_without_them():
    batch = lm_batches(1)[0]
    for model, skip in ((sharpened_llama(4, seed=1), [1, 2]), (tiny_bert(num_layers=3, seed=2).eval(), [0])):
        kept = [layer for layer in range(model.config.num_hidden_layers) if layer not in skip]
        shallow = init_student_from_teacher(model, len(kept), kept).eval()
        inputs = {"input_ids": batch["input_ids"].clamp(max=40), "attention_mask": batch["attention_mask"]}
        with torch.no_grad(), skipped_layers(model, skip):
            skipped = model(**inputs).logits
        torch.testing.assert_close(skipped, shallow(**inputs).logits)
        with torch.no_grad():  # the hooks are gone afterwards
            assert not torch.allclose(model(**inputs).logits, skipped)


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output_on_real_tokens():
    model, batches = sharpened_llama(3, seed=3), lm_batches(2)
    influence = block_influence(model, batches)
    plain = sharpened_llama(3, seed=3)
    plain.model.norm = torch.nn.Identity()  # hidden_states[-1] is then the last layer's own output
    similarity, count = np.zeros(3), 0
    with torch.no_grad():
        for batch in batches:
            hidden = plain(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].bool().numpy()
            for layer in range(3):
                a, b = (hidden[index].numpy()[mask].astype(np.float64) for index in (layer, layer + 1))
                similarity[layer] += (np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).sum()
            count += mask.sum()
    np.testing.assert_allclose(influence, 1 - similarity / count, rtol=1e-5, atol=1e-6)
    assert most_influential(influence, 2) == sorted(np.argsort(-np.asarray(influence))[:2].tolist())


def test_greedy_removal_matches_a_brute_force_search_over_shallower_copies():
    model, batches = sharpened_llama(5, seed=4), lm_batches(2)
    records = greedy_layer_removal(model, batches, num_layers=2, show_progress=False)
    assert records[0] == {"layer": None, "loss": pytest.approx(mean_loss(model, batches), rel=1e-6)}
    removed = []
    for record in records[1:]:  # each step: every remaining layer removed in turn from a real shallower copy
        losses = {}
        for layer in sorted(set(range(5)) - set(removed)):
            kept = kept_layers(5, [*removed, layer])
            losses[layer] = mean_loss(init_student_from_teacher(model, len(kept), kept).eval(), batches)
        best = min(losses, key=losses.get)
        assert sorted(losses.values())[1] - losses[best] > 1e-4  # not a tie: the order is meaningful
        assert (record["layer"], record["loss"]) == (best, pytest.approx(losses[best], rel=1e-5))
        assert record["tried"] == pytest.approx(losses, rel=1e-5)
        removed.append(best)
    assert len(removed) == 3 and kept_layers(5, removed) == [layer for layer in range(5) if layer not in removed]
    assert not model.training


def test_greedy_removal_refuses_a_depth_outside_the_model():
    with pytest.raises(ValueError, match="num_layers=0 must be between 1 and the model's 2 layers"):
        greedy_layer_removal(tiny_llama(2), lm_batches(1), num_layers=0, show_progress=False)



def test_greedy_removal_with_few_candidates_tries_the_cheapest_removals_of_the_round_before():
    model, batches = sharpened_llama(6, seed=5), lm_batches(2)
    exact = greedy_layer_removal(model, batches, num_layers=2, show_progress=False)
    narrow = greedy_layer_removal(model, batches, num_layers=2, show_progress=False, candidates=2)
    assert sorted(narrow[1]["tried"]) == list(range(6)) and narrow[1]["tried"] == exact[1]["tried"]
    removed, latest = [narrow[1]["layer"]], dict(narrow[1]["tried"])
    for record in narrow[2:]:
        remaining = [layer for layer in range(6) if layer not in removed]
        assert sorted(record["tried"]) == sorted(sorted(remaining, key=latest.get)[:2])
        assert record["layer"] == min(record["tried"], key=record["tried"].get)
        latest.update(record["tried"])
        removed.append(record["layer"])
    assert len(narrow) == len(exact) == 5
