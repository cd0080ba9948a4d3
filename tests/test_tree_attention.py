"""Tree attention: one masked forward over a token tree equals decoding each root->node path alone.

Covers the pure mask / position builder (hand-written tree), the raw model call with
`tree_attention_inputs` (empty and pre-filled caches), `HFTargetSession.forward_tree` across
several commit rounds (the KV cache keeps only the accepted path), and `HFDraftSession`, whose
nodes are forwarded incrementally over several `logits` calls per round. The oracle everywhere is
a plain causal forward over the full token sequence (no cache, default mask and positions).
fp32 on CPU: max abs difference <= 1e-5.
"""
from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from dyspec.hf_runner import HFDraftSession, HFTargetSession
from dyspec.tree import ROOT, TokenTree
from dyspec.tree_attention import ancestor_matrix, tree_attention_inputs
from dyspec.verify import Verdict
from tests.tiny_models import sequential_logits, tiny_llama, tiny_qwen2

ATOL = 1e-5
VOCAB = 64
MIN32 = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------- helpers


def _tree(parents: list[int], tokens: list[int]) -> TokenTree:
    tree = TokenTree()
    for par, tok in zip(parents, tokens):
        tree.add(par, tok, 0.0)
    return tree


def chain_parents(n: int) -> list[int]:
    return [i - 1 for i in range(n)]  # node 0 hangs off the root


def star_parents(n: int) -> list[int]:
    return [ROOT] * n


def random_parents(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(-1, i) for i in range(n)]


SHAPES = {
    "chain": lambda n, rng: chain_parents(n),
    "star": lambda n, rng: star_parents(n),
    "random": random_parents,
}


def random_tree(shape: str, n: int, seed: int) -> TokenTree:
    rng = random.Random(seed)
    return _tree(SHAPES[shape](n, rng), [rng.randrange(VOCAB) for _ in range(n)])


def expected_rows(model, committed: list[int], tree: TokenTree) -> torch.Tensor:
    """[1 + n, V]: sequential logits after `committed` (row 0) and after committed + path(i)."""
    rows = [sequential_logits(model, committed)[-1]]
    for node in range(len(tree)):
        rows.append(sequential_logits(model, committed + tree.path_tokens(node))[-1])
    return torch.stack(rows)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def path_to(tree: TokenTree, node: int) -> list[int]:
    """Node indices from the root's child down to `node` (empty for ROOT)."""
    out = []
    while node != ROOT:
        out.append(node)
        node = tree.parents[node]
    return out[::-1]


def make_model(kind: str, seed: int = 0):
    return (tiny_llama if kind == "llama" else tiny_qwen2)(seed=seed, vocab_size=VOCAB, hidden_size=32, num_layers=2)


# ----------------------------------------------------------------------------- pure mask / positions


def test_ancestor_matrix_hand_written_tree():
    #        root
    #       /    \
    #      0      1
    #     / \      \
    #    2   3      4
    #    |
    #    5
    parents = [ROOT, ROOT, 0, 0, 1, 2]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(ancestor_matrix(parents), expected)
    assert ancestor_matrix([]).shape == (0, 0)


def test_tree_attention_inputs_hand_written_tree():
    tree = _tree([ROOT, ROOT, 0, 0, 1, 2], [7, 8, 9, 10, 11, 12])
    assert tree.depths == [1, 1, 2, 2, 2, 3]
    n_cached, n_suffix = 3, 2  # cache holds 3 tokens; suffix = [s0, root]
    mask, pos = tree_attention_inputs(tree, n_cached, n_suffix)
    assert mask.shape == (1, 1, 8, 11) and mask.dtype == torch.float32
    assert pos.shape == (1, 8) and pos.dtype == torch.long
    # suffix at positions 3, 4; a node of depth d at 3 + 2 - 1 + d
    assert pos[0].tolist() == [3, 4, 5, 5, 6, 6, 6, 7]
    # key columns: c0 c1 c2 | s0 root | n0 n1 n2 n3 n4 n5
    visible = [
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # s0: cache + itself
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # root
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # n0
        [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0],  # n1
        [1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0],  # n2 (parent n0)
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0],  # n3 (parent n0)
        [1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0],  # n4 (parent n1)
        [1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1],  # n5 (parent n2, grandparent n0)
    ]
    want = torch.where(torch.tensor(visible, dtype=torch.bool), 0.0, MIN32)
    assert torch.equal(mask[0, 0], want)
    # additive float mask in the requested dtype, with that dtype's minimum
    mask64, _ = tree_attention_inputs(tree, n_cached, n_suffix, dtype=torch.float64)
    assert mask64.dtype == torch.float64 and float(mask64.min()) == torch.finfo(torch.float64).min


