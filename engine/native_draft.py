"""A 4-bit draft's forward of a few rows as one native call (engine/kernels/draft_layers.c).

Why: the lean forward (engine.lean_decoder) spends, on one AVX2 core, ~20 ms of a one-row forward
of the Qwen2.5-Coder-0.5B int4 draft in its linear layers and ~8 ms in the ~20 small torch ops a
layer around them; a draft forwards one or two rows at a time, several times a round. Here the
decoder layers of a forward of up to MAX_ROWS rows run in one C call; the embedding, the rotary
tables, the final norm and the lm_head stay in torch (one op each). The rows may be several
sessions' (the draft batcher's forwards, engine.batched_forward), each on its own cache.

The keys and values live in a StaticKVCache that grows by doubling (`growable`), so the C code writes
a forward's rows straight into the session's buffers; everything that edits a cache the DynamicCache
way (the runner's commits and checkpoints, the draft batcher's batched forwards, prefills past
MAX_ROWS through the lean forward) works on the same buffers.

Used where every decoder linear layer is an Int4DraftLinear, the model is on the CPU and the kernels
run on one thread (a draft has its own core); anything else keeps the lean forward
(`native_unsupported` says why). A draft's numerics never change the output: the target verifies
each child against the distribution the draft sent. Tests compare it with the lean forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import native
from engine.int4_draft import Int4DraftLinear
from engine.kernel_threads import kernel_threads
from engine.static_cache import StaticKVCache

# Past 8 rows the products are the forward (16 rows: 133 ms either way on one AVX2 Zen 3 core) and the
# lean forward, which runs prefills and wide tree layers, costs the same.
MAX_ROWS = 8
INITIAL_TOKENS = 256  # a session's first buffers; they double as it grows
_LINEARS = ("qkv", "o_proj", "gate_up", "down_proj")


def native_unsupported(model) -> str | None:
    """None if `model` (an engine.lean_decoder.LeanCausalLM) can run its few-row forwards natively,
    else why not."""
    if model.embed_tokens.weight.device.type != "cpu":
        return "the model is not on the CPU"
    if model.embed_tokens.weight.dtype != torch.float32:
        return f"activations in {model.embed_tokens.weight.dtype} (the native layers take float32)"
    if getattr(model.config, "hidden_act", "silu") != "silu":
        return f"activation {model.config.hidden_act!r} (the native layers apply SiLU)"
    if model.head_dim % 2:
        return "an odd head dimension"
    for layer in model.layers:
        for name in _LINEARS:
            if not isinstance(getattr(layer, name), Int4DraftLinear):
                return f"{name} is {type(getattr(layer, name)).__name__}, not 4-bit (--draft-dtype int4)"
        first = model.layers[0]  # the native layers take one epsilon for every norm and one scaling
        if (layer.eps, layer.post_eps, layer.scaling) != (first.eps, first.eps, first.scaling):
            return "norm epsilons or attention scalings that differ between norms or layers"
    try:
        native.library()
    except native.KernelUnavailable as error:
        return str(error)
    return None


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


class NativeDraftRunner:
    """LeanCausalLM.use_static_cache's runner on a CPU: `runner(cache, ids, positions, mask, keep)`
    (ids and positions 1-D, mask [1, 1, rows, cached + rows] additive) returns the last `keep` rows'
    logits and advances the cache by the rows. `use_native_draft` installs it."""

    def __init__(self, model):
        reason = native_unsupported(model)
        if reason is not None:
            raise ValueError(f"no native draft forward for this model: {reason}")
        self.model = model
        self.isa = model.layers[0].qkv.panels.isa
        fields = []
        for layer in model.layers:
            for name in _LINEARS:
                linear = getattr(layer, name)
                fields += [_address(linear.panels.panels), _address(linear.bias)]
            fields += [_address(layer.input_norm), _address(layer.post_norm)]
        self.weights = torch.tensor(fields, dtype=torch.int64)  # the tensors live as long as the model
        first = model.layers[0]
        self.eps, self.scaling = first.eps, first.scaling
        self.native_forwards = 0
        self.lean_forwards = 0  # past MAX_ROWS, or with kernels on several threads

    def __call__(self, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 keep: int) -> torch.Tensor:
        from engine.lean_decoder import LeanSegment

        return self.forward_packed(ids, positions, [LeanSegment(cache, ids.shape[0], mask, keep)])

    def runs(self, segments) -> bool:
        """Whether a forward of these segments (LeanSegments) runs natively here."""
        return (sum(s.rows for s in segments) <= MAX_ROWS and kernel_threads() == 1
                and all(isinstance(s.cache, StaticKVCache) and s.cache.growable for s in segments))

    @torch.inference_mode()
    def forward_packed(self, ids: torch.Tensor, positions: torch.Tensor, segments) -> torch.Tensor:
        """LeanCausalLM._forward's contract: `ids` / `positions` are the segments' rows (LeanSegments:
        cache, rows, additive mask [1, 1, rows, cached + rows], keep) one after another; the kept rows'
        logits, segment after segment; each cache grows by its rows. Several segments are several
        sessions' rows (the draft batcher's forward), sharing the reads of the weights."""
        model = self.model
        if not self.runs(segments):
            self.lean_forwards += 1
            return model._forward(ids, positions, segments)
        starts, visible = [], []
        for s in segments:
            start = s.cache.get_seq_length()
            if any(layer.key_length != start or layer.value_length != start for layer in s.cache.layers):
                raise ValueError("the KV cache's layers hold different lengths")
            seen = s.mask[0, 0] > torch.finfo(s.mask.dtype).min / 2
            if seen.shape != (s.rows, start + s.rows):
                raise ValueError(f"the mask covers {tuple(seen.shape)}, the forward {s.rows} rows over {start} cached")
            starts.append(start)
            visible.append(seen)
        if sum(s.rows for s in segments) != ids.shape[0]:
            raise ValueError(f"the segments cover {sum(s.rows for s in segments)} rows, the forward {ids.shape[0]}")
        for s, start in zip(segments, starts):
            s.cache.reserve(start + s.rows)  # may move the buffers: their addresses are read after this
        offsets = torch.zeros(ids.shape[0] + 1, dtype=torch.int64)
        offsets[1:] = torch.cat([seen.sum(dim=1) for seen in visible]).cumsum(dim=0)
        cols = torch.cat([seen.nonzero()[:, 1] for seen in visible])
        h = model.embed_tokens(ids).contiguous()
        cos, sin = model.rotary_emb(h[None], positions[None])
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        caches = torch.tensor([_address(buffer) for layer in range(len(model.layers)) for s in segments
                               for buffer in (s.cache.layers[layer].key_buffer, s.cache.layers[layer].value_buffer)],
                              dtype=torch.int64)
        rows = torch.tensor([s.rows for s in segments], dtype=torch.int64)
        start_at = torch.tensor(starts, dtype=torch.int64)
        capacity = torch.tensor([s.cache.max_tokens for s in segments], dtype=torch.int64)
        code = native.library().dyspec_draft_layers(
            self.isa, len(model.layers), self.weights.data_ptr(), len(segments), rows.data_ptr(), start_at.data_ptr(),
            capacity.data_ptr(), caches.data_ptr(), model.hidden, model.heads, model.kv_heads, model.head_dim,
            model.layers[0].intermediate, self.eps, self.scaling, cos.data_ptr(), sin.data_ptr(), offsets.data_ptr(),
            cols.data_ptr(), h.data_ptr())
        if code:
            raise native.KernelUnavailable(f"dyspec_draft_layers returned {code}")
        for s in segments:
            s.cache.advance(s.rows)
        self.native_forwards += 1
        ends = rows.cumsum(dim=0).tolist()
        kept = torch.cat([torch.arange(end - s.keep, end) for s, end in zip(segments, ends)])
        return model.lm_head(F.rms_norm(h[kept], (model.hidden,), model.norm, model.norm_eps))


def use_native_draft(model) -> NativeDraftRunner:
    """Run `model`'s few-row forwards natively from now on: its sessions get growable static caches
    of INITIAL_TOKENS positions. Raises ValueError (native_unsupported's reason) where it cannot."""
    runner = NativeDraftRunner(model)
    model.use_static_cache(INITIAL_TOKENS, runner, growable=True)
    return runner


__all__ = ["INITIAL_TOKENS", "MAX_ROWS", "NativeDraftRunner", "native_unsupported", "use_native_draft"]
