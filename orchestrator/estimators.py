"""Online estimates that feed the budget policy, updated once per round from measured timings.

Everything here is plain arithmetic over numbers the draft worker already has: no models, no
sockets, so it is tested with synthetic rounds.

It runs on every round of every stream, and a plain decoding round on a fast link takes about
2.5 ms, so the tuner's own work must stay in the tens of microseconds: per-node work is numpy over
small arrays, derived once per round (`RoundObservation.nodes`) though two tuners observe it; the
cost curve is evaluated as arrays from the fitted lines (fitted once per update); what depends on
the draft-side estimates only is cached until they change (tests/test_budget_policy.py checks the
choices against a from-scratch scalar computation).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Sequence

import numpy as np

from orchestrator.policy import BudgetChoice, best_budget


# Sizes tried on dither rounds, relative to the choice: a spread of 16x (not 4x) keeps the
# per-node slopes identifiable when round times are noisy, and shows the value profile at ranks
# the choice alone never reaches.
_DITHER_SCALES = (2.0, 0.5, 4.0, 0.25)
SPREAD_CV = 0.3  # tree sizes varying this much (std / mean, decayed) need no dither round


class Ewma:
    def __init__(self, alpha: float, initial: float | None = None):
        self.alpha, self.value = alpha, initial

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        return self.value


class LinearFit:
    """Exponentially weighted least squares of y = a + b*x with b >= 0 (costs grow with size).

    While every size seen was the same, the data cannot tell a fixed cost from a per-size one, and
    the fit takes a guess:
    - one_size_slope None: the line runs through the origin (the whole cost grows with size), by a
      weak point at (0, 0) that decays with the data. The cautious guess for a cost the tuner grows
      a tree against: after one round of 8 nodes it tries a few more, not max_budget.
    - one_size_slope s: slope s through the data's mean, shrunk away by a ridge term worth 1e-3 of a
      point one mean away from the mean x as soon as sizes spread. For a cost that barely grows
      with size, such as a target's batch of plain rows (memory-bound: the weights are read once):
      through the origin, one-session plain batches at a burst's start (~0.17 s) priced four
      sessions at 0.7-0.8 s where they took ~0.2 s.
    """

    ORIGIN_WEIGHT = 1e-3
    RIDGE = 1e-3

    def __init__(self, decay: float = 0.95, one_size_slope: float | None = None):
        self.decay = decay
        self.sw = self.sx = self.sy = self.sxx = self.sxy = 0.0  # decayed sums over the data
        self.origin_weight = self.ORIGIN_WEIGHT if one_size_slope is None else 0.0
        self.one_size_slope = one_size_slope
        self._coefficients: tuple[float, float] | None = None  # until the next update

    def update(self, x: float, y: float) -> None:
        d = self.decay
        self.origin_weight *= d
        self.sw = d * self.sw + 1
        self.sx = d * self.sx + x
        self.sy = d * self.sy + y
        self.sxx = d * self.sxx + x * x
        self.sxy = d * self.sxy + x * y
        self._coefficients = None

    def x_mean_std(self) -> tuple[float, float]:
        """The decayed mean and standard deviation of the x values fitted so far (0, 0 before any)."""
        if self.sw == 0:
            return 0.0, 0.0
        mean = self.sx / self.sw
        return mean, math.sqrt(max(0.0, self.sxx / self.sw - mean * mean))

    def coefficients(self) -> tuple[float, float]:
        if self._coefficients is None:
            self._coefficients = self._through_origin() if self.one_size_slope is None else self._ridge()
        return self._coefficients

    def _through_origin(self) -> tuple[float, float]:
        sw = self.sw + self.origin_weight
        var = self.sxx * sw - self.sx ** 2
        b = (self.sxy * sw - self.sx * self.sy) / var if var > 1e-9 * max(1.0, sw ** 2) else 0.0
        b = max(0.0, b)
        return max(0.0, (self.sy - b * self.sx) / sw), b

    def _ridge(self) -> tuple[float, float]:
        if self.sw == 0:
            return 0.0, self.one_size_slope
        mean_x, mean_y = self.sx / self.sw, self.sy / self.sw
        # centred sums; sxx_c is clamped: rounding can leave it a hair below 0 for one size
        sxx_c = max(0.0, self.sxx - self.sx * mean_x)
        sxy_c = self.sxy - self.sx * mean_y
        ridge = self.RIDGE * max(1.0, mean_x * mean_x)
        b = max(0.0, (sxy_c + ridge * self.one_size_slope) / (sxx_c + ridge))
        return max(0.0, mean_y - b * mean_x), b


VALUE_BUCKETS = 24  # calibration buckets: octaves of a node's value, 2**-23 and below sharing the last
_BUCKET_EDGES = 2.0 ** -np.arange(VALUE_BUCKETS - 1, 0, -1)  # (VALUE_BUCKETS - 1,) 2**-23, ..., 2**-1


def value_buckets(values: np.ndarray) -> np.ndarray:
    """(n,) int64 calibration bucket of each value: floor(-log2 v) for v in (2**-23, 1], 0 above 1,
    VALUE_BUCKETS - 1 at or below 2**-23 (and at or below 0). Exact: compares with powers of two."""
    return (VALUE_BUCKETS - 1) - np.searchsorted(_BUCKET_EDGES, values)


class NodeStats(NamedTuple):
    """What the estimators take from one round's nodes."""

    values: np.ndarray  # (n,) float64 node values, in the tree's node order (creation order)
    bucket_sums: np.ndarray  # (3, VALUE_BUCKETS) float64 per value bucket: nodes seen, sum of values, nodes accepted
    accepted: float  # nodes accepted
    value: float  # sum of the node values

    @staticmethod
    def of(values: Sequence[float], accepted: Sequence[bool]) -> NodeStats:
        if not len(values):
            return _NO_NODES
        v = np.asarray(values, dtype=np.float64)
        idx = value_buckets(v)
        sums = np.empty((3, VALUE_BUCKETS))
        sums[0] = np.bincount(idx, minlength=VALUE_BUCKETS)
        sums[1] = np.bincount(idx, weights=v, minlength=VALUE_BUCKETS)
        sums[2] = np.bincount(idx, weights=np.asarray(accepted, dtype=np.float64), minlength=VALUE_BUCKETS)
        return NodeStats(v, sums, float(sum(accepted)), float(sum(values)))


