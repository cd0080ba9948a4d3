"""One speculative round, independent of where the models live.

The draft side is a `DraftSession` (a `DraftOracle` that also commits), the target side a
`TargetSession`. In-process runners (dyspec.hf_runner), table models in tests and the gRPC
services all implement these, so the round logic below is the only copy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dyspec.builders.base import DraftOracle, TreeBuilder
from dyspec.coins import Coins
from dyspec.tree import TokenTree
from dyspec.verify import Verdict, verify_greedy, verify_stochastic
from dyspec.warp import SamplingParams, target_probs


class DraftSession(DraftOracle, Protocol):
    def commit(self, tree: TokenTree, verdict: Verdict) -> None:
        """Append the accepted tokens and the next token to the committed sequence."""


class TargetSession(Protocol):
    def forward_tree(self, tree: TokenTree) -> torch.Tensor:
        """float32 [1 + len(tree), V]: logits after the root (row 0) and after each node."""

    def commit(self, tree: TokenTree, verdict: Verdict) -> None:
        """Keep only the accepted path in the cache and append the accepted and next tokens."""


class TimedOracle:
    """Wraps a draft oracle to count calls and the seconds spent in them."""

    def __init__(self, oracle: DraftOracle):
        self.oracle = oracle
        self.calls = 0
        self.seconds = 0.0

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        start = time.perf_counter()
        out = self.oracle.logits(tree, nodes)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@dataclass
class RoundStats:
    tree_size: int
    tree_depth: int
    accepted: int  # accepted draft tokens (excludes the next token)
    draft_calls: int
    draft_s: float  # inside draft forwards
    build_s: float  # tree building outside draft forwards
    verify_s: float  # target forward over the tree
    walk_s: float  # verification walk (warping, accept tests, residual draws)
    commit_s: float  # cache bookkeeping on both sides


@dataclass
class RoundResult:
    tree: TokenTree
    verdict: Verdict
    stats: RoundStats


def verify_tree(tree: TokenTree, logits: torch.Tensor, sampling: SamplingParams, coins: Coins) -> Verdict:
    """Verify `tree` against target logits rows (row 0 = root, row i+1 = node i)."""
    if sampling.greedy:
        return verify_greedy(tree, lambda node: int(torch.argmax(logits[node + 1])))
    return verify_stochastic(tree, lambda node: target_probs(logits[node + 1], sampling), coins)


def speculative_round(draft: DraftSession, target: TargetSession, builder: TreeBuilder, budget: int,
                      sampling: SamplingParams, draft_coins: Coins, verify_coins: Coins) -> RoundResult:
    timed = TimedOracle(draft)
    t0 = time.perf_counter()
    tree = builder.build(timed, budget, draft_coins) if budget > 0 else TokenTree(draw=builder.draw)
    t1 = time.perf_counter()
    logits = target.forward_tree(tree)
    t2 = time.perf_counter()
    verdict = verify_tree(tree, logits, sampling, verify_coins)
    t3 = time.perf_counter()
    target.commit(tree, verdict)
    draft.commit(tree, verdict)
    t4 = time.perf_counter()
    stats = RoundStats(len(tree), tree.max_depth(), len(verdict.accepted), timed.calls, timed.seconds,
                       (t1 - t0) - timed.seconds, t2 - t1, t3 - t2, t4 - t3)
    return RoundResult(tree, verdict, stats)
