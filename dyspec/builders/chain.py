"""Classic speculative decoding: a single chain of `budget` drafted tokens, one draw per node."""
from __future__ import annotations

from dyspec.builders.base import DraftOracle, TreeBuilder, attach_used_distributions
from dyspec.coins import Coins
from dyspec.tree import ROOT, Draw, TokenTree


class ChainBuilder(TreeBuilder):
    name = "chain"
    draw = Draw.WITHOUT_REPLACEMENT  # one child per node: the rule reduces to Leviathan et al.

    def build(self, oracle: DraftOracle, budget: int, coins: Coins) -> TokenTree:
        tree = TokenTree(draw=self.draw)
        dists = {}
        node, value = ROOT, 1.0
        while len(tree) < budget:
            (dist,) = self.distributions(oracle, tree, [node])
            dists[node] = dist
            w = dist.weights64()
            j = coins.sample(w)
            value *= float(w[j])
            node = tree.add(node, int(dist.ids[j]), value)
        attach_used_distributions(tree, dists)
        return tree