_NO_NODES = NodeStats(np.zeros(0), np.zeros((3, VALUE_BUCKETS)), 0.0, 0.0)


class ValueCalibration:
    """Isotonic map from a node's draft value to its observed acceptance frequency.

    Values are bucketed by log2; each bucket keeps decayed (accepted, seen) counts, shrunk towards
    a prior of rho * value, where rho = (accepted nodes) / (sum of node values) over all nodes:
    DySpec's surrogate (acceptance ~ draft value) rescaled by one well-estimated number. Sparse
    buckets (rarely drafted values) thus follow the surrogate instead of a few noisy samples. The
    map is made monotone by pool-adjacent-violators weighted by counts.
    """

    # A round without nodes only decays the counts, which moves the map towards the prior: by at
    # most (1 - D) / (4 D) per entry after a total decay D. The fit being the costliest step of a
    # plain round, the map is refitted when nodes came in, and otherwise only once the counts
    # decayed by more than this fraction since the last fit: at decay 0.995, on every 5th plain
    # round, the map in use lagging by at most 4 rounds of decay (entries off by < 0.0051).
    refit_after_decay = 0.02

    def __init__(self, decay: float = 0.995, prior_weight: float = 4.0, min_evidence: float = 50.0):
        self.decay = decay
        self.prior_weight = prior_weight
        # Forgetting stops at this many nodes of evidence: while plain decoding is best, nodes come
        # only from the rare probes, and forgetting on every round would leave a handful of nodes to
        # estimate acceptance from, too noisy to see in time that a slower link makes drafting pay.
        # Drafting rounds keep far more (the nodes of the last ~1 / (1 - decay) rounds).
        self.min_evidence = min_evidence
        self._evidence = 0.0  # decayed count of the nodes seen, counts[0].sum()
        # (3, VALUE_BUCKETS) decayed, per bucket (bucket 0: the highest values): nodes seen, the sum
        # of their values (for the prior mean), nodes accepted; one array, one decay per round
        self.counts = np.zeros((3, VALUE_BUCKETS))
        self.total_accepted = 1.0  # rho starts at 1: the surrogate as is
        self.total_value = 1.0
        self._centers = 2.0 ** (-np.arange(VALUE_BUCKETS) - 0.5)  # a bucket's mean value before it saw one
        self._table: np.ndarray | None = None
        self._decayed_since_fit = 1.0  # product of the decays since _table was fitted

    @property
    def rho(self) -> float:
        return min(1.5, self.total_accepted / self.total_value)

    def observe(self, values: Sequence[float], accepted: Sequence[bool]) -> None:
        self.observe_nodes(NodeStats.of(values, accepted))

    def observe_nodes(self, nodes: NodeStats) -> None:
        d = self.decay
        if self._evidence * d < self.min_evidence:  # forget no further than min_evidence
            d = min(1.0, self.min_evidence / self._evidence) if self._evidence > 0 else 1.0
        self._evidence = self._evidence * d + len(nodes.values)
        self.counts *= d
        self.total_accepted = self.total_accepted * d + nodes.accepted
        self.total_value = self.total_value * d + nodes.value
        self._decayed_since_fit *= d
        if len(nodes.values):
            self.counts += nodes.bucket_sums
            self._table = None
        elif self._decayed_since_fit < 1.0 - self.refit_after_decay:
            self._table = None

    def table(self) -> np.ndarray:
        """(VALUE_BUCKETS,) expected acceptance of a node in each bucket: non-increasing, in [0, 1]."""
        if self._table is None:
            seen, mass, accepted = self.counts
            mean_v = np.divide(mass, seen, out=self._centers.copy(), where=seen > 0)
            # node values are probabilities, so the prior lies in [0, 1]; a bucket accepts at most
            # the nodes it saw, so every ratio, and the pooled fit, lies in [0, 1] too
            prior = np.minimum(self.rho * mean_v, 1.0)
            self._table = _non_increasing_fit(accepted + self.prior_weight * prior, seen + self.prior_weight)
            self._decayed_since_fit = 1.0
        return self._table

    def __call__(self, v: float) -> float:
        return float(self.table()[value_buckets(v)])


