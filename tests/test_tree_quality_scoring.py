"""The tree-quality benchmark's temperature-0 shortcut (score trees against the target's greedy
continuation with draft forwards only) must agree with real verification.

Best-first trees are deterministic, so the shortcut's per-round accepted counts must equal what
`dyspec.generate` measures with the target verifying every tree, round for round.
"""
from __future__ import annotations

import pytest

from benchmarks.tree_quality_run import DraftAtPositions, greedy_continuation, score_t0
from dyspec import generate
from dyspec.warp import SamplingParams
from tests.tiny_models import correlated_draft, tiny_llama


@pytest.mark.parametrize("budget", [3, 8])
def test_greedy_shortcut_matches_real_verification(budget):
    target = tiny_llama(seed=11, vocab_size=48)
    draft = correlated_draft(target, seed=12)
    prompt = [3, 17, 5, 29, 8, 41, 2]
    new_tokens = 24
    greedy, _ = greedy_continuation(target, prompt, new_tokens + 16)
    real = generate(target, draft, prompt, max_new_tokens=greedy.__len__(), method="autoregressive")
    assert real.tokens == greedy  # the shortcut's reference is the target's greedy continuation

    positions = DraftAtPositions(draft, prompt + greedy)
    draft_params = SamplingParams(0.6)
    scored = score_t0("best-first", [budget], positions, len(prompt), greedy, new_tokens, draft_params, {}, seed=0)
    tokens_per_step, steps, _, _ = scored[budget]
    ref = generate(target, draft, prompt, max_new_tokens=new_tokens, method="best-first", budget=budget,
                   temperature=0.0, draft_temperature=0.6)
    assert steps == ref.steps
    assert tokens_per_step == pytest.approx(sum(a + 1 for a in ref.accepted_per_step) / ref.steps)
    assert max(ref.accepted_per_step) > 0 and min(ref.accepted_per_step) < budget  # both outcomes happen


def test_pooled_session_equals_plain_session_and_skips_on_path_forwards():
    """Rows served from the prefill (nodes on the sequence) and rows forwarded (off it, below
    on-path ancestors) equal what an ordinary draft session computes for the same tree."""
    import random

    import torch

    from benchmarks.tree_quality_batched import SequencePool
    from dyspec.hf_runner import HFDraftSession
    from dyspec.tree import ROOT, TokenTree

    draft = tiny_llama(seed=5, vocab_size=40)
    rng = random.Random(3)
    sequence = [rng.randrange(40) for _ in range(30)]
    pool = SequencePool(draft, [sequence])
    n_committed = 12
    tree = TokenTree()
    path = tree.add(ROOT, sequence[n_committed], 0.0)  # on the sequence
    path2 = tree.add(path, sequence[n_committed + 1], 0.0)  # on it, deeper
    off = tree.add(path2, (sequence[n_committed + 2] + 1) % 40, 0.0)  # leaves it below on-path ancestors
    off_child = tree.add(off, 7, 0.0)
    sibling = tree.add(ROOT, (sequence[n_committed] + 3) % 40, 0.0)  # off at the first level
    batches = [[ROOT], [path, sibling], [path2], [off], [off_child]]

    session = pool.session(0, n_committed)
    plain = HFDraftSession(draft, sequence[:n_committed])
    forwarded = 0

    def compare():
        nonlocal forwarded
        for batch in batches:
            want = plain.logits(tree, batch)
            got = session.logits(tree, batch)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            forwarded += sum(1 for n in batch if n in (off, off_child, sibling))

    pool.run_threads([compare])
    assert set(session.on_path) == {ROOT, path, path2}  # exactly the nodes on the sequence were reused
    assert len(pool.cache.layers[0].keys[0, 0]) == len(sequence) + forwarded  # one KV entry per forwarded node
    assert pool.rows == forwarded


