"""The token tree: one type, parent pointers as the source of truth.

Glossary (used across `dyspec/`):
  root      the last committed token whose KV is not yet cached on the target; it is not a node.
            Node indices are 0..n-1; `parents[i] == -1` means "child of the root".
  node      a drafted token. Nodes are stored in creation order, so a parent always has a smaller
            index than its children (checked by `validate`).
  children  kept in the order they were drawn: verification tries siblings in that order.
  q         the exact draft distribution an expanded node's children were drawn from
            (tempered, truncated, renormalised). Key -1 holds the root's. A node whose children
            were chosen deterministically (top-k, best-first) stores no q: the verifier then uses
            the deterministic rule (each child's q is one-hot).
  value     the builder's estimate of the probability that the verifier examines and accepts the
            node (DySpec: the draft path probability). Used for ordering and for the budget policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

ROOT = -1


class Draw(str, Enum):
    """How siblings were drawn; the verifier's rule must match it (the losslessness invariant)."""

    WITHOUT_REPLACEMENT = "without_replacement"  # sibling k ~ q with earlier siblings removed
    WITH_REPLACEMENT = "with_replacement"  # siblings i.i.d. ~ q (SpecInfer)
    DETERMINISTIC = "deterministic"  # siblings chosen, not drawn: each child's q is one-hot


@dataclass(frozen=True)
class SparseDist:
    """A probability distribution over the vocabulary, stored on its support.

    ids:   int64 [k], distinct token ids, most probable first (see warp.warped_sparse for the order).
    probs: float32 [k], > 0, summing to 1 (within fp32 rounding).
    The float32 values are canonical: the drafter samples from exactly these numbers (upcast to
    float64) and the verifier uses exactly these numbers, in-process or after the wire.
    """

    ids: torch.Tensor
    probs: torch.Tensor

    def weights64(self) -> torch.Tensor:
        """float64 [k] renormalised: the one definition of q used by sampler and verifier alike."""
        w = self.probs.double()
        return w / w.sum()

    def dense(self, vocab_size: int) -> torch.Tensor:
        """float64 [vocab_size] with the mass of `weights64` on `ids`."""
        out = torch.zeros(vocab_size, dtype=torch.float64)
        out[self.ids] = self.weights64()
        return out


@dataclass
class TokenTree:
    """A drafted token tree below one root. Mutable only while a builder grows it."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # children of the root have depth 1
    children: dict[int, list[int]] = field(default_factory=dict)  # node (or ROOT) -> children in draw order
    q: dict[int, SparseDist] = field(default_factory=dict)  # node (or ROOT) -> distribution drawn from
    draw: Draw = Draw.WITHOUT_REPLACEMENT

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, value: float) -> int:
        """Append a child of `parent` (ROOT or a node index); returns the new node's index."""
        assert parent == ROOT or 0 <= parent < len(self.tokens), parent
        node = len(self.tokens)
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.values.append(float(value))
        self.depths.append(1 if parent == ROOT else self.depths[parent] + 1)
        self.children.setdefault(parent, []).append(node)
        return node

    def children_of(self, node: int) -> list[int]:
        return self.children.get(node, [])

    def path_tokens(self, node: int) -> list[int]:
        """Tokens from the root's first child down to `node` inclusive."""
        out = []
        while node != ROOT:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def max_depth(self) -> int:
        return max(self.depths, default=0)

    @staticmethod
    def from_arrays(tokens, parents, q: dict[int, SparseDist] | None = None,
                    draw: Draw = Draw.WITHOUT_REPLACEMENT) -> "TokenTree":
        """Rebuild a tree from flat arrays (the wire form); children order = index order."""
        tree = TokenTree(draw=Draw(draw))
        for tok, par in zip(tokens, parents):
            if par != ROOT and not 0 <= par < len(tree.tokens):
                raise ValueError(f"node {len(tree.tokens)}: parent {par} must precede it")
            tree.add(int(par), int(tok), 0.0)
        tree.q = dict(q or {})
        return tree


def validate_tree(tree: TokenTree, vocab_size: int, max_nodes: int) -> None:
    """Raise ValueError with a precise message if `tree` is not a well-formed verification input.

    Checks: sizes, parent order, token range, every q a distribution that contains the tokens
    drawn from it, and no q attached to a node without children. Used at trust boundaries.
    """
    n = len(tree.tokens)
    if n > max_nodes:
        raise ValueError(f"tree has {n} nodes, limit is {max_nodes}")
    if len(tree.parents) != n:
        raise ValueError(f"{n} tokens but {len(tree.parents)} parents")
    for i, (tok, par) in enumerate(zip(tree.tokens, tree.parents)):
        if not 0 <= tok < vocab_size:
            raise ValueError(f"node {i}: token {tok} outside vocabulary [0, {vocab_size})")
        if par != ROOT and not 0 <= par < i:
            raise ValueError(f"node {i}: parent {par} must be -1 or an earlier node")
    for node, dist in tree.q.items():
        if node != ROOT and not 0 <= node < n:
            raise ValueError(f"distribution attached to unknown node {node}")
        kids = tree.children_of(node)
        if not kids:
            raise ValueError(f"distribution attached to node {node}, which has no children")
        ids, probs = dist.ids, dist.probs
        if ids.ndim != 1 or ids.shape != probs.shape or ids.numel() == 0:
            raise ValueError(f"node {node}: distribution ids and probs must be equal-length 1-D")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"node {node}: distribution ids outside vocabulary")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError(f"node {node}: distribution ids are not distinct")
        if not torch.isfinite(probs).all() or bool((probs <= 0).any()):
            raise ValueError(f"node {node}: probabilities must be finite and > 0")
        total = float(probs.double().sum())
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"node {node}: probabilities sum to {total:.6f}, not 1")
        support = set(ids.tolist())
        for child in kids:
            if tree.tokens[child] not in support:
                raise ValueError(f"node {child}: token {tree.tokens[child]} has zero draft probability")
    for node in [ROOT, *range(n)]:
        kids = tree.children_of(node)
        if not kids:
            continue
        if tree.draw is not Draw.DETERMINISTIC and node not in tree.q:
            raise ValueError(f"node {node} has children but no draft distribution ({tree.draw.value} tree)")
        if tree.draw is not Draw.WITH_REPLACEMENT:
            toks = [tree.tokens[k] for k in kids]
            if len(set(toks)) != len(toks):
                raise ValueError(f"node {node}: duplicate sibling tokens in a {tree.draw.value} tree")
