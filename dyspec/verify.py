"""Tree verification: the accepted path and the next token, from one target pass over the tree.

Terms (see tree.py for tree terms):
  p   the target's sampling distribution at a node (float64 dense [V], warped exactly as plain
      sampling warps it). `target_p(node)` supplies it lazily: only nodes on the walk are warped.
  r   the residual target distribution at the current node; starts at p.
  q   the draft distribution the node's next child was drawn from.

Rules (reference/losslessness_and_reliability.md section 2.1):
  WITHOUT_REPLACEMENT (Sequoia / DySpec Alg. 3): accept y w.p. min(1, r(y)/q(y)); on rejection
      r <- norm(max(r - q, 0)) and q <- q with y removed, renormalised.
  WITH_REPLACEMENT (SpecInfer MSS): the same, but q is unchanged after a rejection.
  DETERMINISTIC (best-first / top-k trees): q is one-hot on each child: accept w.p. r(y); on
      rejection r <- r with y removed, renormalised.
If no child is accepted the next token is drawn from the final residual r; at a leaf it is drawn
from p. Every decision uses a fresh uniform (`Coins`), never one reused from an accept test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dyspec.coins import Coins
from dyspec.tree import ROOT, Draw, TokenTree


@dataclass(frozen=True)
class Verdict:
    accepted: list[int]  # accepted node indices, from the root's child downwards
    next_token: int  # bonus token (after a leaf) or residual draw (after a rejection)
    tokens: list[int]  # tokens of the accepted nodes, then next_token


def _verdict(tree: TokenTree, accepted: list[int], next_token: int) -> Verdict:
    return Verdict(accepted, int(next_token), [tree.tokens[a] for a in accepted] + [int(next_token)])


def verify_greedy(tree: TokenTree, target_argmax: Callable[[int], int]) -> Verdict:
    """Target temperature 0: follow the child whose token is the target's argmax."""
    node, accepted = ROOT, []
    while True:
        best = target_argmax(node)
        match = next((c for c in tree.children_of(node) if tree.tokens[c] == best), None)
        if match is None:
            return _verdict(tree, accepted, best)
        accepted.append(match)
        node = match


class StochasticVerifier:
    """Multi-branch speculative sampling over a tree. The three rule-specific steps are methods,
    so planted-bug tests can override exactly one of them."""

    def __call__(self, tree: TokenTree, target_p: Callable[[int], torch.Tensor], coins: Coins) -> Verdict:
        node, accepted = ROOT, []
        while True:
            p = target_p(node)
            kids = tree.children_of(node)
            if not kids:
                return _verdict(tree, accepted, coins.sample(p))
            r = p
            q = None if tree.draw is Draw.DETERMINISTIC else tree.q[node].dense(p.numel())
            chosen = None
            for child in kids:
                y = tree.tokens[child]
                q_y = 1.0 if q is None else float(q[y])
                if coins.accept(self.acceptance_probability(float(r[y]), q_y, child)):
                    chosen = child
                    break
                r = self.residual_after_rejection(r, q, y)
                if q is not None and tree.draw is Draw.WITHOUT_REPLACEMENT:
                    q = self.draft_after_rejection(q, y)
            if chosen is None:
                return _verdict(tree, accepted, coins.sample(self.final_distribution(r, p)))
            accepted.append(chosen)
            node = chosen

    @staticmethod
    def acceptance_probability(r_y: float, q_y: float, child: int) -> float:
        if q_y <= 0:  # validate_tree rejects such trees at trust boundaries; never divide by zero
            raise ValueError(f"node {child} was drawn with zero draft probability")
        return min(1.0, r_y / q_y)

    @staticmethod
    def residual_after_rejection(r: torch.Tensor, q: torch.Tensor | None, y: int) -> torch.Tensor:
        if q is None:  # deterministic child: its q is one-hot on y
            out = r.clone()
            out[y] = 0.0
        else:
            out = torch.clamp(r - q, min=0.0)
        total = float(out.sum())
        # total == 0 needs r <= q everywhere, i.e. r == q, where rejection has probability 0;
        # keep r rather than divide by zero if rounding ever lands there.
        return out / total if total > 0 else r

    @staticmethod
    def draft_after_rejection(q: torch.Tensor, y: int) -> torch.Tensor:
        out = q.clone()
        out[y] = 0.0
        total = float(out.sum())
        return out / total if total > 0 else out

    @staticmethod
    def final_distribution(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return r


verify_stochastic = StochasticVerifier()
