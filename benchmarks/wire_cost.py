"""Serialisation cost of tree messages (serving/wire.py), measured on synthetic trees so it needs
no model: bytes and seconds per shipped draft distribution of `support` entries, and per bare node.

Draft side: tree_to_proto + TargetRequest.SerializeToString. Target side: TargetRequest.FromString
+ tree_from_proto. Together with the bytes a real run sent (benchmarks.wire_counter), this
estimates how many distributions a run shipped and what serialising them cost.
"""
from __future__ import annotations

import time

import torch

from dyspec.tree import ROOT, Draw, SparseDist, TokenTree
from proto.dyspec.v1 import target_pb2
from serving.wire import tree_from_proto, tree_to_proto


def _chain(nodes: int, vocab_size: int, support: int, with_dists: bool, seed: int = 0) -> TokenTree:
    gen = torch.Generator().manual_seed(seed)
    tree = TokenTree(draw=Draw.WITHOUT_REPLACEMENT)
    parent = ROOT
    for _ in range(nodes):
        if with_dists:
            ids = torch.randperm(vocab_size, generator=gen)[:support]
            probs = torch.rand(support, generator=gen).float()
            tree.q[parent] = SparseDist(ids=ids, probs=probs / probs.sum())
        parent = tree.add(parent, int(torch.randint(vocab_size, (1,), generator=gen)), 0.5)
    return tree


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def serialisation_cost(vocab_size: int, support: int, nodes: int = 8, repeats: int = 3) -> dict:
    """Per distribution of `support` entries (over a vocabulary of `vocab_size`) and per bare node:
    protobuf bytes, and the best-of-`repeats` draft-side and target-side seconds."""
    support = min(support or vocab_size, vocab_size)
    out = {"vocab_size": vocab_size, "support": support}
    for with_dists in (False, True):
        tree = _chain(nodes, vocab_size, support, with_dists)
        request = target_pb2.TargetRequest(tree=tree_to_proto(tree, 1))
        data = request.SerializeToString()
        draft_s = _time(lambda: target_pb2.TargetRequest(tree=tree_to_proto(tree, 1)).SerializeToString(), repeats)
        target_s = _time(lambda: tree_from_proto(target_pb2.TargetRequest.FromString(data).tree), repeats)
        if not with_dists:
            out.update(bytes_per_node=len(data) / nodes, draft_s_per_node=draft_s / nodes, target_s_per_node=target_s / nodes)
        else:
            bare = out["bytes_per_node"] * nodes
            out.update(bytes_per_dist=(len(data) - bare) / nodes,
                       draft_s_per_dist=max(0.0, draft_s - out["draft_s_per_node"] * nodes) / nodes,
                       target_s_per_dist=max(0.0, target_s - out["target_s_per_node"] * nodes) / nodes)
    return out
