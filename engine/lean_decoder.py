"""A lean forward for a draft model: the same decoder as transformers' Llama / Qwen2, in far fewer ops.

Why. A draft forwards one or two rows at a time, many times a round, and at one row its weights
are small: the Qwen2.5-Coder-0.5B draft's int8 forward spent ~19.7 of its ~26.6 ms in the linear
kernels and ~7 ms in transformers' module and op overhead (about 45 small ops per layer: each norm
in five ops, three projections for q/k/v, RoPE on q and k separately, the attention interface's
dispatch, two projections for gate/up). Here each layer is about 15 ops:

- q, k and v are one linear layer (their weights stacked), gate and up another, so a layer calls
  four matmuls instead of seven (and the int8 / packed kernels then see wider matrices);
- RMSNorm is torch's fused `rms_norm`; RoPE rotates q and k in one go, with cos/sin computed once
  per forward by the model's own rotary module (so its scaling variants stay the model's);
- attention is torch's SDPA with grouped KV heads, on the session's own DynamicCache, with the
  additive mask the session built, exactly as it is handed to transformers.

It is not numerically identical to transformers' forward (fused RMSNorm rounds differently, and
the stacked matmuls may sum in another order), so it is for drafts only: a draft's numerics never
change the output, because the target verifies every child against the distribution the draft
sends (DESIGN.md, "where speed comes from"). Tests check it against transformers to fp32
tolerance and the same argmax.

`LeanCausalLM` is called like the transformers model by dyspec.hf_runner (input_ids,
attention_mask, position_ids, cache, logits_to_keep) and batches many sessions' rows like
engine.batched_forward.forward_segments (through `forward_packed`), each session on its own cache and mask.

Models: Llama and Qwen2 architectures (RMSNorm, RoPE, grouped KV heads, gated MLP, no sliding
window). `lean_supported` says why another model keeps its own forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.static_cache import StaticKVCache

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def lean_supported(model: nn.Module) -> str | None:
    """None if `model` can run as a LeanCausalLM, else why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (lean forwards cover {', '.join(SUPPORTED_MODEL_TYPES)})"
    if model._forward_pre_hooks or model._forward_hooks:
        return "the model has forward hooks, which only its own forward runs"
    decoder = model.model
    for layer in decoder.layers:
        attention = layer.self_attn
        if getattr(attention, "sliding_window", None):
            return "sliding-window attention"
        if getattr(layer.mlp, "down_proj", None) is None or getattr(layer.mlp, "gate_proj", None) is None:
            return "a decoder layer without a gated MLP"
        if type(layer.input_layernorm).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm"):
            return f"norm {type(layer.input_layernorm).__name__}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return None


