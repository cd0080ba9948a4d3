"""DySpec Algorithm 1: best-first growth over a max-heap of sample slots.

A slot is "draw the next child of node u"; its value is the probability (under the draft
surrogate) that the verifier ever examines that draw. Popping (v, u, R) and drawing y ~ R gives
a child slot of value v*R[y] (the child's path probability) and, over the renormalised residual
R without y, a next-sibling slot of value v*(1 - R[y]). Slot values are fixed before the draw
they price, so the shape never depends on which token came out (the losslessness condition).

Draft forwards are lazy: a node's distribution is computed when its first-child slot is popped.
`prefetch` > 1 evaluates that node together with the best other unevaluated slots in one batched
draft call. The tree is the same as with prefetch=1 (the paper's one forward per node): slots
are keyed by values known before evaluation, so evaluation order cannot change the pops.
"""
from __future__ import annotations

import heapq
import itertools

import torch

from dyspec.builders.base import DraftOracle, TreeBuilder, attach_used_distributions
from dyspec.coins import Coins
from dyspec.tree import ROOT, Draw, SparseDist, TokenTree
from dyspec.warp import SamplingParams


class DySpecBuilder(TreeBuilder):
    name = "dyspec"
    draw = Draw.WITHOUT_REPLACEMENT

    def __init__(self, draft_params: SamplingParams = SamplingParams(temperature=0.6), prefetch: int = 8):
        super().__init__(draft_params)
        self.prefetch = max(1, int(prefetch))

    def options(self) -> dict:
        return {**super().options(), "prefetch": self.prefetch}

    def build(self, oracle: DraftOracle, budget: int, coins: Coins) -> TokenTree:
        tree = TokenTree(draw=self.draw)
        dists: dict[int, SparseDist] = {}
        residual: dict[int, torch.Tensor] = {}  # node -> float64 weights over dists[node].ids
        order = itertools.count()  # ties broken by creation order: deterministic heap
        heap = [(-1.0, next(order), ROOT)]
        while heap and len(tree) < budget:
            neg_v, _, u = heapq.heappop(heap)
            v = -neg_v
            if u not in dists:
                waiting = heapq.nsmallest(self.prefetch - 1, (e for e in heap if e[2] not in dists))
                batch = [u, *[n for _, _, n in waiting]]
                for node, dist in zip(batch, self.distributions(oracle, tree, batch)):
                    dists[node] = dist
                    residual[node] = dist.weights64().clone()
            r = residual[u]
            j = coins.sample(r)
            r_y = float(r[j])
            child = tree.add(u, int(dists[u].ids[j]), v * r_y)
            heapq.heappush(heap, (-(v * r_y), next(order), child))
            r[j] = 0.0
            mass = float(r.sum())
            if mass > 0:
                r /= mass
                heapq.heappush(heap, (-(v * (1.0 - r_y)), next(order), u))
        attach_used_distributions(tree, dists)
        return tree