def test_tree_attention_inputs_empty_tree_is_causal():
    mask, pos = tree_attention_inputs(TokenTree(), n_cached=2, n_suffix=3)
    assert pos[0].tolist() == [2, 3, 4]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    want = torch.cat([torch.ones(3, 2, dtype=torch.bool), causal], 1)
    assert torch.equal(mask[0, 0] == 0, want)


# ----------------------------------------------------------------------------- raw model call


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
@pytest.mark.parametrize("prefix_len,n_cached", [(5, 0), (40, 0), (40, 37)])
def test_direct_tree_forward_matches_sequential(kind, shape, prefix_len, n_cached):
    """Model called directly with tree_attention_inputs, with an empty or a pre-filled cache."""
    model = make_model(kind)
    rng = random.Random(prefix_len * 7 + n_cached)
    prefix = [rng.randrange(VOCAB) for _ in range(prefix_len)]
    tree = random_tree(shape, 12, seed=prefix_len + n_cached)
    cache = DynamicCache()
    with torch.inference_mode():
        if n_cached:
            model(input_ids=torch.tensor([prefix[:n_cached]]), cache=cache, use_cache=True)
        suffix = prefix[n_cached:]
        mask, pos = tree_attention_inputs(tree, n_cached, len(suffix))
        logits = model(input_ids=torch.tensor([suffix + tree.tokens]), attention_mask=mask,
                       position_ids=pos, cache=cache, use_cache=True).logits[0].float()
    # rows of the suffix are plain causal decoding; rows from the root on are the tree's
    seq = sequential_logits(model, prefix)
    assert max_diff(logits[:len(suffix)], seq[n_cached:]) <= ATOL
    got = logits[len(suffix) - 1:]
    assert max_diff(got, expected_rows(model, prefix, tree)) <= ATOL


# ----------------------------------------------------------------------------- target session


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
@pytest.mark.parametrize("prefix_len", [5, 40])
def test_target_forward_tree_matches_sequential(kind, shape, prefix_len):
    model = make_model(kind, seed=1)
    rng = random.Random(prefix_len)
    prompt = [rng.randrange(VOCAB) for _ in range(prefix_len)]
    tree = random_tree(shape, 10, seed=prefix_len + 1)
    session = HFTargetSession(model, prompt)
    logits = session.forward_tree(tree)
    assert logits.shape == (1 + len(tree), VOCAB) and logits.dtype == torch.float32
    assert max_diff(logits, expected_rows(model, prompt, tree)) <= ATOL


def test_target_forward_empty_tree_is_plain_decoding():
    model = make_model("llama")
    session = HFTargetSession(model, [1, 2, 3, 4])
    logits = session.forward_tree(TokenTree())
    assert logits.shape == (1, VOCAB)
    assert max_diff(logits[0], sequential_logits(model, [1, 2, 3, 4])[-1]) <= ATOL


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("prefix_len", [5, 40])
def test_target_rounds_with_commits_match_sequential(kind, prefix_len):
    """Several rounds of forward_tree + commit: the cache keeps exactly the accepted path, so each
    next tree's logits equal a fresh sequential decode of the committed sequence + path."""
    model = make_model(kind, seed=2)
    rng = random.Random(100 + prefix_len)
    prompt = [rng.randrange(VOCAB) for _ in range(prefix_len)]
    session = HFTargetSession(model, prompt)
    committed = list(prompt)
    # (shape, size, which node to accept up to: "deepest", "none", "random", "first")
    plan = [("random", 9, "deepest"), ("star", 5, "none"), ("chain", 6, "deepest"),
            ("random", 12, "random"), ("chain", 4, "first"), ("random", 7, "random"), ("star", 3, "first")]
    for round_no, (shape, size, pick) in enumerate(plan):
        tree = random_tree(shape, size, seed=1000 * prefix_len + round_no)
        logits = session.forward_tree(tree)
        assert max_diff(logits, expected_rows(model, committed, tree)) <= ATOL, f"round {round_no}"
        if pick == "none":
            accepted = []
        elif pick == "first":
            accepted = [0]
        elif pick == "deepest":
            accepted = path_to(tree, max(range(size), key=lambda i: (tree.depths[i], -i)))
        else:
            accepted = path_to(tree, rng.randrange(size))
        next_token = rng.randrange(VOCAB)
        verdict = Verdict(accepted, next_token, [tree.tokens[a] for a in accepted] + [next_token])
        session.commit(tree, verdict)
        committed += verdict.tokens
        assert session.tokens == committed
        # the next token's KV is computed by the next round: cache = committed minus one token
        assert session.n_cached == len(committed) - 1
        assert session.cache.get_seq_length() == session.n_cached
    final = session.forward_tree(TokenTree())
    assert max_diff(final[0], sequential_logits(model, committed)[-1]) <= ATOL


