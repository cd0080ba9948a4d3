"""warp.py: the one definition of sampling distributions, including the large-vocabulary path
that sorts only the most probable head of an untruncated distribution."""
from __future__ import annotations

import torch

from dyspec.warp import SORTED_HEAD, SamplingParams, draft_distribution, target_probs, warped_sparse


def _big_logits(vocab: int = 5000, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 4


def test_untruncated_large_vocab_is_exactly_the_softmax():
    logits = _big_logits()
    ids, probs = warped_sparse(logits, SamplingParams(0.6))
    assert ids.numel() == logits.numel() == len(set(ids.tolist()))  # every token, once
    dense = torch.zeros(logits.numel(), dtype=torch.float64)
    dense[ids] = probs
    torch.testing.assert_close(dense, torch.softmax(logits.double() / 0.6, 0), rtol=1e-12, atol=1e-18)  # summation order only


def test_untruncated_large_vocab_head_is_sorted_and_dominates_the_rest():
    ids, probs = warped_sparse(_big_logits(seed=1), SamplingParams(1.0))
    head, rest = probs[:SORTED_HEAD], probs[SORTED_HEAD:]
    assert torch.all(head[:-1] >= head[1:])
    assert float(rest.max()) <= float(head[-1])
    assert torch.all(ids[SORTED_HEAD:][:-1] < ids[SORTED_HEAD:][1:])  # the rest in id order


def test_truncated_and_small_vocab_stay_fully_sorted():
    logits = _big_logits(seed=2)
    for params in (SamplingParams(0.6, top_k=2000), SamplingParams(0.6, top_p=0.99)):
        _, probs = warped_sparse(logits, params)
        assert torch.all(probs[:-1] >= probs[1:])
    _, probs = warped_sparse(logits[:SORTED_HEAD], SamplingParams(0.6))
    assert torch.all(probs[:-1] >= probs[1:])


def test_draft_and_target_use_the_same_numbers():
    logits = _big_logits(seed=3)
    params = SamplingParams(0.7)
    q = draft_distribution(logits, params)
    p = target_probs(logits, params)
    # the draft's q is computed in fp32 (canonical as shipped); the target's p in fp64
    torch.testing.assert_close(q.dense(logits.numel()), p, rtol=2e-6, atol=1e-12)
    assert q.ids.numel() == logits.numel() and abs(float(q.probs.double().sum()) - 1) < 1e-6

