"""Adapters from transformers causal LMs to the draft and target sessions of dyspec.decoding.

The model is called with its own forward and a tree mask argument: never a forked model file.
Every call passes an additive float mask and explicit position ids (both required for exact
tree attention in transformers 5.x) and a `DynamicCache` the runner owns.

This is the one module of `dyspec` that touches transformers (for `DynamicCache`), and it only
calls models it is given: loading lives in model_store.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from dyspec.tree import ROOT, TokenTree
from dyspec.tree_attention import tree_attention_inputs
from dyspec.verify import Verdict


def _keep_positions(cache: DynamicCache, base: int, sources: list[int]) -> None:
    """Make cache positions base.. hold the entries at `sources` (ascending, >= base), then drop
    everything after them. Only the tail is rewritten; the committed prefix is not copied."""
    with torch.inference_mode():  # the cache tensors were created under inference mode
        _keep_positions_inplace(cache, base, sources)


def _keep_positions_inplace(cache: DynamicCache, base: int, sources: list[int]) -> None:
    for layer in cache.layers:
        if sources != list(range(base, base + len(sources))):
            idx = torch.tensor(sources, dtype=torch.long, device=layer.keys.device)
            layer.keys[:, :, base:base + len(sources)] = layer.keys[:, :, idx]
            layer.values[:, :, base:base + len(sources)] = layer.values[:, :, idx]
        layer.keys = layer.keys[:, :, :base + len(sources)]
        layer.values = layer.values[:, :, :base + len(sources)]


def session_cache(model):
    """The cache a session of `model` starts with: one the model brings (engine.lean_decoder: static
    buffers for CUDA graphs or native draft forwards), else transformers' DynamicCache."""
    return model.new_cache() if hasattr(model, "new_cache") else DynamicCache()


