"""The budget policy and its online tuner, without models or networks (synthetic rounds)."""
from __future__ import annotations

import copy
import math
import random
import statistics

import numpy as np
import pytest

from orchestrator.estimators import (BudgetTuner, LinearFit, RoundObservation, ValueCalibration, _non_increasing_fit,
                                     value_buckets)
from orchestrator.policy import CostModel, choose_budget


def power_values(n=512, top=0.8, slope=-0.9):
    return [top * (i + 1) ** slope for i in range(n)]


def cost(network_s, verify=lambda n: 0.3 + 0.003 * max(0, n - 10)):
    return CostModel(network_s=network_s, draft_fixed_s=0.01, draft_per_node_s=0.002, wire_per_node_s=0.0001,
                     verify_s=verify)


def true_rate(values, calib, c: CostModel, b):
    return (1 + sum(min(1.0, calib(v)) for v in values[:b])) / c.round_s(b)


def test_larger_rtt_gives_larger_budgets():
    values = power_values()
    budgets = [choose_budget(values, lambda v: v, cost(rtt), 256).budget for rtt in (0.0, 0.005, 0.02, 0.05, 0.1, 0.5, 2.0)]
    assert budgets == sorted(budgets), budgets
    assert budgets[-1] > budgets[0], budgets


def test_useless_draft_means_plain_decoding():
    assert choose_budget(power_values(), lambda v: 0.0, cost(0.05), 256).budget == 0


def test_choice_is_the_argmax_on_convex_curves():
    """Exact scan: on several convex verification curves the choice equals brute force."""
    values = power_values()
    curves = [lambda n: 0.3 + 0.02 * max(0, n - 10), lambda n: 0.1 + 0.001 * n + 1e-5 * n * n,
              lambda n: 0.05 + 0.004 * n]
    for verify in curves:
        for rtt in (0.0, 0.01, 0.1):
            c = cost(rtt, verify)
            choice = choose_budget(values, lambda v: v, c, 256)
            best = max(range(257), key=lambda b: true_rate(values, lambda v: v, c, b))
            assert choice.budget == best
            assert choice.tokens_per_s == pytest.approx(true_rate(values, lambda v: v, c, best))


def test_linear_fit_recovers_a_line_and_clamps_negative_slopes():
    fit = LinearFit(decay=1.0)
    for x in (1, 5, 9, 30):
        fit.update(x, 0.2 + 0.01 * x)
    a, b = fit.coefficients()
    assert a == pytest.approx(0.2, abs=1e-3) and b == pytest.approx(0.01, abs=1e-4)
    down = LinearFit(decay=1.0)
    for x in (1, 10):
        down.update(x, 1.0 - 0.01 * x)
    assert down.coefficients()[1] == 0.0


def test_linear_fit_of_one_size_takes_its_guess_until_sizes_spread():
    cautious = LinearFit()  # the tuner's: one size seen, the whole cost grows with size
    assert cautious.coefficients() == (0.0, 0.0)
    for _ in range(30):
        cautious.update(8, 0.16)
    a, b = cautious.coefficients()
    assert a == pytest.approx(0.0, abs=1e-9) and b == pytest.approx(0.02)
    # a target's plain batches of one session each (a burst's first rounds): 4 rows must not be
    # priced at 4x one row's time
    flat = LinearFit(one_size_slope=0.0)
    for _ in range(30):
        flat.update(1, 0.17)
    a, b = flat.coefficients()
    assert b == 0.0 and a == pytest.approx(0.17)
    sloped = LinearFit(one_size_slope=0.002)
    assert sloped.coefficients() == (0.0, 0.002)
    for _ in range(30):
        sloped.update(10, 0.3)
    a, b = sloped.coefficients()
    assert b == pytest.approx(0.002) and a + 10 * b == pytest.approx(0.3)
    # one other size, then five rounds of the first: the slope is already the data's
    sloped.update(20, 0.35)
    for _ in range(5):
        sloped.update(10, 0.3)
    assert sloped.coefficients()[1] == pytest.approx(0.005, rel=0.15)


