"""Deterministic best-first trees (SpecExec / EAGLE-2 style): the top-`budget` nodes of the
draft's continuation tree ranked by path probability.

Candidates (parent, token) sit in a max-heap keyed by path probability. Adding a node pushes an
"expand" entry keyed by the node's own value, an upper bound on every child's value, so the next
pop is always the best remaining candidate: the result is the exact top-B set, which is connected
because a child never outranks its parent. Expansion is lazy and batched like `dyspec`'s.

Children are chosen, not sampled, so the tree is verified with the deterministic rule (each
child's q is one-hot): lossless at any target temperature, and at T=0 it never misses the
draft's 2nd or 3rd choice the way sampled trees can.
"""
from __future__ import annotations

import heapq
import itertools

from dyspec.builders.base import DraftOracle, TreeBuilder
from dyspec.coins import Coins
from dyspec.tree import ROOT, Draw, TokenTree
from dyspec.warp import SamplingParams

_EXPAND, _CANDIDATE = 0, 1  # on equal keys expand first: its children may tie with candidates


class BestFirstBuilder(TreeBuilder):
    name = "best-first"
    draw = Draw.DETERMINISTIC

    def __init__(self, draft_params: SamplingParams = SamplingParams(temperature=0.6),
                 prefetch: int = 8, max_children: int = 32):
        # ranking needs a proper distribution: a greedy draft is ranked at temperature 1
        if draft_params.greedy:
            draft_params = SamplingParams(temperature=1.0, top_k=draft_params.top_k, top_p=draft_params.top_p)
        super().__init__(draft_params)
        self.prefetch = max(1, int(prefetch))
        self.max_children = max_children

    def options(self) -> dict:
        return {**super().options(), "prefetch": self.prefetch, "max_children": self.max_children}

    def build(self, oracle: DraftOracle, budget: int, coins: Coins) -> TokenTree:
        tree = TokenTree(draw=self.draw)
        order = itertools.count()
        heap = [(-1.0, _EXPAND, next(order), ROOT, -1)]
        while heap and len(tree) < budget:
            neg_v, kind, _, node, token = heapq.heappop(heap)
            if kind == _CANDIDATE:
                child = tree.add(node, token, -neg_v)
                heapq.heappush(heap, (neg_v, _EXPAND, next(order), child, -1))
                continue
            others = heapq.nsmallest(self.prefetch - 1, (e for e in heap if e[1] == _EXPAND))
            batch = [node, *[e[3] for e in others]]
            for e in others:
                heap.remove(e)
            heapq.heapify(heap)
            room = min(self.max_children, budget - len(tree))
            for parent, dist in zip(batch, self.distributions(oracle, tree, batch)):
                parent_v = 1.0 if parent == ROOT else tree.values[parent]
                for tok, w in zip(dist.ids[:room].tolist(), dist.weights64()[:room].tolist()):
                    heapq.heappush(heap, (-(parent_v * w), _CANDIDATE, next(order), parent, tok))
        return tree
