"""The budget policy and its online tuner, without models or networks (synthetic rounds)."""
from __future__ import annotations

import random
import statistics

import pytest

from orchestrator.estimators import BudgetTuner, LinearFit, RoundObservation, ValueCalibration
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
