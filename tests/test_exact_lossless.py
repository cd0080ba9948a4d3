"""Exact losslessness: the output distribution of the production builders and verifiers,
computed by enumerating every random decision (tests/exact.py), equals the target's.

Tolerance 1e-9 total variation (float64 rounding is ~1e-16). Planted bugs must each move the
distribution by far more than that, so the same checks would catch them.
"""
from __future__ import annotations

import random

import pytest
import torch

from dyspec.builders import make_builder
from dyspec.builders.base import TreeBuilder, attach_used_distributions
from dyspec.tree import ROOT, Draw, TokenTree
from dyspec.verify import StochasticVerifier
from dyspec.warp import SamplingParams
from tests.exact import (TableLM, sequence_distribution, target_sequence_distribution,
                         total_variation)

EXACT = 1e-9
METHODS = ["dyspec", "dyspec-layer", "best-first", "sequoia", "specinfer", "chain"]
DRAFTS = {
    "untruncated": SamplingParams(0.8),
    "top_k=2": SamplingParams(0.6, top_k=2),
    "top_p=0.7": SamplingParams(1.0, top_p=0.7),
}


def first_token_tv(builder, draft, target, sampling, budget, context=(0,), verifier=None, length=1):
    got = sequence_distribution(builder, draft, target, list(context), budget, sampling, length, verifier)
    ref = target_sequence_distribution(target, list(context), sampling, length)
    return total_variation(got, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("draft_name", list(DRAFTS))
def test_first_token_exact(method, temperature, draft_name):
    target, draft = TableLM(4, 1, seed=1), TableLM(4, 1, seed=2)
    for budget in (1, 2, 4):
        builder = make_builder(method, draft_params=DRAFTS[draft_name])
        for sampling in (SamplingParams(temperature), SamplingParams(temperature, top_k=3, top_p=0.9)):
            assert first_token_tv(builder, draft, target, sampling, budget) < EXACT, (budget, sampling)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_three_token_sequences_exact(method, temperature):
    """Joint distribution of the first 3 tokens: recursion into accepted children, bonus tokens,
    several rounds, and builder state carried across rounds. Target is a trigram model."""
    target, draft = TableLM(4, 2, seed=3), TableLM(4, 1, seed=4)
    builder = make_builder(method, draft_params=SamplingParams(0.7))
    tv = first_token_tv(builder, draft, target, SamplingParams(temperature), budget=3, context=(0, 1), length=3)
    assert tv < EXACT


class ShapeBuilder(TreeBuilder):
    """A fixed tree shape filled with draws under a given sibling rule (test-only builder)."""

    def __init__(self, parents: list[int], draw: Draw, draft_params=SamplingParams(0.9)):
        super().__init__(draft_params)
        self.parents, self.draw = parents, draw

    def options(self):
        return {**super().options(), "parents": self.parents, "draw": self.draw}

    def build(self, oracle, budget, coins):
        tree = TokenTree(draw=self.draw)
        dists, residual, slot = {}, {}, {ROOT: ROOT}
        for shape_node, parent in enumerate(self.parents):
            node = slot[parent]
            if node not in dists:
                (dists[node],) = self.distributions(oracle, tree, [node])
                residual[node] = dists[node].weights64().clone()
            r = residual[node]
            if self.draw is Draw.DETERMINISTIC:
                j = len(tree.children_of(node))
                if j >= r.numel():
                    continue
            else:
                if float(r.sum()) <= 0:
                    continue
                j = coins.sample(r)
            slot[shape_node] = tree.add(node, int(dists[node].ids[j]), 0.0)
            if self.draw is Draw.WITHOUT_REPLACEMENT:
                r[j] = 0.0
                if float(r.sum()) > 0:
                    r /= r.sum()
        if self.draw is not Draw.DETERMINISTIC:
            attach_used_distributions(tree, dists)
        return tree


SHAPES = {
    "chain": [-1, 0, 1],
    "star": [-1, -1, -1, -1],  # 4 siblings on V=4 cover the whole support
    "random": [-1, -1, 0, 1],
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("draw", list(Draw))
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_verifier_rules_on_fixed_shapes(shape, draw, temperature):
    target, draft = TableLM(4, 1, seed=5), TableLM(4, 1, seed=6)
    for draft_params in (SamplingParams(0.9), SamplingParams(0.9, top_k=3)):
        builder = ShapeBuilder(SHAPES[shape], draw, draft_params)
        for length in (1, 2):
            tv = first_token_tv(builder, draft, target, SamplingParams(temperature), 99, length=length)
            assert tv < EXACT, (draft_params, length)


def _tables_with(target_table, draft_table):
    target, draft = TableLM(5, 1, seed=0), TableLM(5, 1, seed=0)
    target.table, draft.table = target_table, draft_table
    return target, draft


@pytest.mark.parametrize("method", METHODS)
def test_edge_distributions(method):
    """Disjoint supports, p == q, one-hot distributions, ~1e-30 probabilities, token ids 0 and V-1."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 5, generator=g, dtype=torch.float64)
    neg = -1e4
    disjoint_t = base.clone(); disjoint_t[:, 3:] = neg  # target mass on {0,1,2}
    disjoint_d = base.clone(); disjoint_d[:, :3] = neg  # draft mass on {3,4}
    one_hot = torch.full((5, 5), neg, dtype=torch.float64); one_hot[:, 4] = 0.0
    tiny = base.clone(); tiny[:, 0] = base[:, 0] - 69.0  # ~1e-30 relative mass on token 0
    cases = {
        "disjoint": (disjoint_t, disjoint_d, 1.0),
        "p_equals_q": (base, base, 1.0),  # same table and same temperature: p == q exactly
        "one_hot_both": (one_hot, one_hot, 1.0),
        "one_hot_target": (one_hot, base, 1.0),
        "tiny_probs": (tiny, tiny.flip(1), 1.0),
    }
    for name, (t_table, d_table, temp) in cases.items():
        target, draft = _tables_with(t_table, d_table)
        builder = make_builder(method, draft_params=SamplingParams(temp))
        for budget in (2, 4):
            tv = first_token_tv(builder, draft, target, SamplingParams(temp), budget, length=2)
            assert tv < EXACT, (name, budget)


def test_budget_changing_every_round_is_exact():
    """An orchestrator may change the budget every round (chosen before drafting)."""
    target, draft = TableLM(4, 2, seed=8), TableLM(4, 1, seed=9)
    rng = random.Random(0)
    schedule_table = {}

    def schedule(round_index, context):
        key = (round_index, tuple(context))
        return schedule_table.setdefault(key, rng.choice([1, 2, 4]))

    for method in ("dyspec", "dyspec-layer", "sequoia"):
        builder = make_builder(method, draft_params=SamplingParams(0.7))
        got = sequence_distribution(builder, draft, target, [0, 1], 0, SamplingParams(1.0), 3,
                                    budget_schedule=schedule)
        assert total_variation(got, target_sequence_distribution(target, [0, 1], SamplingParams(1.0), 3)) < EXACT


# ---- planted bugs: each must be detected by the checks above --------------------------------

class StaleQ(StochasticVerifier):
    """Bug: q is not updated after a rejected sibling (drawn without replacement)."""

    @staticmethod
    def draft_after_rejection(q, y):
        return q


class NoResidualUpdate(StochasticVerifier):
    """Bug: the target residual is not updated after a rejection."""

    @staticmethod
    def residual_after_rejection(r, q, y):
        return r


class FinalDrawFromP(StochasticVerifier):
    """Bug: after all children are rejected, the next token is drawn from p, not the residual."""

    @staticmethod
    def final_distribution(r, p):
        return p


class ReusedUniform(StochasticVerifier):
    """Bug: the residual draw reuses the uniform of the last accept test."""

    def __call__(self, tree, target_p, coins):
        sample = coins.sample
        coins.sample = coins.sample_reusing_last  # only the final draws below use sample
        try:
            return super().__call__(tree, target_p, coins)
        finally:
            coins.sample = sample


class WithReplacementVerifiedWithout(ShapeBuilder):
    """Bug: siblings drawn i.i.d. (duplicates kept) but verified with the without-replacement
    rule. (Dropping the duplicates instead would be lossless: the first occurrences of i.i.d.
    draws are a without-replacement sample with a data-dependent stop.)"""

    def build(self, oracle, budget, coins):
        self.draw = Draw.WITH_REPLACEMENT
        tree = super().build(oracle, budget, coins)
        tree.draw = Draw.WITHOUT_REPLACEMENT
        return tree


class InfiniteRatioAccepts(StochasticVerifier):
    """How such a verifier meets a duplicate: q(y) is 0 after the first copy was removed, and an
    unguarded r(y)/q(y) is +inf, so the duplicate is accepted whenever r(y) > 0."""

    @staticmethod
    def acceptance_probability(r_y, q_y, child):
        return 1.0 if q_y <= 0 and r_y > 0 else (0.0 if q_y <= 0 else min(1.0, r_y / q_y))


MUTANT_CASES = [(StaleQ(), None), (NoResidualUpdate(), None), (FinalDrawFromP(), None), (ReusedUniform(), None),
                (InfiniteRatioAccepts(), WithReplacementVerifiedWithout)]


@pytest.mark.parametrize("verifier,mutant_builder", MUTANT_CASES,
                         ids=["stale_q", "no_residual_update", "final_draw_from_p", "reused_uniform",
                              "with_replacement_verified_without"])
def test_planted_bugs_are_detected(verifier, mutant_builder):
    target, draft = TableLM(4, 1, seed=1), TableLM(4, 1, seed=2)
    worst = 0.0
    for temperature in (0.5, 1.0):
        for shape in ("star", "random"):
            cls = mutant_builder or ShapeBuilder
            builder = cls(SHAPES[shape], Draw.WITHOUT_REPLACEMENT, SamplingParams(0.9))
            tv = first_token_tv(builder, draft, target, SamplingParams(temperature), 99, verifier=verifier)
            worst = max(worst, tv)
    assert worst > 1e-3, f"planted bug moved the distribution by only {worst:.2e}"
