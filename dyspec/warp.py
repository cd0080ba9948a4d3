"""Logits -> sampling distributions, one definition shared by drafting, verification and the
plain-sampling baseline (so "the target's distribution" means exactly one thing).

Order: temperature, then top-k, then top-p (smallest prefix of the sorted distribution whose mass
reaches top_p; always at least one token). Temperature 0 means greedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dyspec.tree import SparseDist


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k truncation
    top_p: float = 1.0  # 1.0 = no nucleus truncation

    def __post_init__(self):
        if not (self.temperature >= 0 and self.temperature == self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# An untruncated distribution over a large vocabulary is ordered only in its most probable
# SORTED_HEAD entries; the rest follow in id order. A full sort of 152k values costs ~12 ms per
# drafted node on a CPU, and nothing needs the tail ordered: sampling is an inverse CDF over
# whatever order the ids are in, and callers that take "the best few" take far fewer than this.
SORTED_HEAD = 1024


def _sorted_head_then_rest(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    head_vals, head_ids = torch.topk(scaled, SORTED_HEAD)
    rest = torch.ones(scaled.numel(), dtype=torch.bool)
    rest[head_ids] = False
    rest_ids = rest.nonzero().squeeze(1)
    return torch.cat([head_vals, scaled[rest_ids]]), torch.cat([head_ids, rest_ids])


def warped_sparse(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float [V] -> (ids int64 [k], probs float64 [k]), the most probable first: sorted by
    decreasing probability, except that an untruncated distribution over more than SORTED_HEAD
    tokens is sorted in its first SORTED_HEAD entries only (the rest in id order, all less probable).

    Greedy params give the one-hot argmax (lowest id on ties)."""
    logits = logits.double()
    if params.greedy:
        return logits.argmax().view(1), torch.ones(1, dtype=torch.float64)
    k = logits.numel() if params.top_k == 0 else min(params.top_k, logits.numel())
    scaled = logits / params.temperature
    if not math.isfinite(float(scaled.max())):  # T so small (e.g. 5e-324) that logits / T overflows
        scaled = (logits - logits.max()) / params.temperature  # softmax is shift-invariant; the max is now 0
    if k < logits.numel():
        top_vals, ids = torch.topk(scaled, k)
    elif params.top_p == 1.0 and k > SORTED_HEAD:
        top_vals, ids = _sorted_head_then_rest(scaled)
    else:
        top_vals, ids = torch.sort(scaled, descending=True)
    probs = torch.softmax(top_vals, 0)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, 0)
        keep = int((cum < params.top_p).sum()) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    keep = probs > 0
    return ids[keep], probs[keep]


def draft_distribution(logits: torch.Tensor, params: SamplingParams) -> SparseDist:
    """The canonical float32 distribution a drafter samples from and ships to the verifier.

    An untruncated distribution over a large vocabulary is computed in float32 throughout (5x
    faster than via float64, and it is evaluated for every drafted node): whatever these float32
    numbers are is q, and the verifier uses exactly them."""
    if not params.greedy and params.top_k == 0 and params.top_p == 1.0 and logits.numel() > SORTED_HEAD:
        vals, ids = _sorted_head_then_rest(logits.float() / params.temperature)
        probs32 = torch.softmax(vals, 0)
    else:
        ids, probs = warped_sparse(logits, params)
        probs32 = probs.float()
    keep = probs32 > 0  # underflow in fp32 must not leave zero-probability support
    if not bool(keep.all()):
        ids, probs32 = ids[keep], probs32[keep]
    return SparseDist(ids=ids, probs=probs32 / probs32.sum())


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Dense float64 [V] distribution of plain target sampling under `params`."""
    ids, probs = warped_sparse(logits, params)
    out = torch.zeros(logits.numel(), dtype=torch.float64)
    out[ids] = probs
    return out
