"""A KV cache in buffers allocated once, for forwards whose shapes and addresses must not change
(CUDA graphs: engine.graphed_forward), with the DynamicCache surface the sessions use.

Why: transformers' DynamicCache grows each layer with torch.cat, so every forward gets new tensors
at new addresses, which a captured CUDA graph cannot follow. Here each layer owns [1, kv heads,
max_tokens, head dim] buffers and a length; the sessions (dyspec.hf_runner, the draft batcher) keep
reading and rewriting `layer.keys` / `layer.values` as they do on a DynamicCache:

- reading gives a view of the buffer's first `length` positions;
- assigning a prefix view of the buffer (truncation) only moves the length;
- assigning any other tensor (a restored tail, torch.cat of two parts) copies it into the buffer;
- in-place writes into a view (dyspec.hf_runner._keep_positions) write the buffer.

Positions past a layer's length hold stale values that no mask lets a query see.
"""
from __future__ import annotations

import torch


def _store(buffer: torch.Tensor, tensor: torch.Tensor) -> int:
    """Make `buffer`'s first positions hold `tensor` ([1, heads, n, dim]); returns n."""
    n = tensor.shape[2]
    if n > buffer.shape[2]:
        raise ValueError(f"the static KV cache holds {buffer.shape[2]} tokens, {n} were asked for")
    if tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride():
        return n  # a prefix view of the buffer: its values are in place already
    if tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
        tensor = tensor.clone()  # another view of the same buffer: copying in place could overlap
    buffer[:, :, :n].copy_(tensor)
    return n


class StaticLayer:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        self.key_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.value_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.key_length = self.value_length = 0

    def resize(self, tokens: int) -> None:
        """New buffers of `tokens` positions holding the current keys and values (reserve)."""
        for name, length in (("key_buffer", self.key_length), ("value_buffer", self.value_length)):
            old = getattr(self, name)
            new = torch.zeros((*old.shape[:2], tokens, old.shape[3]), dtype=old.dtype, device=old.device)
            new[:, :, :length].copy_(old[:, :, :length])
            setattr(self, name, new)

    @property
    def keys(self) -> torch.Tensor:
        return self.key_buffer[:, :, :self.key_length]

    @keys.setter
    def keys(self, tensor: torch.Tensor) -> None:
        self.key_length = _store(self.key_buffer, tensor)

    @property
    def values(self) -> torch.Tensor:
        return self.value_buffer[:, :, :self.value_length]

    @values.setter
    def values(self, tensor: torch.Tensor) -> None:
        self.value_length = _store(self.value_buffer, tensor)


class StaticKVCache:
    """Per-layer static buffers of `max_tokens` positions, for one session. `growable`: a forward
    that needs more positions moves every layer into buffers twice as large (or as large as needed)
    instead of failing: for CPU forwards that write the buffers directly (engine.native_draft),
    where no captured graph holds the old addresses. Buffers never shrink."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_tokens: int, dtype: torch.dtype, device,
                 growable: bool = False):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.growable = max_tokens, growable
        self.layers = [StaticLayer((1, kv_heads, max_tokens, head_dim), dtype, device) for _ in range(num_layers)]
        self.resizes = 0  # buffer moves so far (a forward that holds buffer addresses must look them up after one)

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` positions: grows a growable cache, else raises ValueError past max_tokens."""
        if tokens <= self.max_tokens:
            return
        if not self.growable:
            raise ValueError(f"the static KV cache holds {self.max_tokens} tokens; {tokens} were asked for")
        self.max_tokens = max(tokens, 2 * self.max_tokens)
        for layer in self.layers:
            layer.resize(self.max_tokens)
        self.resizes += 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """DynamicCache.update: append [1, kv heads, n, dim] to layer `layer_idx`; its keys and values."""
        layer = self.layers[layer_idx]
        start, n = layer.key_length, key_states.shape[2]
        self.reserve(start + n)
        layer.key_buffer[:, :, start:start + n].copy_(key_states)
        layer.value_buffer[:, :, start:start + n].copy_(value_states)
        layer.key_length = layer.value_length = start + n
        return layer.keys, layer.values

    def advance(self, rows: int) -> None:
        """Count `rows` positions written past every layer's length by a forward that wrote the
        buffers directly (engine.lean_decoder's static forward)."""
        for layer in self.layers:
            layer.key_length += rows
            layer.value_length += rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].key_length

    def crop(self, max_length: int) -> None:
        """DynamicCache.crop: keep the first max_length positions (negative: drop that many)."""
        keep = max_length if max_length >= 0 else self.get_seq_length() + max_length
        for layer in self.layers:
            layer.key_length = min(layer.key_length, max(0, keep))
            layer.value_length = min(layer.value_length, max(0, keep))


__all__ = ["StaticKVCache", "StaticLayer"]
