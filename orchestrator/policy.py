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


@dataclass(frozen=True)
class BatchCost:
    """Seconds of one round of several sessions that share a draft worker and one batched target
    forward. The target forward is a function of the rows of the whole batch. Drafting: the longest
    tree's, plus draft_batch_share of every other session's (1: summed over the sessions, a worker
    drafting them one after another on shared cores; below 1: a worker that batches its sessions'
    draft forwards, draft_service.draft_batcher, drafts them in step, and a session beside the
    longest tree adds its rows to forwards that run anyway)."""

    network_s: float  # round trip between draft and target, outside both models
    draft_fixed_s: float  # draft cost of a session's round that drafts at all (its root forward)
    draft_per_node_s: float  # extra draft cost per node, whichever session's
    # the target's batched forward + walks for a batch of `rows` rows in all; called with numpy
    # int arrays of row counts (elementwise), so write it with numpy operations
    verify_s: Callable[[np.ndarray], np.ndarray]
    overlap: float = 0.0  # share of drafting hidden behind verification (overlapped rounds' kept trees)
    # the forward's cost when no session of the batch drafts (plain decoding for all), where it differs:
    # a target that shares its machine with the draft worker takes the draft's cores then
    # (target --batched-threads); None: verify_s whether or not anyone drafts
    plain_verify_s: Callable[[np.ndarray], np.ndarray] | None = None
    draft_batch_share: float = 1.0  # in [0, 1]: what a session beside the longest tree adds to drafting

    def round_s(self, drafting_sessions, nodes, rows, largest=None):
        """Seconds of the round; scalars or numpy arrays (elementwise). `largest`: the nodes of the
        largest tree (needed unless draft_batch_share is 1)."""
        drafting = np.asarray(drafting_sessions, dtype=np.float64)
        nodes = np.asarray(nodes, dtype=np.float64)
        share = self.draft_batch_share
        if share >= 1.0:
            draft = self.draft_fixed_s * drafting + self.draft_per_node_s * nodes
        else:
            assert largest is not None, "a batched draft's cost needs the largest tree"
            largest = np.asarray(largest, dtype=np.float64)
            draft = (self.draft_fixed_s * np.where(drafting > 0, 1.0 + share * (drafting - 1.0), 0.0)
                     + self.draft_per_node_s * (largest + share * (nodes - largest)))
        verify = np.asarray(self.verify_s(np.asarray(rows)), dtype=np.float64)
        if self.plain_verify_s is not None:
            plain = np.asarray(self.plain_verify_s(np.asarray(rows)), dtype=np.float64)
            verify = np.where(drafting > 0, verify, plain)
        link = self.network_s + verify
        return link + draft - self.overlap * np.minimum(draft, link)


@dataclass(frozen=True)
class BudgetSplit:
    budgets: tuple[int, ...]  # nodes per session, in the order given
    tokens_per_round: float  # predicted, over all sessions, bonus tokens included
    tokens_per_s: float  # predicted aggregate


