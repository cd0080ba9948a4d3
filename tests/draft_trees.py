"""Two draft forwards compared through whole dyspec trees: the same coins and prompt must give the
same tree, the same draft distributions and the same cache, to float32 rounding."""
from __future__ import annotations

import torch

from dyspec.builders import make_builder
from dyspec.coins import TorchCoins
from dyspec.hf_runner import HFDraftSession
from dyspec.warp import SamplingParams


def build_tree(model, prompt: list[int], seed: int, budget: int = 12):
    """(one dyspec tree over `prompt`, the session that drafted it)."""
    session = HFDraftSession(model, prompt)
    builder = make_builder("dyspec", draft_params=SamplingParams(temperature=0.6, top_k=32))
    return builder.build(session, budget, TorchCoins(seed)), session


def assert_same_trees(model, reference, prompts: list[list[int]]) -> list:
    """`model` drafts every prompt's tree as `reference` does; its sessions, for further checks."""
    sessions = []
    for seed, prompt in enumerate(prompts):
        want, want_session = build_tree(reference, prompt, seed)
        got, got_session = build_tree(model, prompt, seed)
        assert got.tokens == want.tokens and got.parents == want.parents
        for node, dist in want.q.items():
            assert torch.equal(got.q[node].ids, dist.ids)
            torch.testing.assert_close(got.q[node].probs, dist.probs, rtol=1e-5, atol=1e-6)
        for mine, theirs in zip(got_session.cache.layers, want_session.cache.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
        sessions.append(got_session)
    return sessions
