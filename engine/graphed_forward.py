"""Draft forwards on static KV caches with bucketed row counts, captured as CUDA graphs on a GPU.

Why: on the H200 one draft forward of the 0.5B cost ~16 ms at any row count
(benchmarks/reports/gpu_costs): kernel launches, not arithmetic. A CUDA graph replays a whole
forward's launches at once. It needs fixed shapes and fixed addresses. The rows are padded to a
bucket (1, 2, 4, ..., 64), and each session's keys and values live in a StaticKVCache that never
moves (engine.static_cache). The forward written for that, LeanCausalLM.forward_static, attends
over the whole buffer under a mask.

Padding: a padded row has token 0 at position 0, sees only cache position 0, and writes its keys
and values just past the real rows. That stretch is past the cache's length, where nothing reads
it; the next forward overwrites it. The real rows' logits do not depend on the padding: every
op is row-wise but attention, and attention masks the padding out.

On a CPU there are no graphs: the runner pads and calls forward_static eagerly. That is the code
a graph would capture, so the tests check it there against the lean forward on a DynamicCache.
Capture and replay themselves run only on a GPU, and this session had none: they are written,
not measured.
Graphs are kept per (session cache, bucket) and dropped when the cache is freed; every graph
shares one memory pool.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from engine.static_cache import StaticKVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the static tensors the graph reads: ids, positions, slots, mask
    logits: torch.Tensor  # the static tensor it writes


class StaticForwardRunner:
    """LeanCausalLM.use_static_cache's runner: `runner(cache, ids, positions, mask, keep)` as the
    lean forward's arguments (ids and positions 1-D, mask [1, 1, rows, cached + rows]); the last
    `keep` rows' logits. `graphs`: capture CUDA graphs (default: when the model is on a GPU)."""

    def __init__(self, model, graphs: bool | None = None):
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a GPU")
        self.captured: dict[tuple[int, int], _Captured] = {}
        self.pool = None
        self.static_forwards = 0  # forwards padded to a bucket (replayed graphs on a GPU)
        self.eager_forwards = 0  # forwards past the largest bucket or the cache's end: the lean forward, unpadded

    def __call__(self, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 keep: int) -> torch.Tensor:
        rows, length = ids.shape[0], cache.get_seq_length()
        bucket = next((b for b in BUCKETS if b >= rows), None)
        if bucket is None or length + bucket > cache.max_tokens:  # a prefill, or near the end of the cache
            self.eager_forwards += 1
            from engine.lean_decoder import LeanSegment

            return self.model._forward(ids.to(self.device), positions.to(self.device),
                                       [LeanSegment(cache, rows, mask, keep)])
        self.static_forwards += 1
        inputs = self.padded(cache, ids, positions, mask, bucket)
        logits = self._replay(cache, bucket, inputs) if self.graphs else self.model.forward_static(*inputs, cache)
        cache.advance(rows)
        return logits[rows - keep:rows]

    def padded(self, cache: StaticKVCache, ids, positions, mask, bucket: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, mask) of `bucket` rows: the real rows first, then padding."""
        rows, length, device = ids.shape[0], cache.get_seq_length(), self.device
        padded_ids = torch.zeros(bucket, dtype=torch.long, device=device)
        padded_ids[:rows] = ids.to(device)
        padded_positions = torch.zeros(bucket, dtype=torch.long, device=device)
        padded_positions[:rows] = positions.to(device)
        slots = torch.arange(length, length + bucket, device=device)
        dtype = self.model.embed_tokens.weight.dtype
        full = torch.full((bucket, cache.max_tokens), torch.finfo(dtype).min, dtype=dtype, device=device)
        full[:rows, :length + rows] = mask[0, 0].to(device, dtype)
        full[rows:, 0] = 0  # a padded row sees position 0 only (a row that sees nothing gives NaN)
        return padded_ids, padded_positions, slots, full

    def _replay(self, cache: StaticKVCache, bucket: int, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        key = (id(cache), bucket)
        captured = self.captured.get(key)
        if captured is None:
            captured = self._capture(cache, inputs)
            self.captured[key] = captured
            weakref.finalize(cache, self.captured.pop, key, None)
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        captured.graph.replay()
        return captured.logits.clone()

    def _capture(self, cache: StaticKVCache, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        """Warm up on a side stream (as torch's CUDA-graph notes ask), then capture one forward.
        Both write this forward's slots, which the replay then writes again."""
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.forward_static(*static, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.forward_static(*static, cache)
        self.pool = graph.pool()
        return _Captured(graph, static, logits)


__all__ = ["BUCKETS", "StaticForwardRunner"]
