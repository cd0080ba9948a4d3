"""Attention in which every query row is computed exactly as it would be alone: a tree node's row
equals the row of the same path decoded one token at a time, bit for bit, in float32 and bf16.

Why: speculation is exact only if verifying a token inside a tree gives the same logits as decoding
it. With batch-invariant linear layers (engine.packed_linear) attention is the one place where a
row meets the others: a masked attention kernel over R query rows and L keys reduces over all L
keys (hidden ones add zeros, at other places in the sum) and picks its blocking from R and L, so a
tree row drifts from the decode row in the last bits. In bf16 that flips greedy tokens at near-ties
(a 1.5B target's greedy demo output changed after ~40 tokens on an AVX512-BF16 EPYC).

How: each row attends to its visible keys only, in cache order (the cached prefix, then its
ancestors), with no mask: scores, softmax and the weighted sum of values in float32 (bf16 inputs are
widened exactly, the output rounded once), every sum over one row's own keys in a fixed order.
engine/kernels/row_attention.c does all rows of a layer in one call (about 0.2 ms per layer for a
16-node tree over a 128-token prompt); where it cannot be built, the same math runs on torch ops a
row at a time, each row with the calls and shapes of a one-row decode (batching rows of equal key
counts into one matmul gave other bits for some shapes: BLAS may pick another kernel for a batch).
Either path is chosen once per process, so decode and tree rows always share it.

Why not scaled_dot_product_attention over the gathered keys: on one CPU thread its bf16 kernel
took 240-670 microseconds a call here, 112 ms of a 16-node tree's 265 ms forward of a 28-layer
1.5B model (an AVX512-BF16 EPYC); and its float32 kernel is not batch-invariant beyond ~40 keys.

For CPU targets; a GPU keeps its fused kernels.
"""
from __future__ import annotations

import functools
import logging

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from engine import native

log = logging.getLogger(__name__)
ATTENTION_NAME = "dyspec_rows"


@functools.lru_cache(maxsize=1)
def _kernel():
    """The native kernel (engine/kernels/row_attention.c), or None where it cannot be built or run:
    chosen once per process, so a decode row and a tree row always take the same path."""
    try:
        lib = native.library()
        if lib.dyspec_best_isa() < 1:
            raise native.KernelUnavailable("this CPU has no AVX2 + FMA")
        return lib.dyspec_row_attention
    except native.KernelUnavailable as error:
        log.warning("row-exact attention runs on torch ops (slower): %s", error)
        return None


def visible_keys(attention_mask: torch.Tensor | None, batch: int, rows: int, keys: int) -> torch.Tensor:
    """bool [batch, rows, keys]: which keys each query row sees. None means causal with the rows
    last; a bool mask is True where visible; an additive float mask is 0 where visible."""
    if attention_mask is None:
        causal = torch.ones(rows, keys, dtype=torch.bool).tril(diagonal=keys - rows)
        return causal.expand(batch, rows, keys)
    mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
    if mask.shape[1] != 1:
        raise ValueError(f"a per-head attention mask is not supported, got shape {tuple(attention_mask.shape)}")
    mask = mask[:, 0, -rows:, -keys:] if mask.dtype == torch.bool else mask[:, 0, -rows:, -keys:] == 0
    return mask.expand(batch, rows, keys).cpu()


def attend(q: torch.Tensor, kv: torch.Tensor, dim: int) -> torch.Tensor:
    """One query row over the keys it sees: q [H, D] (float32, already scaled), kv [Hkv, c, D + Dv]
    (float32 keys and values side by side) -> [H, Dv]."""
    heads = q.shape[0]
    kv_heads = kv.shape[0]
    grouped = q.view(kv_heads, heads // kv_heads, dim)  # the query heads that share a key head
    scores = torch.matmul(grouped, kv[..., :dim].transpose(-1, -2))  # [Hkv, rep, c]
    return torch.matmul(torch.softmax(scores, dim=-1), kv[..., dim:]).reshape(heads, -1)


def row_exact_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """ALL_ATTENTION_FUNCTIONS' signature: query [B, H, R, D], key/value [B, Hkv, L, D] ->
    ([B, R, H, Dv], None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("row-exact attention does not support softcap")
    batch, heads, rows, dim = query.shape
    keys = key.shape[2]
    scaling = dim ** -0.5 if scaling is None else scaling
    visible = visible_keys(attention_mask, batch, rows, keys)
    kernel = _kernel() if query.device.type == "cpu" else None
    if kernel is not None:
        return _native_attention(kernel, query, key, value, visible, scaling), None
    counts = visible.sum(dim=2).tolist()
    # a row that sees exactly the first `count` keys (a prompt row, a chain's row, a decode) slices them
    prefix_like = (visible.cumsum(dim=2) == torch.arange(1, keys + 1)).sum(dim=2).tolist()
    zero = torch.zeros(heads, value.shape[-1], dtype=torch.float32, device=query.device)
    outputs = []
    for b in range(batch):
        q = (query[b].float() * scaling).transpose(0, 1)  # [R, H, D]
        kv = torch.cat([key[b], value[b]], dim=-1).float()  # [Hkv, L, D + Dv]: one gather per row
        for row in range(rows):
            count = counts[b][row]
            if count == 0:  # it sees no key (padding): its output is 0
                outputs.append(zero)
            elif prefix_like[b][row] == count:
                outputs.append(attend(q[row], kv[:, :count], dim))
            else:
                columns = visible[b, row].nonzero().flatten().to(key.device)
                outputs.append(attend(q[row], kv.index_select(1, columns), dim))
    out = torch.stack(outputs).view(batch, rows, heads, -1)
    return out.to(query.dtype), None


def _native_attention(kernel, query, key, value, visible, scaling: float) -> torch.Tensor:
    """The same per row in one call per batch item (engine/kernels/row_attention.c)."""
    batch, heads, rows, dim = query.shape
    kv_heads, keys, dv = key.shape[1], key.shape[2], value.shape[-1]
    out = torch.empty(batch, rows, heads, dv, dtype=torch.float32)
    for b in range(batch):
        offsets = torch.zeros(rows + 1, dtype=torch.int64)
        offsets[1:] = visible[b].sum(dim=1).cumsum(dim=0)
        cols = visible[b].nonzero()[:, 1].contiguous()  # row-major: each row's keys ascending
        q = (query[b].float() * scaling).transpose(0, 1).contiguous()  # [R, H, D]
        k, v = key[b].float().contiguous(), value[b].float().contiguous()  # [Hkv, L, D]
        code = kernel(q.data_ptr(), rows, heads, dim, k.data_ptr(), v.data_ptr(), kv_heads, keys, dv,
                      offsets.data_ptr(), cols.data_ptr(), out[b].data_ptr())
        if code != 0:
            raise native.KernelUnavailable(f"dyspec_row_attention returned {code}")
    return out.to(query.dtype)


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, row_exact_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_row_exact_attention(model) -> str:
    """Make `model` (a transformers decoder LM) attend row by row; returns the implementation it had."""
    before = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    return before
