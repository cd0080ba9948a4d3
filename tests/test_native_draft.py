"""The native draft forward (engine.native_draft, engine/kernels/draft_layers.c): a 4-bit lean draft's
decoder layers for up to MAX_ROWS rows in one C call, on growable static KV caches.

Checked: its logits against the lean forward's on the same 4-bit weights (trees, chains, GQA and
Qwen2's q/k/v biases), and bit for bit against itself one row at a time (each row is computed alone);
whole speculative generations (serial and overlapped rounds, caches that grow past their first
buffers) give the target's greedy output; the cache's growth; the lean fallbacks and the refusals;
what `load_draft_lm` picks."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from dyspec.generate import generate
from engine import native_draft
from engine.int4_draft import quantize_int4
from engine.lean_decoder import LeanCausalLM
from engine.native_draft import MAX_ROWS, NativeDraftRunner, native_unsupported, use_native_draft
from engine.static_cache import StaticKVCache
from serving.cpu import runs_int4_kernel
from serving.models import ModelSource, load_draft_lm
from tests.draft_trees import build_tree
from tests.service_models import grid_target
from tests.tiny_models import greedy_reference, tiny_llama, tiny_qwen2

pytestmark = pytest.mark.skipif(not runs_int4_kernel(), reason="the 4-bit kernel needs AVX2 + FMA + F16C")

PROMPT = [3, 17, 42, 5, 9, 11, 2, 60, 33, 8, 21, 14]  # longer than MAX_ROWS: its forward is the lean one


def _int4_lean(model) -> LeanCausalLM:
    return quantize_int4(LeanCausalLM(copy.deepcopy(model)))


def _native(model, initial_tokens: int | None = None) -> LeanCausalLM:
    lean = _int4_lean(model)
    runner = use_native_draft(lean)
    if initial_tokens is not None:
        lean.use_static_cache(initial_tokens, runner, growable=True)
    return lean


def _additive(visible: torch.Tensor) -> torch.Tensor:
    """The [1, 1, rows, keys] additive mask of a boolean one."""
    return torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)[None, None]


def _forward(model, cache, ids: list[int], visible: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Logits of `ids` appended to `cache`; visible: [rows, cached + rows] bool."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), attention_mask=_additive(visible),
                     position_ids=torch.tensor([positions]), cache=cache, use_cache=True,
                     logits_to_keep=len(ids)).logits[0]


def _causal(cached: int, rows: int) -> torch.Tensor:
    visible = torch.ones(rows, cached + rows, dtype=torch.bool)
    visible[:, cached:] = torch.ones(rows, rows, dtype=torch.bool).tril()
    return visible


def _tree(cached: int, parents: list[int]) -> torch.Tensor:
    """Rows = tree nodes (parent -1: below the cached prefix), each seeing the prefix and its ancestors."""
    visible = torch.zeros(len(parents), cached + len(parents), dtype=torch.bool)
    visible[:, :cached] = True
    for node, parent in enumerate(parents):
        visible[node, cached + node] = True
        while parent >= 0:
            visible[node, cached + parent] = True
            parent = parents[parent]
    return visible


def _depths(parents: list[int]) -> list[int]:
    depths = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


@pytest.mark.parametrize("make", [lambda: tiny_llama(seed=5, hidden_size=64), lambda: tiny_qwen2(seed=6, hidden_size=64),
                                  lambda: tiny_qwen2(seed=7, hidden_size=64, num_heads=4, num_kv_heads=1)])
def test_logits_match_the_lean_forward_on_the_same_4bit_weights(make):
    model = make()
    lean, native = _int4_lean(model), _native(model)
    lean_cache, native_cache = DynamicCache(), native.new_cache()
    assert isinstance(native_cache, StaticKVCache)
    prompt_positions = list(range(len(PROMPT)))
    for cache, m in ((lean_cache, lean), (native_cache, native)):
        _forward(m, cache, PROMPT, _causal(0, len(PROMPT)), prompt_positions)
    forwards_before = native.static_runner.native_forwards
    cached = len(PROMPT)
    parents = [-1, -1, 0, 0, 2, 1, 4, 3]  # a tree of 8 nodes: siblings, depths 1-4
    cases = [([-1], [5]), ([-1, 0], [7, 1]), (parents[:4], [1, 2, 3, 4]), (parents, [9, 8, 7, 6, 5, 4, 3, 2])]
    for tree_parents, ids in cases:
        visible = _tree(cached, tree_parents)
        positions = [cached - 1 + d for d in _depths(tree_parents)]
        want = _forward(lean, lean_cache, ids, visible, positions)
        got = _forward(native, native_cache, ids, visible, positions)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        for mine, theirs in zip(native_cache.layers, lean_cache.layers, strict=True):  # the rows written
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-4)
        lean_cache.crop(-len(ids))
        native_cache.crop(-len(ids))
    assert native.static_runner.native_forwards - forwards_before == len(cases)


def test_each_row_is_computed_as_it_would_be_alone():
    """A chain of MAX_ROWS rows in one forward gives, bit for bit, the rows of MAX_ROWS one-row forwards."""
    native = _native(tiny_qwen2(seed=8, hidden_size=64))
    cache = native.new_cache()
    _forward(native, cache, PROMPT, _causal(0, len(PROMPT)), list(range(len(PROMPT))))
    cached, ids = len(PROMPT), [4, 8, 15, 16, 23, 42, 7, 1][:MAX_ROWS]
    together = _forward(native, cache, ids, _causal(cached, len(ids)), list(range(cached, cached + len(ids))))
    cache.crop(-len(ids))
    alone = torch.cat([_forward(native, cache, [token], _causal(cached + i, 1), [cached + i])
                       for i, token in enumerate(ids)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_native_draft_keeps_the_targets_greedy_output_as_its_caches_grow(overlap):
    """Commits, checkpoints and restores (overlapped rounds) edit the growable buffers; the first
    buffers hold 8 tokens, so every session moves its cache several times."""
    target = grid_target(seed=2)
    draft = _native(target, initial_tokens=8)
    prompt = [3, 17, 42, 5, 9]
    result = generate(target, draft, prompt, max_new_tokens=40, method="dyspec", budget=8, temperature=0.0,
                      overlap=overlap)
    assert result.tokens == greedy_reference(target, prompt, 40)
    assert result.tokens_per_step > 1.5  # the draft is the target on int4's grid: trees get accepted
    assert draft.static_runner.native_forwards > 10


def test_a_growable_cache_keeps_its_contents_and_a_fixed_one_refuses():
    grown = StaticKVCache(num_layers=2, kv_heads=2, head_dim=4, max_tokens=4, dtype=torch.float32, device="cpu",
                          growable=True)
    first = torch.randn(1, 2, 3, 4)
    grown.update(first, first + 1, 0)
    grown.update(first, first + 1, 1)
    more = torch.randn(1, 2, 3, 4)
    keys, values = grown.update(more, more + 1, 0)  # 6 > 4 positions: buffers of 8
    assert grown.max_tokens == 8 and grown.resizes == 1
    assert torch.equal(keys, torch.cat([first, more], dim=2)) and torch.equal(values, keys + 1)
    assert torch.equal(grown.layers[1].keys, first)  # the other layer moved with its contents
    grown.reserve(20)
    assert grown.max_tokens == 20 and grown.layers[0].key_buffer.shape[2] == 20
    fixed = StaticKVCache(num_layers=1, kv_heads=2, head_dim=4, max_tokens=4, dtype=torch.float32, device="cpu")
    fixed.update(first, first, 0)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        fixed.update(more, more, 0)


def test_wider_forwards_and_split_kernels_run_the_lean_forward():
    native = _native(tiny_llama(seed=9, hidden_size=64))
    runner = native.static_runner
    cache = native.new_cache()
    _forward(native, cache, PROMPT, _causal(0, len(PROMPT)), list(range(len(PROMPT))))
    assert (runner.lean_forwards, runner.native_forwards) == (1, 0)
    from engine.kernel_threads import using

    with using(2):
        _forward(native, cache, [1], _causal(len(PROMPT), 1), [len(PROMPT)])
    assert (runner.lean_forwards, runner.native_forwards) == (2, 0)
    _forward(native, cache, [2], _causal(len(PROMPT) + 1, 1), [len(PROMPT) + 1])
    assert (runner.lean_forwards, runner.native_forwards) == (2, 1)
    with pytest.raises(ValueError, match="the mask covers"):
        _forward(native, cache, [3], _causal(len(PROMPT), 1), [len(PROMPT)])  # a mask one key short


def test_drafts_that_are_not_4bit_keep_the_lean_forward():
    model = tiny_llama(seed=10, hidden_size=64)
    lean = LeanCausalLM(copy.deepcopy(model))
    assert "not 4-bit" in native_unsupported(lean)
    with pytest.raises(ValueError, match="no native draft forward for this model: qkv is Linear"):
        NativeDraftRunner(lean)
    assert native_unsupported(_int4_lean(model)) is None


def test_load_draft_lm_runs_a_4bit_draft_natively_by_default_and_the_lean_forward_when_asked():
    source = ModelSource(factory="tests.service_models:draft", dtype="int4", device="cpu")
    default = load_draft_lm(source)
    assert isinstance(default.static_runner, native_draft.NativeDraftRunner) and default.static_growable
    lean = load_draft_lm(source, forward="lean")
    assert isinstance(lean, LeanCausalLM) and lean.static_runner is None
    float_draft = load_draft_lm(ModelSource(factory="tests.service_models:draft", dtype="float32", device="cpu"))
    assert isinstance(float_draft, LeanCausalLM) and float_draft.static_runner is None  # not 4-bit: lean
    with pytest.raises(ValueError, match="unknown draft forward 'fast'"):
        load_draft_lm(source, forward="fast")


def test_sessions_batched_by_the_draft_worker_run_in_one_native_call_as_each_would_alone():
    """engine.batched_forward (the draft batcher's forward of several sessions): their rows go through
    one native call, each session's rows written to its own growing buffers and computed bit for bit
    as in its own forward; past MAX_ROWS rows in all, the lean forward takes the batch."""
    from engine.batched_forward import Segment, forward_segments

    native = _native(tiny_qwen2(seed=12, hidden_size=64), initial_tokens=8)
    runner = native.static_runner
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:9]]
    batched, alone = [native.new_cache() for _ in prompts], [native.new_cache() for _ in prompts]
    for prompt, a, b in zip(prompts, batched, alone):
        for cache in (a, b):
            _forward(native, cache, prompt, _causal(0, len(prompt)), list(range(len(prompt))))

    def segments(rows: int) -> list:
        ids = list(range(7, 7 + rows))
        return [Segment(cache, ids, _additive(_causal(cache.get_seq_length(), rows)),
                        torch.arange(cache.get_seq_length(), cache.get_seq_length() + rows)[None], rows)
                for cache in batched]

    for rows, native_calls in ((2, 1), (3, 0)):  # 3 sessions x 2 rows: native; x 3 rows = 9 > MAX_ROWS: lean
        before = runner.native_forwards
        got = forward_segments(native, segments(rows))
        assert runner.native_forwards - before == native_calls
        for cache, logits in zip(alone, got):
            cached = cache.get_seq_length()
            want = _forward(native, cache, list(range(7, 7 + rows)), _causal(cached, rows), list(range(cached, cached + rows)))
            if native_calls:
                assert torch.equal(logits, want)
            else:
                torch.testing.assert_close(logits, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
        for mine, theirs in zip(batched, alone):
            assert mine.get_seq_length() == theirs.get_seq_length()
            for a, b in zip(mine.layers, theirs.layers, strict=True):
                torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)
    assert all(cache.resizes > 0 for cache in batched)  # 8-token first buffers: every session moved