def split_budget(gains: Sequence[np.ndarray], base_rows: Sequence[int], cost: BatchCost,
                 max_budgets: Sequence[int] | None = None, setup_s: Sequence[float] | None = None) -> BudgetSplit:
    """One node budget over sessions verified in one target forward: the split with the highest
    predicted aggregate tokens per second.

    gains[i]: (n_i,) session i's predicted acceptance of its tree's j-th node, non-increasing in j
        (BudgetTuner.gains()); base_rows[i]: rows session i adds to the forward without a tree (its
        uncached suffix: 1 for a session in steady state); max_budgets[i]: its cap (default n_i);
        setup_s[i]: what drafting at all this round costs session i besides its root forward (default 0:
        a draft cache that is behind, e.g. a new session's prompt, which its first tree must forward
        first; the caller spreads a one-off cost over the rounds it serves).

    Every node of the batch costs the same rows of the same forward, so the next node worth adding
    is the best next node of whichever session's tree gains most: the candidates are taken in
    decreasing gain over all sessions (ties: the earlier session, then the earlier node), and every
    prefix of that order is priced with the batch cost; the best prefix is the start. That is the
    optimum when drafting has no per-session cost and is summed over sessions; a session's first
    node also buys its root forward, though, and a batched draft prices the longest tree above the
    others (BatchCost.draft_batch_share), so the start is then improved one session at a time (its
    best budget with the others held, until none moves; each step raises the rate, so it ends).
    Under load the forward's rows and the drafting cost more and trees shrink toward batched plain
    decoding; one session alone gets best_budget's choice on its own curves.
    """
    k = len(gains)
    assert len(base_rows) == k and (max_budgets is None or len(max_budgets) == k)
    if k == 0:
        return BudgetSplit((), 0.0, 0.0)
    caps = [len(g) if max_budgets is None else max(0, min(len(g), max_budgets[i])) for i, g in enumerate(gains)]
    clipped = [np.clip(np.asarray(g[:c], dtype=np.float64), 0.0, 1.0) for g, c in zip(gains, caps)]
    cumulative = [np.concatenate(([0.0], np.add.accumulate(g))) for g in clipped]  # tokens gained by b nodes
    rows = int(sum(base_rows))
    setup = np.zeros(k) if setup_s is None else np.maximum(0.0, np.asarray(setup_s, dtype=np.float64))
    assert setup.shape == (k,)

    value = np.concatenate(clipped)
    owner = np.concatenate([np.full(c, i) for i, c in enumerate(caps)]).astype(np.int64)
    rank = np.concatenate([np.arange(c) for c in caps]).astype(np.int64)
    order = np.lexsort((rank, owner, -value))  # by gain descending, then session, then node
    owner_sorted = owner[order]
    tokens = k + np.concatenate(([0.0], np.add.accumulate(value[order])))
    # each session's candidates come in node order, so a prefix's largest tree is its deepest rank
    largest = np.concatenate(([0], np.maximum.accumulate(rank[order] + 1))) if len(order) else np.zeros(1, np.int64)
    first = np.zeros(len(order), dtype=np.int64)  # 1 where a candidate makes its session draft at all
    first[np.unique(owner_sorted, return_index=True)[1]] = 1
    drafting = np.concatenate(([0], np.add.accumulate(first)))
    setups = np.concatenate(([0.0], np.add.accumulate(first * setup[owner_sorted])))
    nodes = np.arange(len(order) + 1)
    rate = tokens / np.maximum(cost.round_s(drafting, nodes, rows + nodes, largest) + setups, 1e-9)
    n = int(rate.argmax())
    budgets = np.bincount(owner_sorted[:n], minlength=k).astype(np.int64)
    best = float(rate[n])

    for _ in range(4 * k):  # coordinate ascent; converges in a few passes
        moved = False
        for i in range(k):
            others_nodes = int(budgets.sum() - budgets[i])
            others_tokens = k + sum(float(cumulative[j][budgets[j]]) for j in range(k) if j != i)
            others_drafting = int(np.count_nonzero(budgets)) - int(budgets[i] > 0)
            others_setup = float(setup[budgets > 0].sum()) - (setup[i] if budgets[i] > 0 else 0.0)
            others_largest = int(max((budgets[j] for j in range(k) if j != i), default=0))
            b = np.arange(caps[i] + 1)
            seconds = (cost.round_s(others_drafting + (b > 0), others_nodes + b, rows + others_nodes + b,
                                    np.maximum(others_largest, b))
                       + others_setup + setup[i] * (b > 0))
            rates = (others_tokens + cumulative[i]) / np.maximum(seconds, 1e-9)
            j = int(rates.argmax())
            if rates[j] > best * (1 + 1e-12) and j != budgets[i]:
                budgets[i], best, moved = j, float(rates[j]), True
        if not moved:
            break
    total_tokens = k + sum(float(cumulative[i][budgets[i]]) for i in range(k))
    return BudgetSplit(tuple(int(b) for b in budgets), total_tokens, best)
