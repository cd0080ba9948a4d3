"""The lean draft forward (engine.lean_decoder): the same logits and caches as transformers'
forward for Llama and Qwen2 (q/k/v biases), through whole dyspec trees; several sessions batched in
one forward equal to each alone; the draft loader picks it, quantises and packs its stacked layers,
and leaves models it cannot run (hooks, other architectures) on their own forward."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from dyspec.hf_runner import HFDraftSession
from dyspec.tree import TokenTree
from dyspec.tree_attention import tree_attention_inputs
from engine.batched_forward import Segment, forward_segments
from engine.int8_draft import Int8DraftLinear
from engine.lean_decoder import LeanCausalLM, lean_supported
from engine.packed_linear import PackedLinear
from engine.prepack import prepack_linears
from serving.models import ModelSource, load_draft_lm
from tests.draft_trees import assert_same_trees
from tests.tiny_models import tiny_llama, tiny_qwen2

PROMPTS = [[1, 9, 22, 4], [7, 3, 3, 51, 12, 8, 30], [2], [44, 45, 46, 47, 48]]
MODELS = {"llama": lambda: tiny_llama(seed=3, num_layers=2),
          "qwen2": lambda: tiny_qwen2(seed=4, num_layers=2, num_heads=4, num_kv_heads=1)}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_dyspec_tree_and_its_cache_match_transformers(arch):
    """Same coins, same prompt: every draft distribution the tree carries and every cached key
    equal transformers' to float32 rounding, so the trees are the same tree."""
    reference = MODELS[arch]()
    assert_same_trees(LeanCausalLM(copy.deepcopy(reference)), reference, PROMPTS)


def test_sessions_forwarded_together_equal_each_alone():
    """forward_segments over three sessions' rows (different lengths and tree masks) gives each
    session the logits and cache of its forward alone, bit for bit with the packed fp32 kernels."""
    model = LeanCausalLM(tiny_qwen2(seed=5))
    prepack_linears(model, "packed")
    alone, together = [], []
    for prompt in PROMPTS[:3]:
        one, two = HFDraftSession(model, prompt), HFDraftSession(model, prompt)
        alone.append(one)
        together.append(two)
    expected = []
    for session in alone:
        ids = session.suffix
        mask, positions = tree_attention_inputs(TokenTree(), 0, len(ids), torch.float32)
        expected.append(session._forward(ids, mask, positions, keep=min(2, len(ids))))
    segments = []
    for session in together:
        ids = session.suffix
        mask, positions = tree_attention_inputs(TokenTree(), 0, len(ids), torch.float32)
        segments.append(Segment(session.cache, ids, mask, positions, min(2, len(ids))))
    got = forward_segments(model, segments)
    for mine, want, a, b in zip(got, expected, together, alone, strict=True):
        assert torch.equal(mine, want)
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_the_draft_loader_runs_it_with_packed_or_int8_stacked_layers():
    packed = load_draft_lm(ModelSource(factory="tests.service_models:draft", dtype="float32", device="cpu",
                                       kernels="packed"))
    assert isinstance(packed, LeanCausalLM)
    assert all(isinstance(layer.qkv, PackedLinear) and isinstance(layer.gate_up, PackedLinear)
               for layer in packed.layers)
    int8 = load_draft_lm(ModelSource(factory="tests.service_models:draft", dtype="int8", device="cpu",
                                     kernels="packed"))
    assert isinstance(int8, LeanCausalLM) and isinstance(int8.lm_head, Int8DraftLinear)
    assert all(isinstance(layer.qkv, Int8DraftLinear) for layer in int8.layers)
    assert next(int8.parameters()).dtype == torch.float32  # the runners' mask dtype
    hf = load_draft_lm(ModelSource(factory="tests.service_models:draft", dtype="float32", device="cpu"), forward="transformers")
    assert not isinstance(hf, LeanCausalLM)


def test_models_it_cannot_run_keep_their_own_forward():
    hooked = tiny_llama(seed=1)
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert "hooks" in lean_supported(hooked)
    assert not isinstance(load_draft_lm(ModelSource(factory="tests.service_models:slow_draft", device="cpu")),
                          LeanCausalLM)
    other = tiny_llama(seed=1)
    other.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="no lean forward for this model: model type 'gpt2'"):
        LeanCausalLM(other)


def test_bad_calls_are_refused():
    model = LeanCausalLM(tiny_llama(seed=2))

    ids = torch.tensor([[1, 2, 3]])
    mask = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match="logits_to_keep must be in"):
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(3)[None], cache=DynamicCache(),
              logits_to_keep=4)
    with pytest.raises(ValueError, match="batch 1"):
        model(input_ids=ids.repeat(2, 1), attention_mask=mask, position_ids=torch.arange(3)[None],
              cache=DynamicCache())
