"""Exact output distributions of the production drafting and verification code.

Every random decision in dyspec goes through `Coins.accept` / `Coins.sample`. `enumerate_runs`
re-runs a function once per distinct sequence of decisions (depth-first replay), weighting each
run by the exact probability of its decisions, so the distribution computed is that of the real
code path, not of a re-implementation. Table language models over a tiny vocabulary stand in for
transformers models; `sequence_distribution` composes rounds into the distribution of the first L
emitted tokens, carrying builder state (e.g. dyspec-layer's threshold) across rounds.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections import defaultdict

import torch

from dyspec.builders.base import TreeBuilder
from dyspec.coins import inverse_cdf
from dyspec.decoding import verify_tree
from dyspec.tree import ROOT, TokenTree
from dyspec.verify import StochasticVerifier, verify_greedy
from dyspec.warp import SamplingParams, target_probs


class EnumCoins:
    """Coins that follow a forced prefix of choices, then take the first option, recording the
    options of every decision so the caller can backtrack."""

    def __init__(self, forced: list[int]):
        self.forced = forced
        self.trail: list[list[tuple[float, object]]] = []  # options per decision: (prob, payload)
        self.chosen: list[int] = []
        self.interval = (0.0, 1.0)  # where the last accept-test uniform lies (for the reuse mutant)

    def _decide(self, options):
        options = [(p, x) for p, x in options if p > 0]
        i = self.forced[len(self.chosen)] if len(self.chosen) < len(self.forced) else 0
        self.trail.append(options)
        self.chosen.append(i)
        return options[i][1]

    def accept(self, prob: float) -> bool:
        prob = min(1.0, max(0.0, prob))
        ok = self._decide([(prob, True), (1.0 - prob, False)])
        self.interval = (0.0, prob) if ok else (prob, 1.0)
        return ok

    def sample(self, weights: torch.Tensor) -> int:
        w = weights.double()
        w = w / w.sum()
        return self._decide([(float(w[j]), j) for j in range(w.numel())])

    def sample_reusing_last(self, weights: torch.Tensor) -> int:
        """Planted bug support: inverse-CDF draw with the uniform of the last accept test."""
        lo, hi = self.interval
        cdf = torch.cumsum(weights.double() / weights.double().sum(), 0).tolist()
        options, start = [], 0.0
        for j, end in enumerate(cdf):
            overlap = max(0.0, min(end, hi) - max(start, lo))
            options.append((overlap / (hi - lo), j))
            start = end
        return self._decide(options)

    def probability(self) -> float:
        return math.prod(self.trail[k][c][0] for k, c in enumerate(self.chosen))


def enumerate_runs(fn):
    """Yield (probability, result) for every distinct decision sequence of fn(coins)."""
    forced: list[int] = []
    while True:
        coins = EnumCoins(forced)
        result = fn(coins)
        yield coins.probability(), result
        chosen, trail = coins.chosen, coins.trail
        k = len(chosen) - 1
        while k >= 0 and chosen[k] + 1 >= len(trail[k]):
            k -= 1
        if k < 0:
            return
        forced = chosen[:k] + [chosen[k] + 1]


class TableLM:
    """A language model given by a random logits table over the last `order` tokens."""

    def __init__(self, vocab: int, order: int, seed: int, scale: float = 1.5):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.order = vocab, order
        self.table = torch.randn((vocab,) * order + (vocab,), generator=g, dtype=torch.float64) * scale

    def logits(self, context: list[int]) -> torch.Tensor:
        return self.table[tuple(context[-self.order:])].float()


class TableDraft:
    """DraftOracle over a TableLM for one round below `context` (which ends with the root)."""

    def __init__(self, lm: TableLM, context: list[int]):
        self.lm, self.context = lm, context

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        return torch.stack([self.lm.logits(self.context + (tree.path_tokens(n) if n != ROOT else [])) for n in nodes])


def target_rows(lm: TableLM, context: list[int], tree: TokenTree) -> torch.Tensor:
    return torch.stack([lm.logits(context + tree.path_tokens(n)) if n != ROOT else lm.logits(context)
                        for n in [ROOT, *range(len(tree))]])


def round_outcomes(builder: TreeBuilder, draft: TableLM, target: TableLM, context: list[int], budget: int,
                   sampling: SamplingParams, verifier=None) -> list[tuple[float, tuple[int, ...], TreeBuilder]]:
    """Exact distribution of one round's emitted tokens (and the builder state after it)."""
    verifier = verifier or StochasticVerifier()
    outcomes = []
    oracle = TableDraft(draft, context)

    def build(coins):
        b = copy.deepcopy(builder)
        return b, b.build(oracle, budget, coins)

    for p_tree, (b_after, tree) in enumerate_runs(build):
        rows = target_rows(target, context, tree)
        if sampling.greedy:
            verdict = verify_greedy(tree, lambda node: int(torch.argmax(rows[node + 1])))
            outcomes.append((p_tree, tuple(verdict.tokens), b_after))
            continue
        run = lambda coins: verifier(tree, lambda node: target_probs(rows[node + 1], sampling), coins)
        for p_v, verdict in enumerate_runs(run):
            outcomes.append((p_tree * p_v, tuple(verdict.tokens), b_after))
    return outcomes


def _state_key(builder: TreeBuilder):
    return getattr(builder, "threshold", None)


def sequence_distribution(builder, draft, target, context, budget, sampling, length, verifier=None,
                          budget_schedule=None) -> dict[tuple[int, ...], float]:
    """Exact distribution of the first `length` emitted tokens. `budget_schedule(round, context)`
    may change the budget every round (an orchestrator's choice made before drafting)."""
    out: dict[tuple[int, ...], float] = defaultdict(float)

    def recurse(ctx, b, need, prefix, weight, rnd):
        bud = budget_schedule(rnd, ctx) if budget_schedule else budget
        merged: dict = defaultdict(float)
        states = {}
        for p, toks, b_after in round_outcomes(b, draft, target, ctx, bud, sampling, verifier):
            key = (toks[:need], _state_key(b_after))
            merged[key] += p
            states[key] = b_after
        for (toks, state), p in merged.items():
            if len(toks) >= need:
                out[prefix + toks] += weight * p
            else:
                recurse(ctx + list(toks), states[(toks, state)], need - len(toks), prefix + toks, weight * p, rnd + 1)

    recurse(list(context), builder, length, (), 1.0, 0)
    return dict(out)


def target_sequence_distribution(target: TableLM, context, sampling: SamplingParams, length: int):
    """Exact distribution of `length` tokens sampled from the target alone."""
    out = {}
    for seq in itertools.product(range(target.vocab), repeat=length):
        p, ctx = 1.0, list(context)
        for tok in seq:
            p *= float(target_probs(target.logits(ctx), sampling)[tok])
            ctx.append(tok)
            if p == 0:
                break
        if p > 0:
            out[seq] = p
    return out


def total_variation(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)


__all__ = ["EnumCoins", "TableDraft", "TableLM", "enumerate_runs", "inverse_cdf", "round_outcomes",
           "sequence_distribution", "target_sequence_distribution", "total_variation", "verify_tree"]
