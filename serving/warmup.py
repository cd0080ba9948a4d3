"""Warm-up before READY: a few real forwards through the serving path, so the first request runs at
steady-state speed.

The first forward of a freshly loaded model pages its weights in, allocates the KV-cache and
attention buffers and (on some kernels) picks algorithms; on a slow machine that made a first round
miss the draft's 10 s deadline ("target did not answer round 1 within 10 s"). Each service therefore
runs, before it serves, what a request does: a prefill of a short dummy prompt, a multi-row tree
forward over a KV cache, a 1-token decode, and another small tree over the grown cache, through the
very session objects serving uses (so masks, position ids, dtype and cache layout are the real ones).

The target warms up through its SessionBackend: under tensor parallelism that is the MirroredBackend,
which broadcasts each Open / Forward / Commit / Release to the follower ranks exactly as for a real
request, so every rank runs the same forwards in the same order and no collective can deadlock.

Every forward a warm-up runs touches every weight matrix (the embedding only at the dummy tokens'
rows). The dummy tokens are fixed, so a warm-up is deterministic; it leaves no session behind.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from dyspec.tree import ROOT, TokenTree
from serving.wire import verdict_on

log = logging.getLogger(__name__)
WARMUP_SESSION_ID = "_warmup"  # outside the engine's session store; never visible to clients
PROMPT_TOKENS = 8
TREE_NODES = 6
# node -> parent: two roots' children, a branch below the first, a path of depth 4 (0 -> 2 -> 4 -> 5)
_PARENTS = (ROOT, ROOT, 0, 0, 2, 4)
_ACCEPTED = (0, 2)  # a path from the root, so the commit keeps and reorders cache entries like a real one


@dataclass(frozen=True)
class WarmupResult:
    forwards: int
    rows: tuple[int, ...]  # query rows of each forward, in order
    seconds: float

    def describe(self) -> str:
        return f"warm-up: {self.forwards} forwards in {self.seconds:.2f} s (rows {list(self.rows)})"


def dummy_tokens(count: int, vocab_size: int, offset: int = 0) -> list[int]:
    """Fixed, varied token ids inside the vocabulary (not all one id: some kernels short-cut repeats)."""
    return [(7 * (i + offset) + 3) % vocab_size for i in range(count)]


def _sizes(max_context_tokens: int, max_tree_nodes: int) -> tuple[int, int]:
    """(prompt tokens, tree nodes) that fit the context: the prompt, two trees, the accepted path
    and a bonus token per round."""
    nodes = max(0, min(TREE_NODES, max_tree_nodes))
    prompt = min(PROMPT_TOKENS, max_context_tokens - 2 * (nodes + 1) - 2)
    if prompt < 1:  # a tiny context: one token and no tree still warms every weight
        return 1, 0
    return prompt, nodes


def _tree(nodes: int, vocab_size: int, offset: int) -> TokenTree:
    parents = [p if p < nodes else ROOT for p in _PARENTS[:nodes]]
    return TokenTree.from_arrays(dummy_tokens(nodes, vocab_size, offset), parents)


def _accepted(tree: TokenTree) -> list[int]:
    path, parent = [], ROOT
    for node in _ACCEPTED:
        if node < len(tree) and tree.parents[node] == parent:
            path.append(node)
            parent = node
    return path


def warm_up_target(backend, vocab_size: int, max_context_tokens: int, max_tree_nodes: int) -> WarmupResult:
    """Three verification rounds on a dummy session of `backend` (a target_service SessionBackend):
    prefill + tree, a 1-token decode (an empty tree), a tree over the cache; then release it.
    Runs on the model thread, before the server takes requests."""
    start = time.perf_counter()
    prompt_len, nodes = _sizes(max_context_tokens, max_tree_nodes)
    session = backend.create(WARMUP_SESSION_ID, dummy_tokens(prompt_len, vocab_size))
    rows = []
    try:
        for round_number, size in enumerate((nodes, 0, nodes)):
            tree = _tree(size, vocab_size, offset=100 * (round_number + 1))
            # uncached suffix (the prompt, then the previous round's bonus token) + the tree
            n_rows = (prompt_len if round_number == 0 else 1) + len(tree)
            logits = session.forward_tree(tree)
            accepted = _accepted(tree)
            next_row = 1 + accepted[-1] if accepted else 0  # the logits row after the accepted path
            next_token = int(logits[next_row].argmax()) % vocab_size
            session.commit(tree, verdict_on(tree, accepted, next_token))
            rows.append(n_rows)
    finally:
        backend.release([WARMUP_SESSION_ID])
    return WarmupResult(len(rows), tuple(rows), time.perf_counter() - start)


def warm_up_draft(model) -> WarmupResult:
    """Two drafting rounds on a dummy HFDraftSession of `model`: prefill ending in the root, a
    multi-row forward of tree nodes over the cache, a commit, then the next round's 1-token root."""
    from dyspec.hf_runner import HFDraftSession

    start = time.perf_counter()
    vocab_size = int(model.config.vocab_size)
    max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    max_context = min(max_context, getattr(model, "static_tokens", 0) or max_context)  # a static KV cache's size
    prompt_len, nodes = _sizes(max_context, TREE_NODES)
    session = HFDraftSession(model, dummy_tokens(prompt_len, vocab_size))
    rows = []
    tree = TokenTree()
    rows.append(prompt_len)
    root_logits = session.logits(tree, [ROOT])
    if nodes:
        first = tree.add(ROOT, int(root_logits[0].argmax()) % vocab_size, 1.0)
        grown = [first, *(tree.add(parent, token, 0.5) for parent, token in
                          zip(_PARENTS[1:nodes], dummy_tokens(nodes - 1, vocab_size, offset=200)))]
        rows.append(len(grown))
        session.logits(tree, grown)
    accepted = _accepted(tree)
    session.commit(tree, verdict_on(tree, accepted, dummy_tokens(1, vocab_size, offset=300)[0]))
    rows.append(1)
    session.logits(TokenTree(), [ROOT])  # the next round starts from the one uncached token
    return WarmupResult(len(rows), tuple(rows), time.perf_counter() - start)


def log_result(result: WarmupResult, what: str) -> None:
    log.info("%s %s", what, result.describe())