class _CausalLMSession:
    """Committed tokens and a KV cache over a prefix of them (`n_cached`)."""

    def __init__(self, model, prompt: list[int]):
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        self.model = model
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.tokens = [int(t) for t in prompt]
        self.cache = session_cache(model)
        self.n_cached = 0

    @property
    def suffix(self) -> list[int]:
        return self.tokens[self.n_cached:]

    def _forward(self, input_ids: list[int], mask: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last `keep` query rows, float32, on the model's device. Masks and
        positions are built on the CPU and moved with the ids."""
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([input_ids], device=self.device),
                             attention_mask=mask.to(self.device, self.dtype), position_ids=positions.to(self.device),
                             cache=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0].float()


class HFTargetSession(_CausalLMSession):
    """Verifies root + tree in one masked forward; keeps only the accepted path in its cache.

    The logits stay on the model's device: verification reads the argmax of every row (greedy) or
    the rows on its walk (sampling). Copying all rows to the host cost 10x the forward itself for
    a 511-node tree over a 152k vocabulary on an H200 (benchmarks/reports/gpu_costs)."""

    def forward_tree(self, tree: TokenTree) -> torch.Tensor:
        ids, mask, positions, keep = self.tree_rows(tree)
        return self._forward(ids, mask, positions, keep)

    def prefill(self) -> int:
        """Cache the uncached prompt but its last token (the next round's root) now, in a forward of
        its own, instead of with the first tree; the number of tokens forwarded. A target service runs
        it right after opening the session, while the draft drafts the first tree. With
        batch-invariant kernels and row-exact attention (engine) the cached rows are the bits the
        first round would have computed. A failed forward leaves the cache as it was."""
        rows = self.prefill_rows()
        if rows is None:
            return 0
        try:
            self._forward(*rows, keep=1)
        except BaseException:
            self.drop_uncached()
            raise
        return self.prefilled(len(rows[0]))

    def prefill_rows(self) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """What `prefill` forwards, (input ids, mask, positions), for a forward of several sessions'
        prompts (engine.batched_forward.prefill_sessions); None when nothing is left to cache."""
        rows = self.suffix[:-1]
        if not rows:
            return None
        mask, positions = tree_attention_inputs(TokenTree(), self.n_cached, len(rows), self.dtype)
        return rows, mask, positions

    def prefilled(self, rows: int) -> int:
        """After a forward of `prefill_rows`: they are cached. Returns `rows`."""
        self.n_cached += rows
        return rows

    def drop_uncached(self) -> None:
        """Drop what a failed forward appended past the cached rows."""
        _keep_positions(self.cache, self.n_cached, [])

    def tree_rows(self, tree: TokenTree) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
        """What one round forwards: (input ids, mask, positions, rows of logits to keep). A
        batched forward over several sessions (engine.batched_forward) takes these as they are;
        `commit` then works as after forward_tree."""
        suffix = self.suffix
        mask, positions = tree_attention_inputs(tree, self.n_cached, len(suffix), self.dtype)
        self._tree_base = self.n_cached + len(suffix)
        return suffix + tree.tokens, mask, positions, len(tree) + 1

    def commit(self, tree: TokenTree, verdict: Verdict) -> None:
        base = self._tree_base
        _keep_positions(self.cache, base, [base + a for a in verdict.accepted])
        self.tokens += verdict.tokens
        self.n_cached = base + len(verdict.accepted)  # the next token's KV is computed next round


class HFDraftSession(_CausalLMSession):
    """Grows the draft side of a tree: each `logits` call forwards the requested nodes (and, on
    the round's first call, the uncached suffix ending in the root) in one batch."""

    def __init__(self, model, prompt: list[int], forward_rows=None):
        """`forward_rows(own_forward, cache, ids, mask, positions, keep)`, if given, runs each draft
        forward instead of this session (a draft worker batching its sessions' forwards into one,
        draft_service.draft_batcher); `own_forward()` is this session's forward alone."""
        super().__init__(model, prompt)
        self.forward_rows = forward_rows
        self._slot: dict[int, int] = {}  # node -> cache position, this round
        self._round_base = None  # cache position of the first tree node, this round

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        prefix_rows = []
        if self._round_base is None:
            assert ROOT in nodes, "the root is expanded before any node"
            prefix_rows = self.suffix
        n_before = self.cache.get_seq_length()
        tree_nodes = [n for n in nodes if n != ROOT]
        q_len = len(prefix_rows) + len(tree_nodes)
        visible = torch.zeros(q_len, n_before + q_len, dtype=torch.bool)
        visible[:, :self.n_cached] = True
        positions = torch.empty(q_len, dtype=torch.long)
        if prefix_rows:
            s = len(prefix_rows)
            visible[:s, self.n_cached:self.n_cached + s] = torch.ones(s, s, dtype=torch.bool).tril()
            positions[:s] = torch.arange(self.n_cached, self.n_cached + s)
            self._round_base = self.n_cached + s
        base = self._round_base
        visible[len(prefix_rows):, self.n_cached:base] = True  # every node sees the whole suffix
        for row, node in enumerate(tree_nodes, start=len(prefix_rows)):
            slot = n_before + row
            self._slot[node] = slot
            ancestor = tree.parents[node]
            while ancestor != ROOT:
                visible[row, self._slot[ancestor]] = True
                ancestor = tree.parents[ancestor]
            visible[row, slot] = True
            positions[row] = base - 1 + tree.depths[node]
        mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, torch.finfo(self.dtype).min)
        ids = [*prefix_rows, *(tree.tokens[n] for n in tree_nodes)]
        mask, positions = mask[None, None], positions[None]
        if self.forward_rows is None:
            logits = self._forward(ids, mask, positions, keep=q_len)
        else:
            logits = self.forward_rows(lambda: self._forward(ids, mask, positions, keep=q_len), self.cache, ids,
                                       mask, positions, q_len)
        logits = logits.cpu()  # builders warp and sample on the host
        rows = {n: logits[len(prefix_rows) + i] for i, n in enumerate(tree_nodes)}
        if prefix_rows:
            rows[ROOT] = logits[len(prefix_rows) - 1]
        return torch.stack([rows[n] for n in nodes])

    def renumber(self, mapping: dict[int, int]) -> None:
        """The builder's tree numbers nodes differently from the one it forwarded (see
        DraftOracle): re-key this round's slots; nodes left out keep their slots until the commit
        drops every slot off the accepted path."""
        self._slot = {mapping[n]: s for n, s in self._slot.items() if n in mapping}

    def checkpoint(self) -> tuple:
        """A mark for `restore` (dyspec.overlap): the committed state and a copy of the cache tail
        this round wrote (its tree slots), the only part a commit rewrites in place."""
        base = self._round_base if self._round_base is not None else self.n_cached
        # Taken after the round's first forward, so every layer holds the prefix.
        tail = [(layer.keys[:, :, base:].clone(), layer.values[:, :, base:].clone()) for layer in self.cache.layers]
        return len(self.tokens), self.n_cached, dict(self._slot), self._round_base, base, tail

    def restore(self, mark: tuple) -> None:
        n_tokens, n_cached, slot, round_base, base, tail = mark
        with torch.inference_mode():
            for layer, (keys, values) in zip(self.cache.layers, tail):
                layer.keys = torch.cat([layer.keys[:, :, :base], keys], dim=2)
                layer.values = torch.cat([layer.values[:, :, :base], values], dim=2)
        del self.tokens[n_tokens:]
        self.n_cached, self._slot, self._round_base = n_cached, slot, round_base

    def commit(self, tree: TokenTree, verdict: Verdict) -> None:
        base = self._round_base if self._round_base is not None else self.n_cached
        kept = []
        for node in verdict.accepted:  # forwarded nodes form a prefix of the accepted path
            if node not in self._slot:
                break
            kept.append(self._slot[node])
        _keep_positions(self.cache, base, kept)
        self.tokens += verdict.tokens
        self.n_cached = base + len(kept)
        self._slot, self._round_base = {}, None


__all__ = ["HFDraftSession", "HFTargetSession", "session_cache"]