# ----------------------------------------------------------------------------- draft session


def _grow_incrementally(session: HFDraftSession, model, committed: list[int], tree_plan, batches) -> TokenTree:
    """Grow a tree the way a builder does: root first, then nodes in batches; check every row.

    tree_plan: list of (parent, token) for all nodes, in creation order.
    batches: list of lists of node indices; a node's parent is forwarded in an earlier batch
             (or earlier in the same batch)."""
    tree = TokenTree()
    root_row = session.logits(tree, [ROOT])
    assert root_row.shape == (1, VOCAB)
    assert max_diff(root_row[0], sequential_logits(model, committed)[-1]) <= ATOL
    for batch in batches:
        while len(tree) <= max(batch):  # nodes exist before they are requested
            par, tok = tree_plan[len(tree)]
            tree.add(par, tok, 0.0)
        rows = session.logits(tree, batch)
        assert rows.shape == (len(batch), VOCAB)
        for row, node in zip(rows, batch):
            want = sequential_logits(model, committed + tree.path_tokens(node))[-1]
            assert max_diff(row, want) <= ATOL, f"node {node}"
    while len(tree) < len(tree_plan):  # leaves added but never forwarded by the draft
        par, tok = tree_plan[len(tree)]
        tree.add(par, tok, 0.0)
    return tree


# node plan: parents/tokens; nodes 0..9 in creation order
#        root
#      /  |   \
#     0   1    2
#    / \   \
#   3   4   5
#   |   |
#   6   7
#   |
#   8 ---- 9 (child of 8)
PLAN = [(ROOT, 11), (ROOT, 12), (ROOT, 13), (0, 14), (0, 15), (1, 16), (3, 17), (4, 18), (6, 19), (8, 20)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_draft_incremental_logits_and_commits(kind):
    """Nodes requested over several `logits` calls equal sequential decoding, in round after round,
    including rounds whose accepted path runs through nodes the draft never forwarded."""
    model = make_model(kind, seed=3)
    rng = random.Random(5)
    prompt = [rng.randrange(VOCAB) for _ in range(6)]
    session = HFDraftSession(model, prompt)
    committed = list(prompt)
    rounds = [
        # (batches of forwarded nodes, accepted path) -- every batch's parents forwarded earlier
        ([[0, 1, 2], [3, 4], [6, 5, 7]], [0, 3, 6, 8]),  # 8: accepted leaf, never forwarded
        ([[0], [3], [6], [8]], [0, 3, 6, 8, 9]),  # full chain; 9 never forwarded
        ([[1, 0], [5, 4, 3]], [2]),  # accepted child of the root that was never forwarded
        ([[0, 1, 3]], []),  # nothing accepted; parent and child in one batch (parent first)
        ([[0, 2], [4, 3], [7, 6]], [0, 4, 7]),  # every accepted node was forwarded
        ([], [1, 5]),  # only the root forwarded, two accepted nodes never forwarded
    ]
    for round_no, (batches, accepted) in enumerate(rounds):
        tree = _grow_incrementally(session, model, committed, PLAN, batches)
        next_token = rng.randrange(VOCAB)
        verdict = Verdict(accepted, next_token, [tree.tokens[a] for a in accepted] + [next_token])
        session.commit(tree, verdict)
        committed += verdict.tokens
        assert session.tokens == committed, f"round {round_no}"
        assert session.cache.get_seq_length() == session.n_cached <= len(committed) - 1
    # a round where the draft is never asked (budget 0), then a normal root call
    tree = TokenTree()
    verdict = Verdict([], 7, [7])
    session.commit(tree, verdict)
    committed += [7]
    _grow_incrementally(session, model, committed, PLAN[:3], [[0, 1, 2]])


def test_draft_session_requires_root_first():
    model = make_model("llama")
    session = HFDraftSession(model, [1, 2, 3])
    tree = _tree([ROOT], [5])
    with pytest.raises(AssertionError):
        session.logits(tree, [0])


def test_empty_prompt_is_rejected():
    model = make_model("llama")
    with pytest.raises(ValueError):
        HFTargetSession(model, [])
    with pytest.raises(ValueError):
        HFDraftSession(model, [])