def test_pooled_scoring_builds_the_same_trees_as_one_run_at_a_time():
    """Every method's runs on two prompts in flight at once, their draft requests pooled into
    shared forwards over one cache (cache compaction forced often), score exactly as the runs do
    one at a time."""
    from benchmarks import tree_quality_batched as tqb
    from benchmarks.tree_quality import CHAIN_LENGTHS, NESTED
    from benchmarks.tree_quality_run import accepted_greedy, builder_options

    target = tiny_llama(seed=11, vocab_size=48)
    draft = correlated_draft(target, seed=12)
    prompts = [[3, 17, 5, 29, 8, 41, 2], [9, 1, 30, 4, 4, 22]]
    new_tokens = 20
    greedies = [greedy_continuation(target, prompt, new_tokens + 16)[0] for prompt in prompts]
    draft_params = SamplingParams(0.6)
    acceptance = (0.6, 0.2, 0.1, 0.05)
    runs = {}
    for method in ("dyspec", "dyspec-layer", "best-first", "sequoia", "specinfer", "chain"):
        limits = list(CHAIN_LENGTHS) if method == "chain" else [4, 8, 16]
        runs[method] = (limits, builder_options(method, acceptance, prefetch=4, speculate=(4, 0.0)))

    old = tqb.COMPACT_AFTER
    tqb.COMPACT_AFTER = 16
    try:
        pool = tqb.SequencePool(draft, [p + g for p, g in zip(prompts, greedies)])
        to_score = [tqb.PromptToScore(k, len(p), g, seed=3 + k) for k, (p, g) in enumerate(zip(prompts, greedies))]
        pooled = tqb.score_t0_pooled(pool, to_score, runs, NESTED, new_tokens, draft_params, accepted_greedy)
    finally:
        tqb.COMPACT_AFTER = old
    for k, (prompt, greedy) in enumerate(zip(prompts, greedies)):
        positions = DraftAtPositions(draft, prompt + greedy)
        for method, (limits, options) in runs.items():
            one_at_a_time = score_t0(method, limits, positions, len(prompt), greedy, new_tokens, draft_params,
                                     options, seed=3 + k)
            for limit in limits:
                tps, steps, calls, _ = one_at_a_time[f"chain{limit}" if method == "chain" else limit]
                # nested builders: the pooled trees are built at the largest budget a run may still
                # need, so their draft calls differ; the scores may not
                expected = (tps, steps) if method in NESTED else (tps, steps, calls)
                assert pooled[k][method][limit][:len(expected)] == expected, (k, method, limit)
    assert pool.requests > 3 * pool.forwards  # requests were pooled, not forwarded one by one


def test_tree_memo_builds_at_the_largest_budget_a_run_may_still_need():
    """A nested tree is built for the biggest unfinished run not yet past its position: 256 nodes
    while the 256-budget run may still come, 16 once it has passed; a tree found too small is
    rebuilt bigger, never handed to a run that needs more nodes."""
    from benchmarks.tree_quality_batched import _TreeMemo

    built = []

    def build(budget):
        built.append(budget)
        return f"tree{len(built)}", budget

    memo = _TreeMemo()
    memo.register("big", 256)
    memo.register("small", 16)
    assert memo.get("small", 3, 16, build, pool=None) == ("tree1", 256)  # big (at 0) may still come to 3
    assert memo.get("big", 3, 256, build, pool=None) == ("tree1", 256)  # and does: no second build
    assert memo.get("big", 9, 256, build, pool=None) == ("tree2", 256)
    assert memo.get("small", 7, 16, build, pool=None) == ("tree3", 16)  # big is past 7: 16 nodes do
    memo.finish("big")
    assert memo.get("small", 9, 16, build, pool=None) == ("tree2", 256)  # an existing bigger tree serves
    assert memo.get("small", 12, 16, build, pool=None) == ("tree4", 16)
    memo.register("late", 64)  # (not how the scorer registers, but the rule must hold)
    assert memo.get("late", 12, 64, build, pool=None) == ("tree5", 64)  # 16 nodes are too few: rebuilt
    assert built == [256, 256, 16, 16, 64]
