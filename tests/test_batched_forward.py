"""engine.batched_forward: one forward over the rows of several sessions (ragged, each with its
own cache, positions and tree mask). With the packed float32 kernels every session's logits are
bit-identical to the same round forwarded alone, round after round (so greedy verification
accepts exactly the same tokens), whatever its batch-mates; stock kernels agree to rounding."""
from __future__ import annotations

import random

import pytest
import torch

from dyspec.hf_runner import HFTargetSession
from dyspec.tree import TokenTree
from dyspec.verify import verify_greedy
from engine.batched_forward import ATTENTION_NAME, Segment, forward_segments
from engine.prepack import prepack_linears
from tests.tiny_models import tiny_llama, tiny_qwen2

VOCAB = 64


def random_tree(rng: random.Random, nodes: int, vocab: int = VOCAB) -> TokenTree:
    tree = TokenTree()
    for n in range(nodes):
        tree.add(rng.randrange(-1, n) if n else -1, rng.randrange(vocab), -1.0)
    return tree


def packed(make, attention: str):
    model = make(seed=3)
    model.config._attn_implementation = attention
    prepack_linears(model, "packed")
    return model


def segment(session: HFTargetSession, tree: TokenTree) -> Segment:
    ids, mask, positions, keep = session.tree_rows(tree)
    return Segment(session.cache, ids, mask, positions, keep)


def run_rounds(model, prompts, rounds: int, seed: int, batched: bool,
               vocab: int = VOCAB) -> tuple[list[list[torch.Tensor]], list]:
    """Greedy rounds over random trees for every session; per session, each round's logits."""
    rng = random.Random(seed)
    sessions = [HFTargetSession(model, p) for p in prompts]
    logits_by_session = [[] for _ in prompts]
    for _ in range(rounds):
        trees = [random_tree(rng, rng.choice([0, 1, 3, 7, 16]), vocab) for _ in sessions]
        if batched:
            outputs = forward_segments(model, [segment(s, t) for s, t in zip(sessions, trees)])
        else:
            outputs = [s.forward_tree(t) for s, t in zip(sessions, trees)]
        for i, (session, tree, logits) in enumerate(zip(sessions, trees, outputs)):
            argmax = logits.argmax(-1).tolist()
            session.commit(tree, verify_greedy(tree, lambda node: argmax[node + 1]))
            logits_by_session[i].append(logits)
    return logits_by_session, sessions


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17]]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_rounds_equal_the_same_rounds_alone_bit_for_bit(make, attention):
    model = packed(make, attention)
    alone, alone_sessions = run_rounds(model, PROMPTS, rounds=5, seed=11, batched=False)
    together, together_sessions = run_rounds(model, PROMPTS, rounds=5, seed=11, batched=True)
    for a_rounds, b_rounds in zip(alone, together):
        for a, b in zip(a_rounds, b_rounds):
            assert torch.equal(a, b)
    for a, b in zip(alone_sessions, together_sessions):
        assert a.tokens == b.tokens and a.n_cached == b.n_cached
        for la, lb in zip(a.cache.layers, b.cache.layers):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    assert model.config._attn_implementation == attention  # restored


def test_a_sessions_logits_do_not_depend_on_its_batch_mates():
    model = packed(tiny_qwen2, "sdpa")
    rng = random.Random(5)
    tree = random_tree(rng, 9)
    results = []
    for mates in ([], [[7, 7, 7]], [[9] * 20, [2, 3]]):
        session = HFTargetSession(model, [5, 6, 7, 8])
        others = [HFTargetSession(model, m) for m in mates]
        segments = [segment(o, random_tree(rng, rng.randrange(12))) for o in others]
        segments.insert(len(segments) // 2, segment(session, tree))
        results.append(forward_segments(model, segments)[len(others) // 2])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_stock_kernels_agree_to_rounding_and_in_every_argmax():
    model = tiny_llama(seed=3)
    alone, _ = run_rounds(model, PROMPTS, rounds=3, seed=2, batched=False)
    together, _ = run_rounds(model, PROMPTS, rounds=3, seed=2, batched=True)
    for a_rounds, b_rounds in zip(alone, together):
        for a, b in zip(a_rounds, b_rounds):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_bad_segments_are_refused_and_leave_the_model_as_it_was():
    model = packed(tiny_llama, "sdpa")
    session = HFTargetSession(model, [1, 2])
    ids, mask, positions, keep = session.tree_rows(TokenTree())
    with pytest.raises(ValueError, match="keep"):
        forward_segments(model, [Segment(session.cache, ids, mask, positions, keep=len(ids) + 1)])
    with pytest.raises(ValueError, match="one row per input id"):
        forward_segments(model, [Segment(session.cache, ids + [3], mask, positions, keep=1)])
    assert forward_segments(model, []) == []
    assert model.config._attn_implementation == "sdpa" != ATTENTION_NAME
    # the session is still usable alone
    assert session.forward_tree(TokenTree()).shape == (1, VOCAB)


def test_a_forward_that_fails_inside_the_model_restores_its_attention():
    model = packed(tiny_qwen2, "eager")
    session = HFTargetSession(model, [1, 2])
    ids, mask, positions, keep = session.tree_rows(TokenTree())
    with pytest.raises(IndexError):
        forward_segments(model, [Segment(session.cache, [VOCAB + 5] * len(ids), mask, positions, keep)])
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_real_model_sessions_batched_equal_alone():
    """SmolLM2-135M (real weights, 30 layers, grouped-query attention, tied head), packed fp32:
    three sessions' rounds in one forward, bit-identical to each alone."""
    from model_store import load_model

    model, tokenizer = load_model("smollm2-135m")
    prepack_linears(model, "packed")
    prompts = [tokenizer(text).input_ids for text in ("def fibonacci(n):", "The licence grants you",
                                                     "import numpy as np\nx = np.")]
    vocab = model.config.vocab_size
    alone, _ = run_rounds(model, prompts, rounds=3, seed=4, batched=False, vocab=vocab)
    together, _ = run_rounds(model, prompts, rounds=3, seed=4, batched=True, vocab=vocab)
    assert all(torch.equal(a, b) for a_rounds, b_rounds in zip(alone, together) for a, b in zip(a_rounds, b_rounds))
