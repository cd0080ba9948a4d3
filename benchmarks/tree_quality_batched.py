"""Temperature-0 scoring with every builder run of a prompt in flight at once.

Scoring one run alone is a chain of small draft forwards (a node is drawn only after its parent
was evaluated, so a deep tree costs one forward per level), and small forwards on a CPU cost
nearly as much as large ones. Here each (method, budget) run is a thread that builds its trees
as usual; their draft requests are pooled and answered by one forward over a single cache holding
each prompt + greedy continuation once (several prompts side by side, masked from each other),
with each request's nodes masked to see only their own committed prefix, root and ancestors. The
trees are those the runs would build one at a time (same builders, same coins per position);
only the batching differs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from benchmarks.pooled_forwards import Coordinator, forward_rows, masked_forward
from dyspec.builders import make_builder
from dyspec.coins import TorchCoins
from dyspec.tree import ROOT, TokenTree


COMPACT_AFTER = 1024  # cache entries beyond the sequence before finished trees' entries are dropped


@dataclass
class _Request:
    session: "PooledSession"
    tree: TokenTree
    nodes: list[int]  # off-path nodes to forward, in order
    logits: torch.Tensor | None = None  # the nodes' rows, set by the forward
    error: BaseException | None = None


class SequencePool:
    """One prefill of `sequences` (prompt + greedy continuation each) and the draft requests of
    the runs building trees along them, served by a `Coordinator`."""

    def __init__(self, draft, sequences: list[list[int]]):
        self.draft, self.sequences = draft, sequences
        self.offsets = [sum(len(x) for x in sequences[:k]) for k in range(len(sequences))]
        self.length = sum(len(x) for x in sequences)
        self.device = next(draft.parameters()).device
        # one prefill of all sequences side by side: block-diagonal causal mask, positions from 0 each
        visible = torch.zeros(self.length, self.length, dtype=torch.bool)
        positions = torch.empty(self.length, dtype=torch.long)
        for offset, seq in zip(self.offsets, sequences):
            n = len(seq)
            visible[offset:offset + n, offset:offset + n] = torch.ones(n, n, dtype=torch.bool).tril()
            positions[offset:offset + n] = torch.arange(n)
        self.cache = DynamicCache()
        # row offset+i: next-token logits after seq[:i+1]
        self.logits = masked_forward(draft, self.cache, [t for seq in sequences for t in seq], visible, positions)
        self.coordinator = Coordinator()
        self.coordinator.pools.append(self)
        self.name = "draft"
        self.pending: list[_Request] = []
        self.forwards = self.requests = self.rows = 0
        self.live: dict[int, PooledSession] = {}  # sessions whose tree is being built

    def session(self, sequence: int, n_committed: int) -> "PooledSession":
        session = PooledSession(self, sequence, n_committed)
        with self.coordinator.cond:
            self.live[id(session)] = session
        return session

    def release(self, session: "PooledSession") -> None:
        """The session's tree is built: its nodes' cache entries may go at the next compaction."""
        with self.coordinator.cond:
            self.live.pop(id(session), None)

    def run_threads(self, jobs, max_threads: int = 12, progress=None) -> None:
        self.coordinator.run_threads(jobs, max_threads=max_threads, progress=progress)

    def request(self, req: _Request) -> torch.Tensor:
        return self.coordinator.submit(self, req).logits

    def serve(self, batch: list[_Request]) -> None:
        try:
            rows = self._forward(batch)
            for req, r in zip(batch, rows):
                req.logits = r
        except BaseException as e:  # every waiter must wake, with the error
            for req in batch:
                req.error = e

    def _compact(self) -> None:
        """Drop the cache entries of finished trees (every thread is waiting: nothing else
        touches the cache or the slot maps now). Without it the cache grows by every node any
        run ever forwarded, and attention over it comes to dominate each forward."""
        base = self.length
        keep = sorted({slot for s in self.live.values() for slot in s.slot.values() if slot >= base})
        remap = {old: base + i for i, old in enumerate(keep)}
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, :base], layer.keys[:, :, idx]], dim=2)
                layer.values = torch.cat([layer.values[:, :, :base], layer.values[:, :, idx]], dim=2)
        for s in self.live.values():
            s.slot = {node: remap.get(slot, slot) for node, slot in s.slot.items()}

    def _forward(self, batch: list[_Request]) -> list[torch.Tensor]:
        if self.cache.get_seq_length() > self.length + COMPACT_AFTER:
            self._compact()
        n_before = self.cache.get_seq_length()
        rows = []
        for req in batch:
            s, tree = req.session, req.tree
            for node in req.nodes:
                slot = n_before + len(rows)
                s.slot[node] = slot
                sees = list(range(s.start, s.start + s.n_committed))  # committed prefix and the root
                ancestor = tree.parents[node]
                while ancestor != ROOT:
                    sees.append(s.slot[ancestor])
                    ancestor = tree.parents[ancestor]
                sees.append(slot)
                rows.append((tree.tokens[node], s.n_committed - 1 + tree.depths[node], sees))
        q = len(rows)
        logits = forward_rows(self.draft, self.cache, rows)
        self.forwards += 1
        self.requests += len(batch)
        self.rows += q
        out_rows, start = [], 0
        for req in batch:
            out_rows.append(logits[start:start + len(req.nodes)])
            start += len(req.nodes)
        return out_rows


@dataclass
class PooledSession:
    """A draft oracle at `n_committed` tokens into one of the pool's sequences (the root is the
    last committed token). Nodes on the sequence reuse its prefill; the rest go to the pool."""

    pool: SequencePool
    sequence: int  # which of the pool's sequences
    n_committed: int
    slot: dict[int, int] = field(default_factory=dict)  # node -> cache slot (a sequence slot when on it)
    on_path: dict[int, int] = field(default_factory=dict)  # node -> index into its sequence
    calls: int = 0

    def __post_init__(self):
        self.start = self.pool.offsets[self.sequence]
        self.on_path[ROOT] = self.n_committed - 1

    def renumber(self, mapping: dict[int, int]) -> None:
        """See dyspec.builders.base.DraftOracle: slots follow the builder's numbering."""
        self.slot = {mapping[n]: s for n, s in self.slot.items() if n in mapping}
        self.on_path = {(n if n == ROOT else mapping[n]): i for n, i in self.on_path.items() if n == ROOT or n in mapping}

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        self.calls += 1
        rows, off_path = {}, []
        seq = self.pool.sequences[self.sequence]
        for node in nodes:
            if node == ROOT:
                rows[node] = self.pool.logits[self.start + self.on_path[ROOT]]
                continue
            parent_index = self.on_path.get(tree.parents[node])
            index = None if parent_index is None else parent_index + 1
            if index is not None and index < len(seq) and tree.tokens[node] == seq[index]:
                self.on_path[node] = index
                self.slot[node] = self.start + index
                rows[node] = self.pool.logits[self.start + index]
            else:
                off_path.append(node)
        if off_path:
            rows.update(zip(off_path, self.pool.request(_Request(self, tree, off_path))))
        return torch.stack([rows[n] for n in nodes])


