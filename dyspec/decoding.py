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
        """float32 [1 + len(tree), V], on any device: logits after the root (row 0) and after each node."""

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

    def renumber(self, mapping: dict[int, int]) -> None:
        inner = getattr(self.oracle, "renumber", None)
        if inner is not None:
            inner(mapping)


class TreeVerifier(Protocol):
    """Whatever verifies a tree and commits the verdict on the target side: a local target
    session (`LocalVerifier`) or a remote target service (draft_service's client)."""

    last_forward_s: float  # target model forward time of the last verify call (as reported)

    def verify(self, tree: TokenTree) -> Verdict: ...


class LocalVerifier:
    """Target session + sampling params + the target's RNG: one verification per call."""

    def __init__(self, session: TargetSession, sampling: SamplingParams, coins: Coins):
        self.session, self.sampling, self.coins = session, sampling, coins
        self.last_forward_s = 0.0  # last call: target forward
        self.last_walk_s = 0.0  # last call: verification walk
        self.last_commit_s = 0.0  # last call: cache commit

    def verify(self, tree: TokenTree) -> Verdict:
        t0 = time.perf_counter()
        logits = self.session.forward_tree(tree)
        return self.finish(tree, logits, time.perf_counter() - t0)

    def finish(self, tree: TokenTree, logits: torch.Tensor, forward_s: float) -> Verdict:
        """The walk and the commit over `logits` of this session's `tree`, forwarded elsewhere
        (a batched forward over several sessions' trees, which took `forward_s`)."""
        t1 = time.perf_counter()
        verdict = verify_tree(tree, logits, self.sampling, self.coins)
        t2 = time.perf_counter()
        self.session.commit(tree, verdict)
        self.last_forward_s, self.last_walk_s, self.last_commit_s = forward_s, t2 - t1, time.perf_counter() - t2
        return verdict


@dataclass
class RoundStats:
    tree_size: int
    tree_depth: int
    accepted: int  # accepted draft tokens (excludes the next token)
    draft_calls: int
    draft_s: float  # inside draft forwards
    build_s: float  # tree building outside draft forwards
    verify_s: float  # the whole verification call (local: forward + walk + commit; remote: round trip)
    target_forward_s: float  # of which the target model forward
    commit_s: float  # draft-side cache commit


@dataclass
class RoundResult:
    tree: TokenTree
    verdict: Verdict
    stats: RoundStats
    overlap: object | None = None  # dyspec.overlap.OverlapStats when the round ran overlapped


def verify_tree(tree: TokenTree, logits: torch.Tensor, sampling: SamplingParams, coins: Coins) -> Verdict:
    """Verify `tree` against target logits rows (row 0 = root, row i+1 = node i), which may live
    on an accelerator: only per-row argmaxes (greedy) or the rows on the walk (sampling) are
    copied to the host, where the walk runs."""
    if sampling.greedy:
        argmax = logits.argmax(dim=-1).tolist()
        return verify_greedy(tree, lambda node: argmax[node + 1])
    return verify_stochastic(tree, lambda node: target_probs(logits[node + 1].cpu(), sampling), coins)


def speculative_round(draft: DraftSession, verifier: TreeVerifier, builder: TreeBuilder, budget: int,
                      draft_coins: Coins) -> RoundResult:
    """Build a tree under `budget` (0: no tree, plain decoding), verify it, commit on the draft."""
    timed = TimedOracle(draft)
    t0 = time.perf_counter()
    tree = builder.build(timed, budget, draft_coins) if budget > 0 else TokenTree(draw=builder.draw)
    t1 = time.perf_counter()
    verdict = verifier.verify(tree)
    t2 = time.perf_counter()
    draft.commit(tree, verdict)
    t3 = time.perf_counter()
    stats = RoundStats(len(tree), tree.max_depth(), len(verdict.accepted), timed.calls, timed.seconds,
                       (t1 - t0) - timed.seconds, t2 - t1, verifier.last_forward_s, t3 - t2)
    return RoundResult(tree, verdict, stats)


def take_new_tokens(verdict_tokens: list[int], generated: int, max_new_tokens: int,
                    eos: set[int]) -> tuple[list[int], bool]:
    """The part of a round's tokens a caller keeps: up to max_new_tokens in all, through the first
    EOS. Returns (tokens, hit_eos). One stop rule for in-process and served generation."""
    kept: list[int] = []
    for token in verdict_tokens:
        kept.append(token)
        if token in eos:
            return kept, True
        if generated + len(kept) >= max_new_tokens:
            break
    return kept, False
