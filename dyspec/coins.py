"""The random decisions of drafting and verification, behind one small interface.

Production code draws through `TorchCoins` (a seeded torch.Generator). Because every random
decision goes through `accept` or `sample`, a test can substitute an enumerator that explores
every branch with its exact probability and so compute the output distribution of the
production code itself, not of a re-implementation.
"""
from __future__ import annotations

import hashlib
from typing import Protocol

import torch

DRAFT_STREAM, VERIFY_STREAM = "draft", "verify"


class Coins(Protocol):
    def accept(self, prob: float) -> bool:
        """True with probability `prob` (clamped to [0, 1])."""

    def sample(self, weights: torch.Tensor) -> int:
        """An index drawn with probability proportional to `weights` (float64, >= 0, sum > 0)."""


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """Index i with cumsum[i-1] <= u * total < cumsum[i]; never lands on a zero weight."""
    cdf = torch.cumsum(weights, 0)
    idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    idx = min(idx, weights.numel() - 1)
    while weights[idx] <= 0:  # u * total rounded onto the last edge: step back to real mass
        idx -= 1
    return idx


class TorchCoins:
    """Independent U(0,1) draws from one generator; a fresh uniform for every decision."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def accept(self, prob: float) -> bool:
        return self.uniform() < prob

    def sample(self, weights: torch.Tensor) -> int:
        return inverse_cdf(weights, self.uniform())


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one named random stream of a request (DRAFT_STREAM or VERIFY_STREAM).

    Hashed rather than offset: with `seed + k`, request s's verify stream would be request
    (s + k)'s draft stream. Every process (generate, draft worker, target) derives it the same
    way, so a seeded request gives the same tokens wherever it runs."""
    digest = hashlib.blake2b(f"{int(seed)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draft_coins_for_round(seed: int):
    """Round k's draft coins (k >= 1): a fresh generator per round, so a round's tree depends on
    its prefix and its own coins only. Overlapped rounds (dyspec.overlap) rely on it: a tree
    pre-drafted below a guessed verdict and one rebuilt after a wrong guess use the same coins,
    so a seeded request gives the same tokens whether and however its rounds overlap."""
    return lambda round_index: TorchCoins(stream_seed(seed, f"{DRAFT_STREAM}/{int(round_index)}"))
