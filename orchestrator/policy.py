"""The budget policy: how many tree nodes to draft next round. A pure function of measurements.

Model (shared/reference/dyspec_and_peers.md section 4.2):
  tokens(B) = 1 + sum_{i<=B} c(v_i)        v_1 >= v_2 >= ... the expected node values of a B-node
                                           tree, c the calibration from value to acceptance
  time(B)   = fixed_s + per_node_s * B     fixed: network round trip + target forward floor +
                                           draft floor; per node: draft + wire + verify slopes
  choose B maximising tokens(B) / time(B)  (B = 0 is plain decoding: one token per round)

Each extra node is worth adding while c(v_B) / per_node_s exceeds the current tokens per second;
with non-increasing values and convex time that rule stops at the global optimum. We scan every
B up to the cap instead of stopping at the first failure, which stays right when a measured cost
curve is not exactly convex. The scan is a few array operations (microseconds): the draft worker
runs it every round, and a plain decoding round on a fast link takes about 2.5 ms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


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


def best_budget(gains: np.ndarray, round_s: np.ndarray, min_budget: int = 0) -> BudgetChoice:
    """The budget with the highest predicted tokens per second, from the curves themselves.

    gains: (max_budget,) float64, gains[i] = expected acceptance contribution of the (i+1)-th
        node, in [0, 1].
    round_s: (max_budget + 1,) float64, round_s[b] = predicted seconds of a round with b nodes.
    Returns the budget in [min_budget, max_budget]; of equal rates, the smallest budget.
    """
    assert round_s.shape == (gains.shape[0] + 1,) and 0 <= min_budget <= gains.shape[0], (gains.shape, round_s.shape)
    # tokens[b] = 1 + gains[0] + ... + gains[b-1], summed left to right (accumulate is sequential)
    tokens = np.add.accumulate(np.concatenate(([1.0], gains)))  # (max_budget + 1,)
    rate = tokens[min_budget:] / np.maximum(round_s[min_budget:], 1e-9)  # 1e-9: a degenerate all-zero cost model
    i = int(rate.argmax())  # the first of equal maxima
    return BudgetChoice(min_budget + i, float(tokens[min_budget + i]), float(rate[i]))


def choose_budget(values: Sequence[float], calibration: Callable[[float], float], cost: CostModel,
                  max_budget: int, min_budget: int = 0) -> BudgetChoice:
    """The budget in [min_budget, max_budget] with the highest predicted tokens per second.

    values: expected node values in decreasing order (len >= max_budget, or padded with 0).
    calibration: maps a node value to its expected acceptance contribution (clamped to [0, 1]).
    Evaluates the callables once per budget; the online tuner builds the two curves with array
    arithmetic instead and calls best_budget directly.
    """
    gains = np.array([min(1.0, max(0.0, calibration(values[i] if i < len(values) else 0.0)))
                      for i in range(max_budget)], dtype=np.float64)
    round_s = np.array([cost.round_s(b) for b in range(max_budget + 1)], dtype=np.float64)
    return best_budget(gains, round_s, min_budget)
