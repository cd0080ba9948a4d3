"""The budget policy: how many tree nodes to draft next round. A pure function of measurements.

Model (shared/reference/dyspec_and_peers.md section 4.2):
  tokens(B) = 1 + sum_{i<=B} c(v_i)        v_1 >= v_2 >= ... the expected node values of a B-node
                                           tree, c the calibration from value to acceptance
  time(B)   = fixed_s + per_node_s * B     fixed: network round trip + target forward floor +
                                           draft floor; per node: draft + wire + verify slopes
  choose B maximising tokens(B) / time(B)  (B = 0 is plain decoding: one token per round)

Each extra node is worth adding while c(v_B) / per_node_s exceeds the current tokens per second;
with non-increasing values and convex time that rule stops at the global optimum. We scan every
B up to the cap instead of stopping at the first failure, which costs microseconds and stays
right when a measured cost curve is not exactly convex.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class CostModel:
    """Seconds per round as a function of tree size. `verify_s(n)` may be any measured curve."""

    network_s: float  # round trip between draft and target, outside both models
    draft_fixed_s: float  # draft cost of a round that drafts at all (root forward)
    draft_per_node_s: float  # extra draft cost per node (amortised batched forwards)
    wire_per_node_s: float  # serialisation + transfer per node
    verify_s: Callable[[int], float]  # target forward + verification for a tree of n nodes

    def round_s(self, budget: int) -> float:
        draft = 0.0 if budget == 0 else self.draft_fixed_s + self.draft_per_node_s * budget
        return self.network_s + draft + self.wire_per_node_s * budget + self.verify_s(budget)


@dataclass(frozen=True)
class BudgetChoice:
    budget: int
    tokens_per_round: float  # predicted, including the bonus token
    tokens_per_s: float  # predicted


def choose_budget(values: Sequence[float], calibration: Callable[[float], float], cost: CostModel,
                  max_budget: int, min_budget: int = 0) -> BudgetChoice:
    """The budget in [min_budget, max_budget] with the highest predicted tokens per second.

    values: expected node values in decreasing order (len >= max_budget, or padded with 0).
    calibration: maps a node value to its expected acceptance contribution (clamped to [0, 1]).
    """
    best = None
    tokens = 1.0
    for b in range(0, max_budget + 1):
        if b > 0:
            v = values[b - 1] if b - 1 < len(values) else 0.0
            tokens += min(1.0, max(0.0, calibration(v)))
        if b < min_budget:
            continue
        rate = tokens / max(cost.round_s(b), 1e-9)  # a degenerate all-zero cost model
        if best is None or rate > best.tokens_per_s * (1 + 1e-12):
            best = BudgetChoice(b, tokens, rate)
    return best