def _stacked_linear(layers: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose outputs are the given layers' outputs side by side."""
    weight = torch.cat([layer.weight.detach() for layer in layers], dim=0)
    has_bias = any(layer.bias is not None for layer in layers)
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        stacked.weight.copy_(weight)
        if has_bias:
            stacked.bias.copy_(torch.cat([
                layer.bias.detach() if layer.bias is not None
                else torch.zeros(layer.out_features, device=weight.device, dtype=weight.dtype) for layer in layers]))
    return stacked.requires_grad_(False)


class LeanLayer(nn.Module):
    """One decoder layer's weights, stacked for the lean forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        self.qkv = _stacked_linear([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj = attention.o_proj
        self.gate_up = _stacked_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act = mlp.act_fn
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.eps = float(layer.input_layernorm.variance_epsilon)
        self.post_eps = float(layer.post_attention_layernorm.variance_epsilon)
        self.scaling = float(attention.scaling)
        self.intermediate = mlp.gate_proj.out_features


@dataclass
class LeanSegment:
    """One session's rows in a forward (the fields of engine.batched_forward.Segment)."""

    cache: object  # transformers DynamicCache: this forward appends the rows' keys and values
    rows: int
    mask: torch.Tensor  # additive [1, 1, rows, cached + rows]
    keep: int  # logits of the last `keep` rows are returned


@dataclass
class LeanOutput:
    logits: torch.Tensor  # [1, kept rows, vocab]


class LeanCausalLM(nn.Module):
    """A Llama / Qwen2 causal LM run by the lean forward. Built from a loaded transformers model
    (before its linear layers are quantised or packed: those then replace this module's linears
    by name, the stacked ones included); the transformers model is not kept."""

    def __init__(self, model: nn.Module):
        super().__init__()
        reason = lean_supported(model)
        if reason is not None:
            raise ValueError(f"no lean forward for this model: {reason}")
        decoder = model.model
        self.embed_tokens = decoder.embed_tokens  # first parameter: the runners read dtype and device here
        self.layers = nn.ModuleList(LeanLayer(layer) for layer in decoder.layers)
        self.norm = decoder.norm.weight
        self.norm_eps = float(decoder.norm.variance_epsilon)
        self.rotary_emb = decoder.rotary_emb
        self.lm_head = model.lm_head
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.heads = model.config.num_attention_heads
        self.kv_heads = getattr(model.config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // self.heads
        self.hidden = model.config.hidden_size
        self.static_tokens = 0  # > 0: sessions get StaticKVCaches of this size (use_static_cache)
        self.static_runner = None  # runs forwards on static caches (engine.graphed_forward, engine.native_draft)
        self.static_growable = False
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache, logits_to_keep: int = 1, use_cache: bool = True) -> LeanOutput:
        """As dyspec.hf_runner calls a transformers model: batch 1, an additive 4-D mask over the
        cached and new rows, explicit positions; the cache grows by the rows."""
        if input_ids.shape[0] != 1:
            raise ValueError("the lean forward takes one sequence (batch 1); batch sessions with forward_segments")
        rows = input_ids.shape[1]
        if not 1 <= logits_to_keep <= rows:
            raise ValueError(f"logits_to_keep must be in [1, {rows}], got {logits_to_keep}")
        if self.static_runner is not None and isinstance(cache, StaticKVCache):
            logits = self.static_runner(cache, input_ids[0], position_ids.reshape(-1), attention_mask, logits_to_keep)
            return LeanOutput(logits[None])
        segment = LeanSegment(cache, rows, attention_mask, logits_to_keep)
        return LeanOutput(self._forward(input_ids[0], position_ids.reshape(-1), [segment])[None])

    def forward_packed(self, ids: torch.Tensor, positions: torch.Tensor, segments) -> torch.Tensor:
        """engine.batched_forward.forward_segments' forward for this model: `ids` and `positions` are
        every Segment's rows packed in order; the kept rows' logits, segment after segment, from one
        forward over all of them; each cache grows by its rows."""
        lean = [LeanSegment(s.cache, len(s.input_ids), s.mask, s.keep) for s in segments]
        packed = getattr(self.static_runner, "forward_packed", None)
        if packed is not None:  # engine.native_draft: a few rows of several sessions in one native call
            return packed(ids, positions, lean)
        return self._forward(ids, positions, lean)

    def new_cache(self):
        """The cache a session of this model starts with (dyspec.hf_runner): static buffers of
        `static_tokens` positions once use_static_cache was called, else transformers' DynamicCache."""
        if self.static_tokens:
            return StaticKVCache(len(self.layers), self.kv_heads, self.head_dim, self.static_tokens,
                                 self.embed_tokens.weight.dtype, self.embed_tokens.weight.device, self.static_growable)
        from transformers import DynamicCache

        return DynamicCache()

    def use_static_cache(self, max_tokens: int, runner=None, growable: bool = False) -> None:
        """Sessions get StaticKVCaches of `max_tokens` positions (`growable`: they double when full),
        and a forward on one goes through `runner` (engine.graphed_forward.StaticForwardRunner:
        bucketed rows, CUDA graphs on a GPU; engine.native_draft.NativeDraftRunner on a CPU)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.static_tokens, self.static_runner, self.static_growable = max_tokens, runner, growable

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, segments: list[LeanSegment]) -> torch.Tensor:
        n = ids.shape[0]
        masks = [s.mask.to(self.embed_tokens.weight.device, self.embed_tokens.weight.dtype) for s in segments]
        bounds, start = [], 0
        for s in segments:
            bounds.append((start, start + s.rows))
            start += s.rows
        if start != n:
            raise ValueError(f"the segments cover {start} rows, the forward has {n}")

        def attend(layer, index, q, k, v):
            if len(segments) == 1:
                return self._attend(layer, index, segments[0].cache, q, k, v, masks[0])
            return torch.cat([self._attend(layer, index, s.cache, q[:, a:b], k[:, a:b], v[:, a:b], mask)
                              for s, mask, (a, b) in zip(segments, masks, bounds)], dim=0)

        h = self._decoder(ids, positions, attend)
        kept = torch.cat([torch.arange(b - s.keep, b) for s, (_, b) in zip(segments, bounds)]).to(h.device)
        h = F.rms_norm(h.index_select(0, kept), (self.hidden,), self.norm, self.norm_eps)
        return self.lm_head(h)

    @torch.inference_mode()
    def forward_static(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                       cache: StaticKVCache) -> torch.Tensor:
        """Logits of every row, with shapes fixed by the row count and the cache's size alone (what a
        CUDA graph captures): row i's keys and values are written at cache position slots[i] of
        every layer, and row i attends over the whole buffer under mask[i] ([rows, max_tokens],
        additive). The cache's lengths are the caller's to move (StaticKVCache.advance)."""
        attn_mask = mask.to(self.embed_tokens.weight.dtype)[None, None]

        def attend(layer, index, q, k, v):
            buffers = cache.layers[index]
            buffers.key_buffer[0].index_copy_(1, slots, k)
            buffers.value_buffer[0].index_copy_(1, slots, v)
            return self._sdpa(layer, q, buffers.key_buffer, buffers.value_buffer, attn_mask)

        h = self._decoder(ids, positions, attend)
        return self.lm_head(F.rms_norm(h, (self.hidden,), self.norm, self.norm_eps))

    def _decoder(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers over rows `ids` at `positions`; `attend(layer, index, q, k, v)` does the
        attention (q [heads, rows, dim], k/v [kv heads, rows, dim]) and returns [rows, heads * dim]."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        n, half = ids.shape[0], self.head_dim // 2
        h = self.embed_tokens(ids)
        cos, sin = self.rotary_emb(h[None], positions[None].to(h.device))
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [rows, 1, dim]: broadcast over heads
        for index, layer in enumerate(self.layers):
            x = F.rms_norm(h, (self.hidden,), layer.input_norm, layer.eps)
            qkv = layer.qkv(x).view(n, heads + 2 * kv_heads, dim)
            qk = qkv[:, :heads + kv_heads]
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rotated * sin
            q = qk[:, :heads].transpose(0, 1)
            k = qk[:, heads:].transpose(0, 1)
            v = qkv[:, heads + kv_heads:].transpose(0, 1)
            h = h + layer.o_proj(attend(layer, index, q, k, v))
            x = F.rms_norm(h, (self.hidden,), layer.post_norm, layer.post_eps)
            gate, up = layer.gate_up(x).split(layer.intermediate, dim=-1)
            h = h + layer.down_proj(layer.act(gate) * up)
        return h

    def _attend(self, layer: LeanLayer, index: int, cache, q, k, v, mask) -> torch.Tensor:
        """One session's attention: q [heads, rows, dim], k/v [kv_heads, rows, dim] (appended to its
        cache), mask [1, 1, rows, keys]; returns [rows, heads * dim]."""
        keys, values = cache.update(k[None], v[None], index)
        return self._sdpa(layer, q, keys, values, mask)

    def _sdpa(self, layer: LeanLayer, q, keys, values, mask) -> torch.Tensor:
        """q [heads, rows, dim] over keys / values [1, kv heads, keys, dim] under an additive mask
        [1, 1, rows, keys]; returns [rows, heads * dim], the heads side by side for o_proj."""
        out = F.scaled_dot_product_attention(q[None], keys, values, attn_mask=mask, scale=layer.scaling,
                                             enable_gqa=self.kv_heads != self.heads)
        return out[0].transpose(0, 1).reshape(q.shape[1], self.heads * self.head_dim)


__all__ = ["LeanCausalLM", "SUPPORTED_MODEL_TYPES", "lean_supported"]
