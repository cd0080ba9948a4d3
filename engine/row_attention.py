"""Attention in which every query row is computed exactly as it would be alone: a tree node's row
equals the row of the same path decoded one token at a time, bit for bit, in float32 and bf16.

Why: speculation is exact only if verifying a token inside a tree gives the same logits as decoding
it. With batch-invariant linear layers (engine.packed_linear) attention is the one place where a
row meets the others: a masked attention kernel over R query rows and L keys reduces over all L
keys (hidden ones add zeros, at other places in the sum) and picks its blocking from R and L, so a
tree row drifts from the decode row in the last bits. In bf16 that flips greedy tokens at near-ties
(a 1.5B target's greedy demo output changed after ~40 tokens on an AVX512-BF16 EPYC).

How: each row attends to its visible keys only, gathered in cache order (the cached prefix, then
its ancestors), with no mask: scores, softmax and the weighted sum of values in float32 (bf16
inputs are widened exactly, the output rounded once), each a reduction over one row's own keys. Rows
are computed one at a time with the same calls and shapes as a one-row decode over the same keys
(batching rows of equal key counts into one matmul gave other bits for some shapes: BLAS may pick
another kernel for a batch). A row that sees exactly the first keys (a prompt row, a decode row)
takes them as a slice, the others gather theirs.

Why not scaled_dot_product_attention over the gathered keys: on one CPU thread its bf16 kernel
took 240-670 microseconds a call here, 112 ms of a 16-node tree's 265 ms forward of a 28-layer
1.5B model (an AVX512-BF16 EPYC), against 30-230 for these float32 matmuls; and its float32 kernel
is not batch-invariant beyond ~40 keys.

Cost: a few small calls per row and layer, plus the gathers. For CPU targets; a GPU keeps its fused
kernels.
"""
from __future__ import annotations

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTENTION_NAME = "dyspec_rows"


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


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, row_exact_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_row_exact_attention(model) -> str:
    """Make `model` (a transformers decoder LM) attend row by row; returns the implementation it had."""
    before = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    return before
