"""The one interface every tree builder implements, and the draft oracle it grows trees with."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from dyspec.coins import Coins
from dyspec.tree import Draw, SparseDist, TokenTree
from dyspec.warp import SamplingParams, draft_distribution


class DraftOracle(Protocol):
    """The draft model as a builder sees it: next-token logits for tree nodes.

    `logits(tree, nodes)` returns float32 [len(nodes), V]: row i is the draft's next-token logits
    after the committed prefix, the root and the path to `nodes[i]` (ROOT for the root itself).
    A node is only ever asked for after its parent, so an implementation with a KV cache always
    has the ancestors cached. One call = one batched draft forward.
    """

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor: ...

    # Optional: `renumber(mapping)`. A builder that forwards nodes which may not end up in its tree
    # (best-first's `speculate`) asks for logits on a scratch tree and returns another; it then
    # calls renumber({scratch node: returned node}) for the nodes kept, so that an oracle holding
    # per-node state (cache slots) re-keys it to the returned tree and forgets the rest.


class TreeBuilder(ABC):
    """Grows one token tree per round under a node budget.

    Subclasses set `draw` (the sibling rule the verifier must use) and implement `build`.
    Builders may keep state across rounds of one sequence (e.g. an adapted threshold); use
    `fresh()` to get an independent instance for another sequence.
    """

    name: str = ""
    draw: Draw = Draw.WITHOUT_REPLACEMENT

    def __init__(self, draft_params: SamplingParams = SamplingParams(temperature=0.6)):
        self.draft_params = draft_params

    @abstractmethod
    def build(self, oracle: DraftOracle, budget: int, coins: Coins) -> TokenTree:
        """Return a tree with at most `budget` nodes (budget >= 1)."""

    def fresh(self) -> "TreeBuilder":
        return type(self)(**self.options())

    def options(self) -> dict:
        return {"draft_params": self.draft_params}

    def distributions(self, oracle: DraftOracle, tree: TokenTree, nodes: list[int]) -> list[SparseDist]:
        rows = oracle.logits(tree, nodes)
        return [draft_distribution(row, self.draft_params) for row in rows]


def attach_used_distributions(tree: TokenTree, dists: dict[int, SparseDist]) -> None:
    """Keep q only for nodes that got children: the verifier needs nothing else."""
    tree.q = {node: d for node, d in dists.items() if tree.children_of(node)}
