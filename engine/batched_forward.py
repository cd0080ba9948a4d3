"""One forward over the new rows of many sessions: each session keeps its own KV cache, its own
positions and its own tree mask, and its rows' logits equal those of the same rows forwarded
alone.

How: the sessions' rows are packed into one sequence (batch 1, ragged, no padding). Every layer
outside attention works row by row (embeddings, norms, RoPE on explicit positions, MLP, the
linear layers), so the packed rows go through them together; where a kernel is batch-invariant
(engine.packed_linear's float32 kernel is) the rows come out bit-identical to a forward of one
session alone. Attention is the one place rows of different sessions must not meet: a registered
attention function splits the packed queries, keys and values by session, appends each session's
keys and values to that session's own cache, and calls the model's own attention kernel once per
session with exactly the shapes (and mask) of that session's forward alone.

Why not padding: a padded batch changes the attention kernel's shapes (the key length is the
longest session's), so the reductions may run in another order and results drift in the last
bits; it also computes the padding. Ragged packing costs nothing and keeps exactness.

Models: transformers decoder LMs whose attention calls `ALL_ATTENTION_FUNCTIONS` with
`(module, query, key, value, attention_mask, **kwargs)` and whose forward passes extra keyword
arguments down to it (Llama, Qwen2 and their relatives in transformers 5.x). The caller runs one
forward at a time per model (the target's model thread).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

if TYPE_CHECKING:
    from dyspec.hf_runner import HFTargetSession
    from dyspec.tree import TokenTree

ATTENTION_NAME = "dyspec_segments"
_PLAN_KWARG = "dyspec_segments_plan"


@dataclass
class Segment:
    """One session's part of a batched forward."""

    cache: DynamicCache  # the session's cache; this forward appends the segment's keys and values
    input_ids: list[int]  # the rows to forward (uncached suffix + tree nodes)
    mask: torch.Tensor  # additive float [1, 1, len(input_ids), cached + len(input_ids)], as forwarded alone
    positions: torch.Tensor  # long [1, len(input_ids)]
    keep: int  # logits of the last `keep` rows are returned


@dataclass
class _Plan:
    segments: list[Segment]
    bounds: list[tuple[int, int]]  # [start, end) of each segment in the packed rows
    inner: str  # the model's own attention implementation


def _inner_attention(name: str, module: torch.nn.Module):
    if name == "eager":  # each model file defines its own eager attention
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _segments_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention per session over the packed rows: query/key/value are [1, heads, rows, dim]."""
    plan: _Plan = kwargs.pop(_PLAN_KWARG)
    inner = _inner_attention(plan.inner, module)
    outputs = []
    for segment, (start, end) in zip(plan.segments, plan.bounds):
        keys, values = segment.cache.update(key[:, :, start:end], value[:, :, start:end], module.layer_idx)
        mask = segment.mask.to(query.device, query.dtype)
        out, _ = inner(module, query[:, :, start:end], keys, values, mask, **kwargs)
        outputs.append(out)  # [1, rows, heads, dim]
    return torch.cat(outputs, dim=1), None


def _no_mask(*args, **kwargs):
    return None  # each segment carries its own mask; the model must not build a packed one


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _segments_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _no_mask)


@contextlib.contextmanager
def _attention_swapped(model) -> Iterator[str]:
    config = model.config
    inner = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield inner
    finally:
        config._attn_implementation = inner


def forward_segments(model, segments: list[Segment]) -> list[torch.Tensor]:
    """Logits (float32, [keep, vocab], on the model's device) of each segment's last `keep` rows,
    from one forward of the model over every segment's rows; each cache grows by its rows."""
    if not segments:
        return []
    bounds, start = [], 0
    for segment in segments:
        rows = len(segment.input_ids)
        if rows == 0 or not 1 <= segment.keep <= rows:
            raise ValueError(f"a segment needs >= 1 row and 1 <= keep <= rows, got {rows} rows, keep {segment.keep}")
        if segment.mask.shape[-2] != rows or segment.positions.shape[-1] != rows:
            raise ValueError("a segment's mask and positions must have one row per input id")
        bounds.append((start, start + rows))
        start += rows
    device = next(model.parameters()).device
    ids = torch.tensor([[t for s in segments for t in s.input_ids]], device=device)
    positions = torch.cat([s.positions.reshape(1, -1) for s in segments], dim=1).to(device)
    if hasattr(model, "forward_packed"):  # a model with its own ragged forward (engine.lean_decoder)
        logits = model.forward_packed(ids[0], positions[0], segments).float()
    else:
        wanted = torch.cat([torch.arange(end - s.keep, end) for s, (_, end) in zip(segments, bounds)]).to(device)
        with torch.inference_mode(), _attention_swapped(model) as inner:
            out = model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False,
                        logits_to_keep=wanted, **{_PLAN_KWARG: _Plan(segments, bounds, inner)})
        logits = out.logits[0].float()
    split, at = [], 0
    for segment in segments:
        split.append(logits[at:at + segment.keep])
        at += segment.keep
    return split


def forward_rounds(model, rounds: list[tuple["HFTargetSession", "TokenTree"]]) -> list[torch.Tensor]:
    """Each (target session, tree)'s logits ([tree nodes + 1, vocab], as `forward_tree` returns
    them) from one forward over all of them; each session's `commit` then works as after its own
    `forward_tree`. One round alone takes the session's own forward: the same kernels, shapes and
    bits as without batching."""
    if len(rounds) == 1:
        session, tree = rounds[0]
        return [session.forward_tree(tree)]
    segments = []
    for session, tree in rounds:
        ids, mask, positions, keep = session.tree_rows(tree)
        segments.append(Segment(session.cache, ids, mask, positions, keep))
    return forward_segments(model, segments)


def prefill_sessions(model, sessions: list["HFTargetSession"]) -> list[int]:
    """Each target session's prompt but its last token cached (HFTargetSession.prefill), all in one
    forward; the tokens each one cached. Each cache gets the rows its own prefill would give it (the
    engine's kernels are batch-invariant and attention is row-exact), in one read of the weights and
    with the prompts' rows in one product, where one prefill a forward paid a forward each. A failed
    forward leaves every cache as it was and raises. A lone session takes its own prefill."""
    work = [(session, rows) for session in sessions if (rows := session.prefill_rows()) is not None]
    if len(work) == 1:
        return [session.prefill() for session in sessions]
    try:
        forward_segments(model, [Segment(session.cache, ids, mask, positions, 1) for session, (ids, mask, positions)
                                 in work])
    except BaseException:
        for session, _ in work:
            session.drop_uncached()
        raise
    cached = {id(session): session.prefilled(len(rows[0])) for session, rows in work}
    return [cached.get(id(session), 0) for session in sessions]
