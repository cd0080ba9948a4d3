"""The pooled T > 0 runs of the tree-quality benchmark (benchmarks/tree_quality_verified.py) are
`dyspec.generate` runs: every method's runs on two prompts in flight at once, their draft rows and
the target rows of their verification walks pooled into shared forwards (cache compaction forced
often), emit the same tokens with the same accepted counts per round as `generate` one at a time.
"""
from __future__ import annotations

import pytest

from dyspec import generate
from dyspec.warp import SamplingParams
from tests.tiny_models import correlated_draft, tiny_llama


def test_pooled_verified_runs_equal_generate():
    from benchmarks import tree_quality_verified as tqv
    from benchmarks.tree_quality_run import builder_options

    target = tiny_llama(seed=11, vocab_size=48)
    draft = correlated_draft(target, seed=12)
    prompts = [[3, 17, 5, 29, 8, 41, 2], [9, 1, 30, 4, 4, 22]]
    new_tokens, temperature = 20, 0.6
    acceptance = (0.6, 0.2, 0.1, 0.05)
    per_prompt = []
    for k in range(len(prompts)):
        runs = [tqv.VerifiedRun(m, b, seed=100 + k) for m in ("dyspec", "dyspec-layer", "best-first", "sequoia",
                                                             "specinfer", "chain") for b in (3, 8)]
        runs.append(tqv.VerifiedRun("autoregressive", 1, seed=100 + k))
        per_prompt.append(runs)
    options = lambda m: builder_options(m, acceptance, prefetch=4, speculate=(4, 0.0))  # scratch trees too

    old = tqv.COMPACT_AFTER
    tqv.COMPACT_AFTER = 24
    try:
        pooled, stats = tqv.run_verified_pooled(draft, target, prompts, per_prompt, new_tokens, temperature,
                                         SamplingParams(0.6), options, max_threads=8)
    finally:
        tqv.COMPACT_AFTER = old
    accepted_somewhere = False
    for k, prompt in enumerate(prompts):
        for run, got in zip(per_prompt[k], pooled[k]):
            ref = generate(target, draft, prompt, max_new_tokens=new_tokens, method=run.method, budget=run.budget,
                           temperature=temperature, draft_temperature=0.6, seed=run.seed, eos_token_id=[],
                           builder_options=options(run.method) if run.method != "autoregressive" else None)
            assert got == {"tokens": ref.tokens, "accepted": ref.accepted_per_step}, (k, run)
            accepted_somewhere |= max(ref.accepted_per_step) > 0
    assert accepted_somewhere
    for model in ("draft", "target"):  # rows were pooled, and the cache compacted under the runs
        assert stats[f"{model}_requests"] > 2 * stats[f"{model}_forwards"] and stats[f"{model}_compactions"] > 0, stats


def test_pooled_verifier_refuses_greedy():
    from benchmarks import tree_quality_verified as tqv

    target = tiny_llama(seed=11, vocab_size=48)
    pool = tqv.ModelPool(target, tqv.Coordinator(), "target")
    prefix = tqv.PinnedSlots(pool, [1, 2])
    with pytest.raises(ValueError, match="T=0"):
        tqv.PooledVerifier(pool, prefix, [1, 2, 3], SamplingParams(0.0), coins=None)
