"""SpecInfer baseline: a fixed k-ary tree whose siblings are drawn i.i.d. (with replacement).

Layers are filled in order, `branching` children per node, until the budget is spent; the last
layer may be partial. One batched draft call per layer. Verified with SpecInfer's multi-step
speculative sampling (q unchanged after a rejection).
"""
from __future__ import annotations

from dyspec.builders.base import DraftOracle, TreeBuilder, attach_used_distributions
from dyspec.coins import Coins
from dyspec.tree import ROOT, Draw, TokenTree
from dyspec.warp import SamplingParams


class SpecInferBuilder(TreeBuilder):
    name = "specinfer"
    draw = Draw.WITH_REPLACEMENT

    def __init__(self, draft_params: SamplingParams = SamplingParams(temperature=0.6), branching: int = 2):
        super().__init__(draft_params)
        if branching < 1:
            raise ValueError("branching must be >= 1")
        self.branching = branching

    def options(self) -> dict:
        return {**super().options(), "branching": self.branching}

    def build(self, oracle: DraftOracle, budget: int, coins: Coins) -> TokenTree:
        tree = TokenTree(draw=self.draw)
        dists = {}
        layer = [ROOT]
        while layer and len(tree) < budget:
            next_layer = []
            for parent, dist in zip(layer, self.distributions(oracle, tree, layer)):
                dists[parent] = dist
                w = dist.weights64()
                parent_v = 1.0 if parent == ROOT else tree.values[parent]
                for _ in range(self.branching):
                    if len(tree) >= budget:
                        break
                    j = coins.sample(w)
                    next_layer.append(tree.add(parent, int(dist.ids[j]), parent_v * float(w[j])))
            layer = next_layer
        attach_used_distributions(tree, dists)
        return tree
