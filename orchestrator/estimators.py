"""Online estimates that feed the budget policy, updated once per round from measured timings.

Everything here is plain arithmetic over numbers the draft worker already has: no models, no
sockets, so it is tested with synthetic rounds.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from orchestrator.policy import BudgetChoice, CostModel, choose_budget


# Sizes tried on dither rounds, relative to the choice: a spread of 16x (not 4x) keeps the
# per-node slopes identifiable when round times are noisy, and shows the value profile at ranks
# the choice alone never reaches.
_DITHER_SCALES = (2.0, 0.5, 4.0, 0.25)


class Ewma:
    def __init__(self, alpha: float, initial: float | None = None):
        self.alpha, self.value = alpha, initial

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        return self.value


class LinearFit:
    """Exponentially weighted least squares of y = a + b*x with b >= 0 (costs grow with size)."""

    def __init__(self, decay: float = 0.95, prior_a: float = 0.0, prior_b: float = 0.0):
        self.decay = decay
        # a weak prior keeps the fit defined before two distinct sizes were seen
        self.sw, self.sx, self.sy, self.sxx, self.sxy = 1e-3, 0.0, 1e-3 * prior_a, 0.0, 0.0
        self.prior_b = prior_b

    def update(self, x: float, y: float) -> None:
        d = self.decay
        self.sw = d * self.sw + 1
        self.sx = d * self.sx + x
        self.sy = d * self.sy + y
        self.sxx = d * self.sxx + x * x
        self.sxy = d * self.sxy + x * y

    def coefficients(self) -> tuple[float, float]:
        var = self.sxx * self.sw - self.sx ** 2
        b = (self.sxy * self.sw - self.sx * self.sy) / var if var > 1e-9 * max(1.0, self.sw ** 2) else self.prior_b
        b = max(0.0, b)
        a = max(0.0, (self.sy - b * self.sx) / self.sw)
        return a, b

    def __call__(self, x: float) -> float:
        a, b = self.coefficients()
        return a + b * x


class ValueCalibration:
    """Isotonic map from a node's draft value to its observed acceptance frequency.

    Values are bucketed by log2; each bucket keeps decayed (accepted, seen) counts, shrunk towards
    a prior of rho * value, where rho = (accepted nodes) / (sum of node values) over all nodes:
    DySpec's surrogate (acceptance ~ draft value) rescaled by one well-estimated number. Sparse
    buckets (rarely drafted values) thus follow the surrogate instead of a few noisy samples. The
    map is made monotone by pool-adjacent-violators weighted by counts.
    """

    def __init__(self, buckets: int = 24, decay: float = 0.995, prior_weight: float = 4.0):
        self.buckets = buckets
        self.decay = decay
        self.prior_weight = prior_weight
        self.accepted = [0.0] * buckets
        self.seen = [0.0] * buckets
        self.value_mass = [0.0] * buckets  # sum of values seen per bucket (for the prior mean)
        self.total_accepted = 1.0  # rho starts at 1: the surrogate as is
        self.total_value = 1.0
        self._table = None

    def _bucket(self, v: float) -> int:
        if v <= 0:
            return self.buckets - 1
        return min(self.buckets - 1, int(-math.log2(min(1.0, v))))

    @staticmethod
    def _center(i: int) -> float:
        return 2.0 ** (-i - 0.5)

    @property
    def rho(self) -> float:
        return min(1.5, self.total_accepted / self.total_value)

    def observe(self, values: list[float], accepted: list[bool]) -> None:
        d = self.decay
        self.accepted = [a * d for a in self.accepted]
        self.seen = [s * d for s in self.seen]
        self.value_mass = [m * d for m in self.value_mass]
        self.total_accepted *= d
        self.total_value *= d
        for v, ok in zip(values, accepted):
            i = self._bucket(v)
            self.seen[i] += 1
            self.value_mass[i] += v
            self.accepted[i] += 1.0 if ok else 0.0
            self.total_accepted += 1.0 if ok else 0.0
            self.total_value += v
        self._table = None

    def __call__(self, v: float) -> float:
        if self._table is None:
            k, rho = self.prior_weight, self.rho
            num, den = [], []
            for i in range(self.buckets):
                mean_v = self.value_mass[i] / self.seen[i] if self.seen[i] > 0 else self._center(i)
                num.append(self.accepted[i] + k * min(1.0, rho * mean_v))
                den.append(self.seen[i] + k)
            self._table = _non_increasing_fit(num, den)  # bucket 0: highest values
        return self._table[self._bucket(v)]


def _non_increasing_fit(num: list[float], den: list[float]) -> list[float]:
    """Weighted least-squares non-increasing fit of num/den (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [sum num, sum den, count]
    for a, s in zip(num, den):
        blocks.append([a, s, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            a2, s2, c2 = blocks.pop()
            blocks[-1][0] += a2
            blocks[-1][1] += s2
            blocks[-1][2] += c2
    out = []
    for a, s, c in blocks:
        out += [a / s] * c
    return out


@dataclass
class RoundObservation:
    """What one finished round measured (seconds)."""

    budget: int
    node_values: list[float]  # values of the tree's nodes
    node_accepted: list[bool]  # whether each node was on the accepted path
    round_s: float  # wall time of the round as the draft saw it
    draft_s: float  # draft forwards + tree building
    target_s: float  # the target's own reported time (queue + forward + verify + commit)
    wire_s: float = 0.0  # serialisation measured on the draft side


@dataclass
class BudgetTuner:
    """Per-stream online tuner: observe rounds, then ask for the next budget."""

    max_budget: int = 128
    min_budget: int = 0
    probe_every: int = 16  # rounds between probes of a budget the model currently rejects
    dither_every: int = 4  # every so many rounds, try half or double the chosen budget
    value_profile: list[float] = field(default_factory=list)  # decayed mean value per rank
    rounds: int = 0

    def __post_init__(self):
        self.network = Ewma(0.2)
        self.verify = LinearFit()
        self.draft = LinearFit()
        self.wire = LinearFit()
        self.calibration = ValueCalibration()
        self.last_choice: BudgetChoice | None = None
        # a target forward never gets cheaper than the cheapest recent one: floors the linear fit,
        # whose intercept can fall to 0 when only large trees were seen lately
        self.recent_target_s: deque[float] = deque(maxlen=64)

    def observe(self, obs: RoundObservation) -> None:
        self.rounds += 1
        self.network.update(max(0.0, obs.round_s - obs.target_s - obs.draft_s - obs.wire_s))
        self.verify.update(len(obs.node_values), obs.target_s)
        self.recent_target_s.append(obs.target_s)
        if obs.budget > 0:
            self.draft.update(len(obs.node_values), obs.draft_s)
            self.wire.update(len(obs.node_values), obs.wire_s)
        ranked = sorted(obs.node_values, reverse=True)
        for i, v in enumerate(ranked):
            if i < len(self.value_profile):
                self.value_profile[i] += 0.2 * (v - self.value_profile[i])
            else:
                self.value_profile.append(v)
        self.calibration.observe(obs.node_values, obs.node_accepted)

    def _values(self) -> list[float]:
        """Observed value profile, extended past the largest tree seen by a power-law tail."""
        prof = list(self.value_profile)
        if not prof:
            return [0.5 ** (i + 1) for i in range(self.max_budget)]
        n = len(prof)
        if n >= 4 and prof[-1] > 0 and prof[n // 2 - 1] > 0:
            slope = math.log(prof[-1] / prof[n // 2 - 1]) / math.log(n / (n // 2))
        else:
            slope = -1.0
        slope = min(slope, -0.5)  # values must keep falling
        while len(prof) < self.max_budget:
            prof.append(prof[n - 1] * ((len(prof) + 1) / n) ** slope)
        return prof

    def cost_model(self) -> CostModel:
        d0, d1 = self.draft.coefficients()
        _, w1 = self.wire.coefficients()
        floor = min(self.recent_target_s, default=0.0)
        return CostModel(network_s=self.network.value or 0.0, draft_fixed_s=d0, draft_per_node_s=d1,
                         wire_per_node_s=w1, verify_s=lambda n: max(floor, self.verify(n)))

    def next_budget(self) -> int:
        if self.rounds == 0:
            return min(self.max_budget, max(self.min_budget, 8))  # a first measurement point
        choice = choose_budget(self._values(), self.calibration, self.cost_model(), self.max_budget, self.min_budget)
        self.last_choice = choice
        if choice.budget == 0 and self.probe_every and self.rounds % self.probe_every == 0:
            return min(self.max_budget, max(1, self.min_budget, 4))  # keep measuring the draft
        if choice.budget > 0 and self.dither_every and self.rounds % self.dither_every == 0:
            # Persistent excitation: trees of one size leave the per-node cost slopes unidentified
            # (the fits then see draft and verify cost as flat and over-draft). Alternating half and
            # double the choice on a few rounds spreads the sizes the fits learn from.
            scale = _DITHER_SCALES[(self.rounds // self.dither_every) % len(_DITHER_SCALES)]
            return min(self.max_budget, max(self.min_budget, 1, round(choice.budget * scale)))
        return choice.budget
