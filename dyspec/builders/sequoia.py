"""Sequoia baseline: a static tree shape from a dynamic program over a positional acceptance
vector, filled with draws without replacement at run time.

acceptance[k] is the (marginal) probability that the (k+1)-th drawn sibling at a node is the one
accepted. Under Sequoia's model a node's expected contribution is the product of the acceptance
entries of the sibling ranks along its path, so the best tree of n nodes below a node solves

    F(n) = G(0, n),   G(k, m) = max(0, max_{s=1..m} acceptance[k] * (1 + F(s-1)) + G(k+1, m-s))

(children of ranks k, k+1, ... sharing m nodes; child k takes a subtree of s nodes). Ranks
beyond the vector's length are not used. `acceptance` is measured by the project
(benchmarks/tree_quality.py measures it per model pair and temperature).
"""
from __future__ import annotations

from functools import lru_cache

from dyspec.builders.base import DraftOracle, TreeBuilder, attach_used_distributions
from dyspec.coins import Coins
from dyspec.tree import ROOT, Draw, TokenTree
from dyspec.warp import SamplingParams

# Used when no vector is given: measured by benchmarks/tree_quality.py on Qwen2.5-Coder 0.5B -> 1.5B,
# draft T=0.6, target T=0.6, 3 calibration prompts x 32 positions (sequoia_acceptance.json in its
# report). Measure your own pair: the vector is the whole of Sequoia's model of the draft.
DEFAULT_ACCEPTANCE = (0.6901, 0.112, 0.0781, 0.0339, 0.0156, 0.0104, 0.0052, 0.0026)


@lru_cache(maxsize=64)
def sequoia_shape(acceptance: tuple[float, ...], budget: int) -> tuple[list[int], float]:
    """Optimal static tree for `budget` nodes: (parents in creation (BFS) order, expected
    accepted tokens under the model, excluding the bonus token)."""
    acc = tuple(float(a) for a in acceptance)
    K = len(acc)

    @lru_cache(maxsize=None)
    def F(n: int) -> float:
        return G(0, n)[0]

    @lru_cache(maxsize=None)
    def G(k: int, m: int) -> tuple[float, tuple[int, ...]]:
        """(best value, subtree sizes of children k, k+1, ...) using at most m nodes."""
        if m == 0 or k == K:
            return 0.0, ()
        best, sizes = 0.0, ()
        for s in range(1, m + 1):
            rest_v, rest_sizes = G(k + 1, m - s)
            v = acc[k] * (1.0 + F(s - 1)) + rest_v
            if v > best + 1e-15:
                best, sizes = v, (s, *rest_sizes)
        return best, sizes

    for n in range(budget + 1):  # fill the caches bottom-up: keeps recursion depth small
        F(n)

    parents: list[int] = []
    queue = [(ROOT, budget)]  # (node, nodes available below it)
    while queue:
        node, m = queue.pop(0)
        for s in G(0, m)[1]:
            parents.append(node)
            queue.append((len(parents) - 1, s - 1))
    return parents, F(budget)


class SequoiaBuilder(TreeBuilder):
    name = "sequoia"
    draw = Draw.WITHOUT_REPLACEMENT

    def __init__(self, draft_params: SamplingParams = SamplingParams(temperature=0.6),
                 acceptance: tuple[float, ...] = DEFAULT_ACCEPTANCE):
        super().__init__(draft_params)
        self.acceptance = tuple(acceptance)

    def options(self) -> dict:
        return {**super().options(), "acceptance": self.acceptance}

    def build(self, oracle: DraftOracle, budget: int, coins: Coins) -> TokenTree:
        shape = sequoia_shape(self.acceptance, budget)[0]
        n_children: dict[int, int] = {}
        for p in shape:
            n_children[p] = n_children.get(p, 0) + 1
        tree = TokenTree(draw=self.draw)
        dists = {}
        slot_of = {ROOT: ROOT}  # shape node -> tree node (None where the draft's support ran out)
        layer = [ROOT]
        while layer:
            expand = [s for s in layer if n_children.get(s) and slot_of.get(s) is not None]
            if not expand:
                break
            nodes = [slot_of[s] for s in expand]
            next_layer = []
            for s, node, dist in zip(expand, nodes, self.distributions(oracle, tree, nodes)):
                dists[node] = dist
                r = dist.weights64().clone()
                parent_v = 1.0 if node == ROOT else tree.values[node]
                mass_left = 1.0
                kids = [i for i, p in enumerate(shape) if p == s]
                for kid in kids:
                    if float(r.sum()) <= 0:
                        slot_of[kid] = None
                        continue
                    j = coins.sample(r)
                    r_y = float(r[j])
                    slot_of[kid] = tree.add(node, int(dist.ids[j]), parent_v * mass_left * r_y)
                    mass_left *= 1.0 - r_y
                    r[j] = 0.0
                    if float(r.sum()) > 0:
                        r /= r.sum()
                    next_layer.append(kid)
            layer = next_layer
        attach_used_distributions(tree, dists)
        return tree