def _non_increasing_fit(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-increasing fit of num/den (pool-adjacent-violators); den > 0."""
    fit = num / den
    rises = np.flatnonzero(fit[1:] > fit[:-1])  # i where fit[i + 1] > fit[i]
    if not len(rises):
        return fit
    # Usually some rise: observed buckets fall below the prior of the unseen ones next to them.
    # Pool in plain Python (blocks as parallel lists, means compared by cross-multiplying), and only
    # as far as needed: past the last rise the ratios fall, so from the first one there that is
    # not above the last block's mean on, they stay as they are.
    nums, dens, last_rise = num.tolist(), den.tolist(), int(rises[-1]) + 1
    sums: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    i = 0
    while i < len(nums) and (i <= last_rise or sums[-1] * dens[i] < nums[i] * weights[-1]):
        a, s, size = nums[i], dens[i], 1
        while sums and sums[-1] * s < a * weights[-1]:  # the previous block's mean is below this one's
            a += sums.pop()
            s += weights.pop()
            size += sizes.pop()
        sums.append(a)
        weights.append(s)
        sizes.append(size)
        i += 1
    fit[:i] = [a / s for a, s, size in zip(sums, weights, sizes) for _ in range(size)]
    return fit


@dataclass(frozen=True)
class RoundObservation:
    """What one finished round measured (seconds). Frozen, so `nodes` is derived once."""

    budget: int
    node_values: list[float]  # values of the tree's nodes
    node_accepted: list[bool]  # whether each node was on the accepted path
    round_s: float  # wall time of the round as the draft saw it
    draft_s: float  # draft forwards + tree building
    target_s: float  # the target's own reported time (queue + forward + verify + commit)
    wire_s: float = 0.0  # serialisation measured on the draft side
    # overlapped rounds (dyspec.overlap): whether this round's tree was drafted ahead while the
    # previous round was verified and then kept (True) or abandoned (False); None: not drafted ahead
    kept_ahead: bool | None = None

    @cached_property
    def nodes(self) -> NodeStats:
        return NodeStats.of(self.node_values, self.node_accepted)


@dataclass
class BudgetTuner:
    """Per-stream online tuner: observe rounds, then ask for the next budget."""

    max_budget: int = 128
    min_budget: int = 0
    # While plain decoding is the choice, a few-node tree is drafted now and then (a probe) to keep
    # acceptance and draft cost measured. A probe is a whole tree round: on a fast link it costs
    # several plain rounds (a probe every 16 rounds cost ~6% exactly where drafting does not pay),
    # on a slow link little more than one. So probes are spaced, as the cost model predicts, to
    # take about probe_overhead of the time, at least probe_every and at most probe_max_every plain
    # rounds apart; a longer round trip shortens the gap at once (the network estimate moves on
    # plain rounds too).
    probe_every: int = 16
    probe_max_every: int = 128
    probe_overhead: float = 0.02
    dither_every: int = 4  # every so many rounds, try half or double the chosen budget
    rounds: int = 0

    def __post_init__(self):
        self.network = Ewma(0.2)
        self.verify = LinearFit()
        self.draft = LinearFit()
        self.wire = LinearFit()
        self.calibration = ValueCalibration()
        # fraction of drafted-ahead trees kept: that share of a round's drafting hides behind the
        # previous verification (0 until an overlapped round was seen: serial rounds)
        self.kept_ahead = Ewma(0.1, 0.0)
        self.last_choice: BudgetChoice | None = None
        # a target forward never gets cheaper than the cheapest recent one: floors the linear fit,
        # whose intercept can fall to 0 when only large trees were seen lately
        self.recent_target_s: deque[float] = deque(maxlen=64)
        # decayed mean value of the tree's i-th node in creation order (the first _profile_len
        # entries: the largest tree seen). Not of the i-th largest value: the builders grow trees
        # best slot first, so the first B nodes of a bigger tree are (in distribution) the B-node
        # tree, and a node index means the same thing at every budget. Sorted values do not nest:
        # a drawn child can be improbable, so a small tree's sorted values sit below a big tree's
        # at every rank, and a profile learnt from small trees priced big ones far too low (on the
        # tiny pair at 5 ms the tuner chose 0-3 nodes where 16 were 1.3x faster).
        self._profile = np.zeros(self.max_budget)
        self._profile_len = 0
        self._value_buckets: np.ndarray | None = None  # value_buckets(self._values()), until the profile moves
        self._sizes = np.arange(self.max_budget + 1, dtype=np.float64)  # (max_budget + 1,) 0, 1, ..., max_budget
        self._last_tree_round = 0  # `rounds` when the last round with budget > 0 was observed

    def observe(self, obs: RoundObservation) -> None:
        self.rounds += 1
        n = len(obs.node_values)
        # A kept drafted-ahead tree ran beside the previous verification: the round is then about
        # max(draft, target + network), so what it shows of the network is what exceeds both
        drafting = max(obs.draft_s, obs.target_s) - obs.target_s if obs.kept_ahead else obs.draft_s
        self.network.update(max(0.0, obs.round_s - obs.target_s - drafting - obs.wire_s))
        self.verify.update(n, obs.target_s)
        self.recent_target_s.append(obs.target_s)
        if obs.budget > 0:
            self.draft.update(n, obs.draft_s)
            self.wire.update(n, obs.wire_s)
            self._last_tree_round = self.rounds
        if n:
            self._update_profile(obs.nodes.values)
        self.calibration.observe_nodes(obs.nodes)
        if obs.kept_ahead is not None:
            self.kept_ahead.update(1.0 if obs.kept_ahead else 0.0)

    def _update_profile(self, values: np.ndarray) -> None:
        n, known = len(values), self._profile_len
        if n > len(self._profile):  # a tree larger than max_budget (made under another cap)
            self._profile = np.concatenate((self._profile, np.zeros(n - len(self._profile))))
        k = min(n, known)
        self._profile[:k] += 0.2 * (values[:k] - self._profile[:k])
        if n > known:  # ranks not seen before start at their first value
            self._profile[known:n] = values[known:n]
            self._profile_len = n
        self._value_buckets = None

    def _values(self) -> np.ndarray:
        """(max_budget,) observed value profile, extended past the largest tree seen by a power-law tail."""
        n = self._profile_len
        if n == 0:
            return 0.5 ** self._sizes[1:]
        prof = self._profile[:n]
        if n >= self.max_budget:
            return prof[:self.max_budget]
        if n >= 4 and prof[-1] > 0 and prof[n // 2 - 1] > 0:
            slope = math.log(prof[-1] / prof[n // 2 - 1]) / math.log(n / (n // 2))
        else:
            slope = -1.0
        slope = min(slope, -0.5)  # values must keep falling
        return np.concatenate((prof, prof[-1] * (self._sizes[n + 1:] / n) ** slope))

    def gains(self) -> np.ndarray:
        """(max_budget,) predicted acceptance of the i-th best node: the calibrated value profile."""
        if self._value_buckets is None:
            self._value_buckets = value_buckets(self._values())
        return self.calibration.table()[self._value_buckets]

    def round_s(self) -> np.ndarray:
        """(max_budget + 1,) predicted seconds of a round of each size: the policy's CostModel,
        network + draft + wire + verify, with the fitted lines, evaluated as arrays."""
        d0, d1 = self.draft.coefficients()
        _, w1 = self.wire.coefficients()
        v0, v1 = self.verify.coefficients()
        floor = min(self.recent_target_s, default=0.0)
        network = self.network.value or 0.0
        b = self._sizes
        link = np.maximum(v0 + v1 * b, floor) + network + w1 * b  # what the target side costs
        draft = d0 + d1 * b
        # Overlapped rounds: a kept tree was drafted while the previous verification ran, so the
        # round costs max(draft, link) then; an abandoned one costs draft + link. Expected:
        # draft + link - kept * min(draft, link) (kept = 0 for serial rounds: the plain sum).
        curve = link + draft - (self.kept_ahead.value or 0.0) * np.minimum(draft, link)
        curve[0] = network + max(floor, v0)  # plain decoding drafts nothing
        return curve

    def _sizes_spread(self) -> bool:
        """Whether the tree sizes the draft-cost fit remembers (decayed) vary enough to tell a per-node
        cost from a fixed one: a coefficient of variation of at least SPREAD_CV (one 4x dither among
        twenty rounds of one size gives ~0.57; one 2x dither ~0.2)."""
        if self.draft.sw < 2:
            return False
        mean, std = self.draft.x_mean_std()
        return mean > 0 and std >= SPREAD_CV * mean

    def _probe_gap(self, round_s: np.ndarray, probe: int) -> float:
        """Plain rounds between probes: probes take about probe_overhead of the time, bounded."""
        extra = (round_s[probe] - round_s[0]) / max(round_s[0], 1e-9)  # a probe's extra time, in plain rounds
        return max(self.probe_every, min(self.probe_max_every, extra / self.probe_overhead))

    def next_budget(self) -> int:
        if self.rounds == 0:
            return min(self.max_budget, max(self.min_budget, 8))  # a first measurement point
        round_s = self.round_s()
        choice = best_budget(self.gains(), round_s, self.min_budget)
        self.last_choice = choice
        if choice.budget == 0:
            probe = min(self.max_budget, max(1, self.min_budget, 4))
            if self.probe_every and self.rounds - self._last_tree_round >= self._probe_gap(round_s, probe):
                return probe  # keep measuring the draft
            return 0
        if self.dither_every and self.rounds % self.dither_every == 0 and not self._sizes_spread():
            # Persistent excitation: trees of one size leave the per-node cost slopes unidentified
            # (the fits then see draft and verify cost as flat and over-draft). Alternating half and
            # double the choice on a few rounds spreads the sizes the fits learn from; only while the
            # sizes the fit remembers lack that spread, because a dither round is a round off the
            # best size (a 4x one drafted 32 nodes for 21 tokens in 601 ms on a code prompt where 8
            # cost ~150 ms): every 4th round of a 15-round request was one.
            scale = _DITHER_SCALES[(self.rounds // self.dither_every) % len(_DITHER_SCALES)]
            return min(self.max_budget, max(self.min_budget, 1, round(choice.budget * scale)))
        return choice.budget