class _TreeMemo:
    """Nested builders (the first b nodes of a tree built with budget B >= b are the tree built
    with budget b, same coins): one tree per position, shared by the runs of every budget.

    The tree is built at the largest budget among the runs that may still come to its position
    (not finished, not past it), not at the largest budget of all: a small-budget run reaching a
    position the big runs have passed builds 16 nodes there, not 256. A run that finds the tree
    too small (a bigger run came later after all) rebuilds it bigger; any tree with at least b
    nodes scores a b-budget run exactly, so which one it gets does not change its result."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict[int, tuple[threading.Event, list, int]] = {}  # pos -> (ready, [tree], budget)
        self.limits: dict[object, int] = {}  # unfinished run -> its budget
        self.positions: dict[object, int] = {}  # unfinished run -> the position it is at (0 before it starts)

    def register(self, run, limit: int) -> None:
        with self.lock:
            self.limits[run], self.positions[run] = limit, 0

    def finish(self, run) -> None:
        with self.lock:
            self.limits.pop(run, None)
            self.positions.pop(run, None)

    def get(self, run, pos: int, limit: int, build, pool: SequencePool):
        """The tree at `pos` with at least `limit` nodes (build(budget) makes one)."""
        while True:
            with self.lock:
                self.positions[run] = pos
                entry = self.entries.get(pos)
                mine = entry is None or (entry[0].is_set() and entry[2] < limit)
                if mine:
                    budget = max(b for r, b in self.limits.items() if self.positions[r] <= pos)
                    entry = self.entries[pos] = (threading.Event(), [], budget)
            event, box, budget = entry
            if mine:
                try:
                    box.append(build(budget))
                finally:
                    event.set()
            elif not event.is_set():
                pool.coordinator.park(event)
            if not box:
                raise RuntimeError(f"the tree at position {pos} failed in another run")
            if budget >= limit:
                return box[0]


@dataclass(frozen=True)
class PromptToScore:
    sequence: int  # index into the pool's sequences (prompt + greedy continuation)
    prompt_len: int
    greedy: list[int]
    seed: int


def score_t0_pooled(pool: SequencePool, prompts: list[PromptToScore], runs: dict[str, tuple[list, dict]],
                    nested: set[str], new_tokens: int, draft_params, accepted_greedy,
                    progress=None) -> list[dict[str, dict]]:
    """runs: method -> (limits, builder options). Returns, per prompt, method -> {limit:
    (tokens/step, steps, draft calls)}: the tokens/step and steps `score_t0` gives one run at a
    time; draft calls are those of the builds that served the run (for nested builders, trees
    built at a budget between the run's and the largest, so fewer than `score_t0` counts)."""
    results: list[dict[str, dict]] = [{m: {} for m in runs} for _ in prompts]
    memos = [{m: _TreeMemo() for m in runs if m in nested} for _ in prompts]
    jobs = []

    def job(k, p, method, limit, options):
        def run():
            builder = make_builder(method, draft_params=draft_params, **options)  # fresh state per run
            pos = steps = emitted = calls = 0

            def build(budget):
                session = pool.session(p.sequence, p.prompt_len + pos)
                b = builder if method not in nested else make_builder(method, draft_params=draft_params, **options)
                try:
                    tree = b.build(session, budget, TorchCoins(p.seed * 1_000_003 + pos))
                finally:
                    pool.release(session)
                tree.q = {}  # scoring needs the shape and tokens; the distributions are ~2 MB per node
                return tree, session.calls

            memo = memos[k].get(method)
            try:
                while pos < new_tokens:
                    tree, c = memo.get(run, pos, limit, build, pool) if memo else build(limit)
                    acc = accepted_greedy(tree, p.greedy, pos, limit)
                    emitted += acc + 1
                    pos += acc + 1
                    steps += 1
                    calls += c
            finally:
                if memo:
                    memo.finish(run)
            results[k][method][limit] = (emitted / steps, steps, calls)
        if method in nested:
            memos[k][method].register(run, limit)
        return run

    for k, p in enumerate(prompts):
        for method, (limits, options) in runs.items():
            for limit in limits:
                jobs.append((limit, job(k, p, method, limit, options)))
    jobs.sort(key=lambda item: -item[0])  # biggest trees first: started last, they leave a long tail
    pool.run_threads([j for _, j in jobs], progress=progress)
    return results
