"""Conversions between dyspec types and dyspec.v1 messages, exact in both directions.

Trees travel as flat arrays; draft distributions keep their canonical fp32 probabilities (a proto
`float` holds an fp32 value exactly) and int ids, so the verifier sees bit-identical q. Only
shape is checked here; `dyspec.tree.validate_tree` does the semantic checks at the target.
"""
from __future__ import annotations

import torch

from dyspec.tree import ROOT, Draw, SparseDist, TokenTree
from dyspec.verify import Verdict
from dyspec.warp import SamplingParams
from proto.dyspec.v1 import sampling_pb2, target_pb2

MAX_SEED = 2**63 - 1  # seeds are int64 on the wire; streams are derived with dyspec.coins.stream_seed

_DRAW_TO_WIRE = {
    Draw.WITHOUT_REPLACEMENT: target_pb2.DRAW_MODE_WITHOUT_REPLACEMENT,
    Draw.WITH_REPLACEMENT: target_pb2.DRAW_MODE_WITH_REPLACEMENT,
    Draw.DETERMINISTIC: target_pb2.DRAW_MODE_DETERMINISTIC,
}
_DRAW_FROM_WIRE = {wire: draw for draw, wire in _DRAW_TO_WIRE.items()}


def tree_to_proto(tree: TokenTree, round_number: int) -> target_pb2.Tree:
    dists = [target_pb2.DraftDistribution(node_index=node, token_ids=d.ids.tolist(), probs=d.probs.tolist())
             for node, d in sorted(tree.q.items())]
    return target_pb2.Tree(round=round_number, token_ids=tree.tokens, parent_indices=tree.parents,
                           draw_mode=_DRAW_TO_WIRE[tree.draw], distributions=dists)


def tree_from_proto(msg: target_pb2.Tree) -> TokenTree:
    """Rebuild the tree; ValueError on shape errors (children order = index order, as drawn)."""
    if msg.draw_mode not in _DRAW_FROM_WIRE:
        raise ValueError(f"draw_mode must be one of {sorted(target_pb2.DrawMode.keys())[1:]}, got {msg.draw_mode}")
    if len(msg.token_ids) != len(msg.parent_indices):
        raise ValueError(f"{len(msg.token_ids)} token_ids but {len(msg.parent_indices)} parent_indices")
    q: dict[int, SparseDist] = {}
    for dist in msg.distributions:
        if dist.node_index in q:
            raise ValueError(f"two distributions for node {dist.node_index}")
        if len(dist.token_ids) != len(dist.probs):
            raise ValueError(f"node {dist.node_index}: {len(dist.token_ids)} token_ids but {len(dist.probs)} probs")
        q[dist.node_index] = SparseDist(ids=torch.tensor(list(dist.token_ids), dtype=torch.long),
                                        probs=torch.tensor(list(dist.probs), dtype=torch.float32))
    return TokenTree.from_arrays(list(msg.token_ids), list(msg.parent_indices), q, _DRAW_FROM_WIRE[msg.draw_mode])


def sampling_to_proto(params: SamplingParams, seed: int | None) -> sampling_pb2.SamplingParams:
    return sampling_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                       seed=seed)


def sampling_from_proto(msg: sampling_pb2.SamplingParams) -> tuple[SamplingParams, int | None]:
    """(params, seed or None); ValueError for values plain sampling does not define."""
    if msg.HasField("seed") and msg.seed > MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63), got {msg.seed}")
    top_p = 1.0 if msg.top_p == 0 else msg.top_p  # 0 is the unset proto default
    params = SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=top_p)
    if params.temperature == float("inf"):
        raise ValueError("temperature must be finite")
    return params, (msg.seed if msg.HasField("seed") else None)


def verdict_to_proto(verdict: Verdict, round_number: int, timings: target_pb2.VerifyTimings) -> target_pb2.Verdict:
    return target_pb2.Verdict(round=round_number, accepted_node_indices=verdict.accepted,
                              next_token_id=verdict.next_token, timings=timings)


def verdict_from_proto(msg: target_pb2.Verdict, tree: TokenTree, vocab_size: int) -> Verdict:
    """The verdict for `tree`; ValueError unless the accepted nodes form a path from the root."""
    parent = ROOT
    for node in msg.accepted_node_indices:
        if not 0 <= node < len(tree) or tree.parents[node] != parent:
            raise ValueError(f"accepted nodes {list(msg.accepted_node_indices)} are not a path from the root")
        parent = node
    if not 0 <= msg.next_token_id < vocab_size:
        raise ValueError(f"next token {msg.next_token_id} outside vocabulary [0, {vocab_size})")
    return verdict_on(tree, list(msg.accepted_node_indices), msg.next_token_id)


def verdict_on(tree: TokenTree, accepted: list[int], next_token: int) -> Verdict:
    """A Verdict from its wire fields: the committed tokens are the accepted nodes' and next_token."""
    return Verdict(accepted, int(next_token), [tree.tokens[a] for a in accepted] + [int(next_token)])
