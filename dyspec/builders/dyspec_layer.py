"""DySpec Algorithm 2: one batched draft forward per tree layer, slots kept above a threshold.

Each layer: evaluate every frontier node in one draft call, then draw from the layer's slots
best-first while the slot value exceeds the threshold t (`while v > t` in the paper). A child
whose value exceeds t joins the next frontier.

The threshold is chosen to fill the budget instead of the paper's fixed 0.001, which under-filled
768-node trees and lost to Sequoia at T=0.6:
  * within a round, if every slot above t is used up before the budget is, t is lowered (x1/4)
    and drawing resumes from the slots and parked children left below it;
  * across rounds, t starts from where the last round ended: the lowered value after an
    under-fill, or the geometric mean of t and the value of the last slot drawn when the budget ran
    out first (t was too low, so the tree was too wide at the top).
Lowering or raising t only changes how many draws are made from slots whose values were fixed
before their draws, so the output distribution is unaffected.
"""
from __future__ import annotations

import heapq
import itertools

import torch

from dyspec.builders.base import DraftOracle, TreeBuilder, attach_used_distributions
from dyspec.coins import Coins
from dyspec.tree import ROOT, Draw, SparseDist, TokenTree
from dyspec.warp import SamplingParams

_LOWER = 0.25


class DySpecLayerBuilder(TreeBuilder):
    name = "dyspec-layer"
    draw = Draw.WITHOUT_REPLACEMENT

    def __init__(self, draft_params: SamplingParams = SamplingParams(temperature=0.6),
                 threshold: float | None = None):
        super().__init__(draft_params)
        self.threshold = threshold  # None: start at 1/budget (the paper's heuristic)

    def options(self) -> dict:
        return {**super().options(), "threshold": None}

    def build(self, oracle: DraftOracle, budget: int, coins: Coins) -> TokenTree:
        t = self.threshold if self.threshold is not None else 1.0 / budget
        tree = TokenTree(draw=self.draw)
        dists: dict[int, SparseDist] = {}
        residual: dict[int, torch.Tensor] = {}
        order = itertools.count()
        slots: list = []  # (-value, tiebreak, node) for evaluated nodes' next draws
        parked: list = []  # (-value, tiebreak, node): children not yet evaluated, below t
        frontier = [ROOT]
        values = {ROOT: 1.0}
        lowered = False
        last_drawn = t
        while len(tree) < budget:
            if frontier:
                for node, dist in zip(frontier, self.distributions(oracle, tree, frontier)):
                    dists[node] = dist
                    residual[node] = dist.weights64().clone()
                    heapq.heappush(slots, (-values[node], next(order), node))
                frontier = []
            while slots and -slots[0][0] > t and len(tree) < budget:
                neg_v, _, u = heapq.heappop(slots)
                v = -neg_v
                last_drawn = v
                r = residual[u]
                j = coins.sample(r)
                r_y = float(r[j])
                child = tree.add(u, int(dists[u].ids[j]), v * r_y)
                values[child] = v * r_y
                (frontier.append(child) if v * r_y > t
                 else heapq.heappush(parked, (-(v * r_y), next(order), child)))
                r[j] = 0.0
                mass = float(r.sum())
                if mass > 0:
                    r /= mass
                    heapq.heappush(slots, (-(v * (1.0 - r_y)), next(order), u))
            if len(tree) >= budget or frontier:
                continue
            if (not slots and not parked) or t < 1e-300:
                break  # the draft's supports are exhausted (or what is left has underflowed to 0)
            t *= _LOWER  # under-filled: lower the threshold and resume
            lowered = True
            while parked and -parked[0][0] > t:
                frontier.append(heapq.heappop(parked)[2])
        # geometric step towards the last drawn value: damped, so t does not flip between extremes
        self.threshold = t if lowered else (t * max(t, last_drawn)) ** 0.5
        attach_used_distributions(tree, dists)
        return tree
