"""Student initialisation from teacher layers, on tiny random models of four architectures."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_distill.student_init import (
    find_layer_stack,
    init_student_from_teacher,
    select_teacher_layers,
)

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=37)

ARCHITECTURES = {
    "bert": (BertForSequenceClassification, BertConfig(**TINY), "bert.encoder.layer"),
    "roberta": (RobertaForSequenceClassification, RobertaConfig(**TINY), "roberta.encoder.layer"),
    "distilbert": (
        DistilBertForSequenceClassification,
        DistilBertConfig(vocab_size=99, dim=32, n_layers=6, n_heads=4, hidden_dim=37),
        "distilbert.transformer.layer",
    ),
    # embedding_size != hidden_size gives ELECTRA's extra embeddings_project, which must be copied too.
    "electra": (ElectraForSequenceClassification, ElectraConfig(embedding_size=16, **TINY), "electra.encoder.layer"),
}


def _teacher(architecture):
    model_class, config, _ = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    return model_class(config)


def _assert_student_copies_teacher(student, teacher, teacher_layers):
    stack_path, student_stack = find_layer_stack(student)
    _, teacher_stack = find_layer_stack(teacher)
    assert len(student_stack) == len(teacher_layers)
    for student_layer, teacher_layer in zip(student_stack, teacher_layers, strict=True):
        student_params = dict(student_layer.named_parameters())
        teacher_params = dict(teacher_stack[teacher_layer].named_parameters())
        assert student_params.keys() == teacher_params.keys()
        assert all(torch.equal(student_params[name], teacher_params[name]) for name in student_params)
    teacher_state = teacher.state_dict()
    outside_stack = [key for key in student.state_dict() if not key.startswith(stack_path + ".")]
    assert any("embeddings" in key for key in outside_stack)
    for key in outside_stack:
        assert torch.equal(student.state_dict()[key], teacher_state[key]), key


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_student_copies_chosen_teacher_layers_and_round_trips(architecture, tmp_path):
    teacher = _teacher(architecture)
    student = init_student_from_teacher(teacher, 3)

    assert type(student) is type(teacher)
    assert find_layer_stack(student)[0] == ARCHITECTURES[architecture][2]
    assert student.config.num_hidden_layers == 3
    assert student.config.hf_distill_init_layers == [0, 3, 5]
    assert teacher.config.num_hidden_layers == 6
    _assert_student_copies_teacher(student, teacher, [0, 3, 5])
    head_keys = [key for key in student.state_dict() if "classifier" in key]
    assert head_keys

    student.save_pretrained(tmp_path)
    reloaded = type(teacher).from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 3
    assert reloaded.config.hf_distill_init_layers == [0, 3, 5]
    _assert_student_copies_teacher(reloaded, teacher, [0, 3, 5])


@pytest.mark.parametrize(
    ("strategy", "expected"), [("first", [0, 1]), ("uniform", [0, 5]), ([4, 1], [4, 1]), ([2, 2], [2, 2])]
)
def test_strategies_choose_teacher_layers(strategy, expected):
    teacher = _teacher("bert")
    student = init_student_from_teacher(teacher, 2, layers=strategy)
    assert student.config.hf_distill_init_layers == expected
    _assert_student_copies_teacher(student, teacher, expected)


def test_full_depth_copy_reproduces_the_teacher():
    teacher = _teacher("distilbert").eval()
    student = init_student_from_teacher(teacher, 6, layers="first")
    input_ids = torch.randint(1, 99, (2, 7))
    with torch.no_grad():
        assert torch.equal(student(input_ids=input_ids).logits, teacher(input_ids=input_ids).logits)
    assert not student.training


def test_bare_automodel_and_dtype_are_supported():
    torch.manual_seed(0)
    teacher = AutoModel.from_config(BertConfig(**TINY)).to(torch.bfloat16)
    student = init_student_from_teacher(teacher, 2)
    assert find_layer_stack(student)[0] == "encoder.layer"
    assert student.dtype == torch.bfloat16
    _assert_student_copies_teacher(student, teacher, [0, 5])


@pytest.mark.parametrize(
    ("num_teacher", "num_student", "expected"),
    [(12, 6, [0, 2, 4, 7, 9, 11]), (6, 3, [0, 3, 5]), (12, 4, [0, 4, 7, 11]), (6, 1, [5]), (4, 4, [0, 1, 2, 3])],
)
def test_uniform_selection_keeps_first_and_last_layers(num_teacher, num_student, expected):
    assert select_teacher_layers(num_teacher, num_student, "uniform") == expected


@pytest.mark.parametrize(
    ("num_student", "strategy", "message"),
    [
        (0, "uniform", r"num_student_layers=0 must be between 1 and the teacher's 6 layers"),
        (7, "first", r"num_student_layers=7 must be between 1 and the teacher's 6 layers"),
        (2, "last", r"Unknown teacher-layer strategy 'last'; use 'uniform', 'first', or an explicit list"),
        (2, [0, 1, 2], r"Teacher layers \[0, 1, 2\] give 3 layers but the student has 2"),
        (2, [0, 6], r"Teacher layer 6 in \[0, 6\] is not an index in 0\.\.5 \(the teacher has 6 layers\)"),
        (2, [-1, 3], r"Teacher layer -1 in \[-1, 3\] is not an index in 0\.\.5"),
    ],
)
def test_invalid_selections_raise(num_student, strategy, message):
    with pytest.raises(ValueError, match=message):
        select_teacher_layers(6, num_student, strategy)
    with pytest.raises(ValueError, match=message):
        init_student_from_teacher(_teacher("bert"), num_student, strategy)


class _TwoStacks(nn.Module):
    def __init__(self, num_layers):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=num_layers)
        self.encoder = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        self.decoder = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))


def test_find_layer_stack_rejects_ambiguous_or_missing_stacks():
    with pytest.raises(ValueError, match=r"exactly one nn.ModuleList of config.num_hidden_layers=2 .* found encoder, "
                                         r"decoder\. .*initialise this student yourself"):
        find_layer_stack(_TwoStacks(2))
    with pytest.raises(ValueError, match=r"config.num_hidden_layers=3 transformer layers, found none"):
        find_layer_stack(_TwoStacks(3))


# ---- decoder-only causal LMs ----

def _decoder_only(name, tie):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
                 num_key_value_heads=1, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**small)), "model.layers"
    if name == "qwen2":
        # Sliding attention from layer 3 on: layer_types differ per layer and must follow the copied layers.
        config = Qwen2Config(**small, use_sliding_window=True, sliding_window=4, max_window_layers=3)
        return Qwen2ForCausalLM(config), "model.layers"
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=5, n_head=2, tie_word_embeddings=tie, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config), "transformer.h"


def _pruned_copy(teacher, stack_path, layers):
    """An independent reference: a deep copy of the teacher with only `layers` left in its stack."""
    import copy

    pruned = copy.deepcopy(teacher)
    parent = pruned.get_submodule(stack_path.rsplit(".", 1)[0])
    stack = getattr(parent, stack_path.rsplit(".", 1)[1])
    setattr(parent, stack_path.rsplit(".", 1)[1], nn.ModuleList([stack[i] for i in layers]))
    pruned.config.num_hidden_layers = len(layers)
    for index, layer in enumerate(getattr(parent, stack_path.rsplit(".", 1)[1])):
        attention = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        attention.layer_idx = index
    return pruned


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("tie", [True, False])
def test_decoder_only_student_equals_the_teacher_pruned_to_the_chosen_layers(tmp_path, name, tie):
    teacher, stack_path = _decoder_only(name, tie)
    teacher.eval()
    student = init_student_from_teacher(teacher, 2)
    assert find_layer_stack(student)[0] == stack_path
    assert student.config.hf_distill_init_layers == [0, 4]
    ids = torch.tensor([[3, 7, 11, 5, 9, 13]])
    reference = _pruned_copy(teacher, stack_path, [0, 4])
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, reference(input_ids=ids).logits)
    tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert tied == tie
    if not tie:  # an untied output layer is the teacher's, not a copy of the input embeddings
        torch.testing.assert_close(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_qwen2_student_takes_the_attention_types_of_its_copied_layers():
    teacher, _ = _decoder_only("qwen2", tie=True)
    assert teacher.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 2
    student = init_student_from_teacher(teacher, 3, [0, 1, 4])
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