def test_calibration_learns_a_monotone_map():
    cal = ValueCalibration(decay=1.0, prior_weight=0.1)
    rng = random.Random(0)
    values = [rng.random() for _ in range(20000)]
    cal.observe(values, [rng.random() < 0.5 * v for v in values])
    for v in (0.9, 0.3, 0.05):
        assert cal(v) == pytest.approx(0.5 * v, abs=0.12)
    assert cal(0.9) >= cal(0.3) >= cal(0.05)


class SyntheticPipeline:
    """A draft/target pair with known value curve, acceptance and costs, with 5% timing noise."""

    def __init__(self, network_s, accept_scale=1.0, seed=0,
                 verify=lambda n: 0.3 + 0.003 * max(0, n - 10)):
        self.rng = random.Random(seed)
        self.values = power_values()
        self.accept_scale = accept_scale
        self.cost = cost(network_s, verify)

    def run(self, budget):
        vals = self.values[:budget]
        accepted = [self.rng.random() < self.accept_scale * v for v in vals]
        noise = lambda x: x * self.rng.uniform(0.95, 1.05)
        draft = 0.0 if budget == 0 else noise(self.cost.draft_fixed_s + self.cost.draft_per_node_s * budget)
        target = noise(self.cost.verify_s(budget))
        wire = self.cost.wire_per_node_s * budget
        round_s = draft + target + wire + noise(self.cost.network_s)
        return RoundObservation(budget, vals, accepted, round_s, draft, target, wire)

    def true_rate(self, b):
        return true_rate(self.values, lambda v: self.accept_scale * v, self.cost, b)


def steady_budget(pipe: SyntheticPipeline, rounds=300, max_budget=256) -> int:
    tuner = BudgetTuner(max_budget=max_budget, probe_every=0)
    chosen = []
    for _ in range(rounds):
        b = tuner.next_budget()
        chosen.append(b)
        tuner.observe(pipe.run(b))
    return int(statistics.median(chosen[-100:]))


@pytest.mark.parametrize("network_s", [0.0, 0.005, 0.02, 0.05, 0.1])
@pytest.mark.parametrize("curve", ["hinge", "quadratic"])
def test_tuner_reaches_95_percent_of_best_fixed_budget(network_s, curve):
    verify = {"hinge": lambda n: 0.3 + 0.003 * max(0, n - 10),
              "quadratic": lambda n: 0.1 + 0.001 * n + 2e-5 * n * n}[curve]
    pipe = SyntheticPipeline(network_s, verify=verify)
    b = steady_budget(pipe)
    best = max(pipe.true_rate(x) for x in range(257))
    assert pipe.true_rate(b) >= 0.95 * best, (b, pipe.true_rate(b) / best)


def test_tuner_budget_grows_with_network_delay():
    budgets = [steady_budget(SyntheticPipeline(d, seed=1)) for d in (0.0, 0.05, 0.5)]
    assert budgets[0] < budgets[-1] and budgets == sorted(budgets), budgets


def test_useless_draft_falls_back_within_5_percent_of_plain_decoding():
    """A draft whose trees are never accepted: the tuner must go to budget 0 (probing rarely), and
    lose at most 5% against plain decoding over the run."""
    pipe = SyntheticPipeline(0.02, accept_scale=0.0, seed=2)
    tuner = BudgetTuner(max_budget=128, probe_every=32)
    tokens, seconds, budgets = 0, 0.0, []
    for _ in range(400):
        b = tuner.next_budget()
        budgets.append(b)
        obs = pipe.run(b)
        tuner.observe(obs)
        tokens += 1 + sum(obs.node_accepted)
        seconds += obs.round_s
    plain = pipe.true_rate(0)
    assert budgets[-50:].count(0) >= 45
    assert tokens / seconds >= 0.95 * plain, (tokens / seconds) / plain


def test_tuner_learns_an_expensive_per_node_draft_cost():
    """CPU-like costs: each drafted node costs 40 ms and verification grows past 10 nodes. A tuner
    that only saw one tree size could not tell the per-node cost from the fixed one and would
    over-draft; dithering the size lets it find a budget within 5% of the best."""
    pipe = SyntheticPipeline(0.002, verify=lambda n: 0.32 + 0.026 * max(0, n - 10))
    pipe.cost = CostModel(network_s=0.002, draft_fixed_s=0.05, draft_per_node_s=0.04, wire_per_node_s=0.0001,
                          verify_s=pipe.cost.verify_s)
    b = steady_budget(pipe, rounds=300, max_budget=64)
    best = max(pipe.true_rate(x) for x in range(65))
    assert pipe.true_rate(b) >= 0.95 * best, (b, max(range(65), key=pipe.true_rate), pipe.true_rate(b) / best)


