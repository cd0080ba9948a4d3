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
    scored = score_t0("best-first", [budget], positions, len(prompt), greedy, new_tokens, draft_params, (), seed=0)
    tokens_per_step, steps, _, _ = scored[budget]
    ref = generate(target, draft, prompt, max_new_tokens=new_tokens, method="best-first", budget=budget,
                   temperature=0.0, draft_temperature=0.6)
    assert steps == ref.steps
    assert tokens_per_step == pytest.approx(sum(a + 1 for a in ref.accepted_per_step) / ref.steps)
    assert max(ref.accepted_per_step) > 0 and min(ref.accepted_per_step) < budget  # both outcomes happen
