"""Tree attention inputs: an additive float mask and explicit position ids, derived from parents.

The query block is `suffix` (committed tokens whose KV is not cached yet; its last token is the
root) followed by the tree's nodes. Suffix tokens attend causally; node i attends to the cache,
the whole suffix, its ancestors and itself. Positions: suffix token j sits at n_cached + j, and a
node of depth d at n_cached + n_suffix - 1 + d. An additive float mask (0 / dtype min) is used
because a boolean mask is silently wrong under eager attention in transformers 5.x, and
position ids must always be passed (see shared ENVIRONMENT notes).
"""
from __future__ import annotations

import torch

from dyspec.tree import ROOT, TokenTree


def ancestor_matrix(parents: list[int]) -> torch.Tensor:
    """bool [n, n]: row i marks i itself and every ancestor of i (parents precede children)."""
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p != ROOT:
            anc[i] = anc[p]
        anc[i, i] = True
    return anc


def tree_attention_inputs(
    tree: TokenTree, n_cached: int, n_suffix: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mask [1, 1, q, n_cached + q], position_ids [1, q]) with q = n_suffix + len(tree)."""
    assert n_suffix >= 1, "the root must be in the suffix"
    n = len(tree)
    q_len = n_suffix + n
    visible = torch.zeros(q_len, n_cached + q_len, dtype=torch.bool)
    visible[:, :n_cached] = True
    visible[:n_suffix, n_cached:n_cached + n_suffix] = torch.ones(n_suffix, n_suffix, dtype=torch.bool).tril()
    visible[n_suffix:, n_cached:n_cached + n_suffix] = True
    if n:
        visible[n_suffix:, n_cached + n_suffix:] = ancestor_matrix(tree.parents)
    mask = torch.zeros(q_len, n_cached + q_len, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    positions = torch.empty(q_len, dtype=torch.long)
    positions[:n_suffix] = torch.arange(n_cached, n_cached + n_suffix)
    if n:
        positions[n_suffix:] = n_cached + n_suffix - 1 + torch.tensor(tree.depths, dtype=torch.long)
    return mask[None, None], positions[None]