# --- The tuner's array arithmetic and caches against a from-scratch scalar reference ---------------

def reference_pool(num, den):
    """Pool-adjacent-violators, the textbook way: non-increasing weighted fit of num/den."""
    blocks = []
    for a, s in zip(num, den):
        blocks.append([a, s, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            a2, s2, c2 = blocks.pop()
            blocks[-1][0] += a2
            blocks[-1][1] += s2
            blocks[-1][2] += c2
    return [a / s for a, s, c in blocks for _ in range(c)]


def reference_bucket(v, buckets=24):
    return buckets - 1 if v <= 0 else min(buckets - 1, int(-math.log2(min(1.0, v))))


def test_value_buckets_and_pooling_match_the_textbook_definitions():
    edges = [2.0 ** -k for k in range(30)] + [1.5, 0.75, 0.3, 2.0 ** -23 * 1.01, 0.5 + 1e-16, 0.5 - 1e-16, 1e-30, 0.0,
                                              -1.0]
    assert value_buckets(np.array(edges)).tolist() == [reference_bucket(v) for v in edges]
    rng = np.random.default_rng(0)
    for trial in range(300):
        den = rng.uniform(0.1, 50, 24)
        ratio = rng.random(24) if trial % 2 else np.clip(2.0 ** -np.arange(24) + rng.normal(0, 0.05, 24), 0, 1)
        expected = reference_pool((den * ratio).tolist(), den.tolist())
        assert _non_increasing_fit(den * ratio, den) == pytest.approx(expected, rel=1e-12, abs=0)


class ReferenceTuner:
    """The tuner's estimates recomputed from scratch every round with scalar Python, as the policy
    describes them: a per-node-index value profile, a bucketed calibration refitted on every call, and
    a CostModel built from the fitted lines' raw sums."""

    def __init__(self, max_budget, decay=0.995, prior_weight=4.0, min_evidence=50.0):
        self.max_budget, self.decay, self.k, self.min_evidence = max_budget, decay, prior_weight, min_evidence
        self.profile = []
        self.accepted, self.seen, self.mass = [0.0] * 24, [0.0] * 24, [0.0] * 24
        self.total_accepted = self.total_value = 1.0

    def observe(self, obs):
        for i, v in enumerate(obs.node_values):
            if i < len(self.profile):
                self.profile[i] += 0.2 * (v - self.profile[i])
            else:
                self.profile.append(v)
        evidence, d = sum(self.seen), self.decay
        if evidence * d < self.min_evidence:  # forgetting stops at min_evidence nodes
            d = min(1.0, self.min_evidence / evidence) if evidence else 1.0
        self.accepted, self.seen, self.mass = ([x * d for x in xs] for xs in (self.accepted, self.seen, self.mass))
        self.total_accepted *= d
        self.total_value *= d
        for v, ok in zip(obs.node_values, obs.node_accepted):
            i = reference_bucket(v)
            self.seen[i] += 1
            self.mass[i] += v
            self.accepted[i] += ok
            self.total_accepted += ok
            self.total_value += v

    def table(self):
        rho = min(1.5, self.total_accepted / self.total_value)
        mean = [self.mass[i] / self.seen[i] if self.seen[i] > 0 else 2.0 ** (-i - 0.5) for i in range(24)]
        prior = [min(1.0, rho * m) for m in mean]
        return reference_pool([a + self.k * p for a, p in zip(self.accepted, prior)], [s + self.k for s in self.seen])

    def values(self):
        prof = list(self.profile)
        if not prof:
            return [0.5 ** (i + 1) for i in range(self.max_budget)]
        n = len(prof)
        slope = -1.0
        if n >= 4 and prof[-1] > 0 and prof[n // 2 - 1] > 0:
            slope = math.log(prof[-1] / prof[n // 2 - 1]) / math.log(n / (n // 2))
        while len(prof) < self.max_budget:
            prof.append(prof[n - 1] * ((len(prof) + 1) / n) ** min(slope, -0.5))
        return prof

    @staticmethod
    def line(fit):
        if fit.one_size_slope is None:  # least squares with the weak point at the origin
            sw = fit.sw + fit.origin_weight
            var = fit.sxx * sw - fit.sx ** 2
            b = max(0.0, (fit.sxy * sw - fit.sx * fit.sy) / var if var > 1e-9 * max(1.0, sw ** 2) else 0.0)
            return max(0.0, (fit.sy - b * fit.sx) / sw), b
        mx, my = fit.sx / fit.sw, fit.sy / fit.sw
        ridge = LinearFit.RIDGE * max(1.0, mx * mx)
        b = max(0.0, (fit.sxy - fit.sw * mx * my + ridge * fit.one_size_slope) / (max(0.0, fit.sxx - fit.sw * mx * mx) + ridge))
        return max(0.0, my - b * mx), b

    def cost(self, tuner):
        (d0, d1), (_, w1), (v0, v1) = self.line(tuner.draft), self.line(tuner.wire), self.line(tuner.verify)
        floor = min(tuner.recent_target_s)
        return CostModel(tuner.network.value, d0, d1, w1, lambda n: max(floor, v0 + v1 * n))


@pytest.mark.parametrize("seed", [0, 1])
def test_tuner_choices_equal_a_from_scratch_computation(seed):
    """Over a long run through delay changes, drafts of other confidence, a draft turning bad and
    back, and plain-decoding stretches, the cached array computation picks what the from-scratch
    scalar one picks. Its calibration may lag only by the decay of a few plain rounds."""
    pipe = SyntheticPipeline(0.0, seed=seed, verify=lambda n: 0.02 + 0.0005 * n + 1e-5 * n * n)
    tuner, reference = BudgetTuner(max_budget=64), ReferenceTuner(64)
    # (network_s, accept_scale, top node value, value slope over ranks)
    phases = [(0.0, 1.0, 0.8, -0.9), (0.05, 1.0, 0.8, -0.9), (0.05, 0.8, 0.95, -1.6), (0.0, 0.1, 0.8, -0.9),
              (0.2, 0.1, 0.5, -0.5), (0.005, 0.6, 0.9, -1.2), (0.1, 1.0, 0.6, -0.7)]
    same, rounds, plain = 0, 0, 0
    for network_s, accept_scale, top, slope in phases:
        pipe.cost = CostModel(network_s, 0.01, 0.002, 0.0001, pipe.cost.verify_s)
        pipe.accept_scale, pipe.values = accept_scale, power_values(top=top, slope=slope)
        for _ in range(250):
            obs = pipe.run(tuner.next_budget())
            tuner.observe(obs)
            reference.observe(obs)
            tuner.next_budget()
            fast = tuner.last_choice
            cost, table, values = reference.cost(tuner), reference.table(), reference.values()
            calibration = lambda v: table[reference_bucket(v)]
            best = choose_budget(values, calibration, cost, 64)
            assert tuner.round_s() == pytest.approx([cost.round_s(b) for b in range(65)], rel=1e-12)
            # a plain round only decays the counts: 4 of them at decay 0.995 move an entry by < 0.0051
            assert np.abs(tuner.calibration.table() - table).max() < 0.0051
            rate = (1 + sum(calibration(v) for v in values[:fast.budget])) / cost.round_s(fast.budget)
            assert rate >= best.tokens_per_s * (1 - 1e-3)
            same += fast.budget == best.budget
            rounds += 1
            plain += best.budget == 0
    assert same >= 0.995 * rounds, (same, rounds)
    assert 0.1 * rounds < plain < 0.9 * rounds  # the run went through both regimes


# --- Probing while plain decoding is best -------------------------------------------------------

def plain_best_pipeline(seed):
    """Drafting costs more than it brings on a fast link (best fixed budget: 0), and pays on a
    slow one."""
    pipe = SyntheticPipeline(0.0, accept_scale=0.3, seed=seed, verify=lambda n: 0.02 + 0.001 * n)
    pipe.cost = CostModel(0.0, 0.015, 0.003, 0.0001, pipe.cost.verify_s)
    assert max(range(65), key=pipe.true_rate) == 0
    return pipe


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probes_are_rare_while_plain_decoding_is_best_and_a_slower_link_is_still_noticed(seed):
    pipe = plain_best_pipeline(seed)
    tuner, observer = BudgetTuner(max_budget=64), BudgetTuner(max_budget=64)
    budgets, tokens, seconds = [], 0, 0.0
    for i in range(1000):
        b = tuner.next_budget()
        if i % 50 == 0:  # the schedule lives in what was observed: the worker's shared tuner hands it on
            assert copy.deepcopy(observer).next_budget() == b
        budgets.append(b)
        obs = pipe.run(b)
        tuner.observe(obs)
        observer.observe(obs)
        if i >= 200:
            tokens += 1 + sum(obs.node_accepted)
            seconds += obs.round_s
    probes = sum(1 for b in budgets[200:] if b)
    assert 800 // tuner.probe_max_every <= probes <= 0.02 * 800, probes  # a probe every 16 rounds was 6%
    assert tokens / seconds >= 0.97 * pipe.true_rate(0), tokens / seconds / pipe.true_rate(0)

    pipe.cost = CostModel(0.2, 0.015, 0.003, 0.0001, pipe.cost.verify_s)  # the link slows down
    assert max(range(65), key=pipe.true_rate) > 4
    after = []
    for _ in range(30):
        b = tuner.next_budget()
        after.append(b)
        tuner.observe(pipe.run(b))
    assert all(b > 0 for b in after[10:]), after


def test_value_profile_is_by_node_index_so_small_trees_predict_big_ones():
    """Builders grow trees best slot first, so a small tree is the first nodes of a bigger one. A
    tuner that saw only the first 4 nodes of trees must hold the same profile for those nodes as
    one that saw the whole trees, though drawn children make node values non-monotone (a profile
    of sorted values would put the big trees' best 4 values there instead)."""
    import random

    from orchestrator.estimators import BudgetTuner, RoundObservation

    rng = random.Random(7)
    small, big = BudgetTuner(max_budget=16), BudgetTuner(max_budget=16)
    for _ in range(60):
        values = [rng.random() ** (1 + i) for i in range(16)]  # falling on average, not monotone
        accepted = [rng.random() < v for v in values]
        for tuner, n in ((small, 4), (big, 16)):
            tuner.observe(RoundObservation(budget=n, node_values=values[:n], node_accepted=accepted[:n], round_s=0.02,
                                           draft_s=0.005, target_s=0.01, wire_s=0.001))
    assert small._values()[:4] == pytest.approx(big._values()[:4], rel=1e-12)
    assert any(a < b for a, b in zip(big._values()[:15], big._values()[1:16]))  # the profile is not sorted


def test_overlapped_rounds_price_a_kept_tree_at_max_of_draft_and_target():
    """Rounds whose drafted-ahead trees are always kept cost max(draft, target side), abandoned
    ones draft + target side, and serial rounds (kept_ahead None) leave the model as it was."""
    def fed(kept_ahead):
        tuner = BudgetTuner(max_budget=16)
        for i in range(60):
            b = (2, 4, 8, 16)[i % 4]
            draft, target = 0.01 + 0.004 * b, 0.05 + 0.001 * b
            round_s = max(draft, target) if kept_ahead else draft + target
            tuner.observe(RoundObservation(b, [0.5] * b, [False] * b, round_s, draft, target, 0.0, kept_ahead))
        return tuner

    kept, abandoned, serial = fed(True), fed(False), fed(None)
    b = np.arange(17.0)
    draft, target = 0.01 + 0.004 * b, 0.05 + 0.001 * b
    # from 2 nodes on: below the smallest tree seen the target floor (its cheapest round) applies
    assert np.allclose(kept.round_s()[2:], np.maximum(draft, target)[2:], rtol=0.02)
    assert np.allclose(abandoned.round_s()[2:], (draft + target)[2:], rtol=0.02)
    assert np.allclose(serial.round_s(), abandoned.round_s(), rtol=1e-9)
    assert kept.kept_ahead.value > 0.99 and abandoned.kept_ahead.value == 0.0
