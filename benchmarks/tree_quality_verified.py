"""Temperature > 0 runs with real verification, many in flight at once.

At T > 0 the target must verify: given its tree, a round's output is not distributed as the
target's own sampling (only the average over the draft's draws is), so the T=0 shortcut of
scoring trees against a known continuation does not carry over. But the verification walk
(dyspec.verify) needs the target's distribution only at the nodes it visits, the root and each
accepted node, in walk order. So here the target forwards exactly those, one row per visited
node, instead of the whole tree; and, as in tree_quality_batched, every run of a prompt group is
a thread and the rows of all runs are pooled into shared forwards (one per model) over a cache
that holds every run side by side, each row masked to its own run's tokens.

Each run is `dyspec.generate`'s loop (same builders, same seeded draft and verify streams, the
same `speculative_round`), so it emits the tokens and accepted counts `generate` would, up to
the float rounding of batched forwards (tests/test_tree_quality_verified.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from benchmarks.pooled_forwards import Coordinator, forward_rows

from dyspec.builders import make_builder
from dyspec.coins import VERIFY_STREAM, TorchCoins, draft_coins_for_round, stream_seed
from dyspec.decoding import speculative_round, take_new_tokens
from dyspec.tree import ROOT, TokenTree
from dyspec.verify import Verdict, verify_stochastic
from dyspec.warp import SamplingParams, target_probs

COMPACT_AFTER = 2048  # cache entries no run uses any more, before they are dropped


@dataclass
class Row:
    token: int
    position: int
    sees: list[int]  # cache slots it attends to, besides itself and `sees_new`
    sees_new: tuple[int, ...] = ()  # earlier rows of the same request it attends to


@dataclass
class _Request:
    rows: list[Row]
    slots: list[int] | None = None  # the rows' cache slots, set by the forward
    logits: torch.Tensor | None = None  # float32 [len(rows), V] on the host
    error: BaseException | None = None


class ModelPool:
    """One model's KV cache shared by many runs. Rows attend to the slots they name; the runs
    (`users`) say which slots they still need, so the rest can be dropped."""

    def __init__(self, model, coordinator: Coordinator, name: str):
        self.model, self.coordinator, self.name = model, coordinator, name
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.pending: list[_Request] = []
        self.users: set = set()  # objects with slots_in_use() and remap(mapping)
        self.forwards = self.rows = self.requests = self.compactions = 0
        self._in_use_after_compaction = 0
        coordinator.pools.append(self)

    def request(self, rows: list[Row]) -> _Request:
        return self.coordinator.submit(self, _Request(rows))

    def serve(self, batch: list[_Request]) -> None:
        try:
            self._forward(batch)
        except BaseException as e:  # every waiter must wake, with the error
            for req in batch:
                req.error = e

    def forward_now(self, rows: list[Row]) -> _Request:
        """Forward outside the threads (prefills before the runs start)."""
        req = _Request(rows)
        self._forward([req])
        return req

    def _compact(self) -> dict[int, int]:
        """Keep only the slots some run still uses (every thread is waiting: nothing else reads
        the cache or the slot lists now). Returns the old -> new slot mapping."""
        keep = sorted({slot for user in self.users for slot in user.slots_in_use()})
        remap = {old: new for new, old in enumerate(keep)}
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, idx]
                layer.values = layer.values[:, :, idx]
        for user in self.users:
            user.remap(remap)
        self._in_use_after_compaction = len(keep)
        self.compactions += 1
        return remap

    def _forward(self, batch: list[_Request]) -> None:
        if self.cache.get_seq_length() > self._in_use_after_compaction + COMPACT_AFTER:
            remap = self._compact()
            for req in batch:  # the waiting rows name slots of runs, which all survive
                for r in req.rows:
                    r.sees = [remap[slot] for slot in r.sees]
        n_before = self.cache.get_seq_length()
        rows = []
        for req in batch:
            first = n_before + len(rows)
            req.slots = list(range(first, first + len(req.rows)))
            for r, slot in zip(req.rows, req.slots):
                rows.append((r.token, r.position, [*r.sees, *(first + k for k in r.sees_new), slot]))
        q = len(rows)
        logits = forward_rows(self.model, self.cache, rows)
        self.forwards += 1
        self.rows += q
        self.requests += len(batch)
        start = 0
        for req in batch:
            req.logits = logits[start:start + len(req.rows)]
            start += len(req.rows)


class PinnedSlots:
    """A shared prompt prefix's cache slots: used by every run of the prompt, never dropped."""

    def __init__(self, pool: ModelPool, tokens: list[int]):
        rows = [Row(t, i, [], tuple(range(i))) for i, t in enumerate(tokens)]
        self.slots = pool.forward_now(rows).slots if rows else []
        pool.users.add(self)

    def slots_in_use(self):
        return self.slots

    def remap(self, mapping):
        self.slots = [mapping[s] for s in self.slots]


class _RunOnPool:
    """A run's committed tokens on one pool: `slots` hold the KV of tokens[:len(slots)]; the rest
    (the last round's next token, unforwarded accepted nodes) is forwarded with the next round."""

    def __init__(self, pool: ModelPool, prefix: PinnedSlots, prompt: list[int]):
        self.pool, self.tokens, self.slots = pool, list(prompt), list(prefix.slots)
        self.node_slot: dict[int, int] = {}  # this round: tree node -> slot
        self.suffix_slots: list[int] | None = None  # this round: slots of the forwarded suffix
        pool.users.add(self)

    def close(self) -> None:
        self.pool.users.discard(self)

    def slots_in_use(self):
        return [*self.slots, *(self.suffix_slots or ()), *self.node_slot.values()]

    def remap(self, mapping):
        self.slots = [mapping[s] for s in self.slots]
        if self.suffix_slots is not None:
            self.suffix_slots = [mapping[s] for s in self.suffix_slots]
        self.node_slot = {n: mapping[s] for n, s in self.node_slot.items()}

    def suffix_rows(self) -> list[Row]:
        """The uncached committed tokens, causally after the cached ones; the last is the root."""
        n = len(self.slots)
        return [Row(t, n + i, self.slots, tuple(range(i))) for i, t in enumerate(self.tokens[n:])]

    def node_row(self, tree: TokenTree, node: int, new_rows: dict[int, int], new_suffix: int = 0) -> Row:
        """A tree node's row: it sees the committed tokens, the root and its ancestors. The suffix
        ending in the root is either cached this round or the first `new_suffix` rows of the same
        request; so are ancestors (forwarded earlier, or at `new_rows[ancestor]` in this one)."""
        sees = [*self.slots, *(self.suffix_slots or ())]
        sees_new = list(range(new_suffix))
        ancestor = tree.parents[node]
        while ancestor != ROOT:
            if ancestor in self.node_slot:
                sees.append(self.node_slot[ancestor])
            else:
                sees_new.append(new_rows[ancestor])
            ancestor = tree.parents[ancestor]
        return Row(tree.tokens[node], len(self.tokens) - 1 + tree.depths[node], sees, tuple(sees_new))

    def commit(self, verdict: Verdict) -> None:
        kept = list(self.suffix_slots or [])
        for node in verdict.accepted:  # forwarded nodes form a prefix of the accepted path
            if node not in self.node_slot:
                break
            kept.append(self.node_slot[node])
        self.slots += kept
        self.tokens += verdict.tokens
        self.node_slot, self.suffix_slots = {}, None


class PooledDraftSession(_RunOnPool):
    """dyspec.decoding.DraftSession over a pool: what HFDraftSession computes, batched with
    other runs."""

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        rows: list[Row] = []
        if self.suffix_slots is None:
            assert ROOT in nodes, "the root is expanded before any node"
            rows = self.suffix_rows()
        n_suffix = len(rows)
        tree_nodes = [n for n in nodes if n != ROOT]
        new_rows: dict[int, int] = {}
        for node in tree_nodes:
            row = self.node_row(tree, node, new_rows, new_suffix=n_suffix)
            new_rows[node] = len(rows)
            rows.append(row)
        req = self.pool.request(rows)
        if n_suffix:
            self.suffix_slots = req.slots[:n_suffix]
        for node in tree_nodes:
            self.node_slot[node] = req.slots[new_rows[node]]
        by_node = {n: req.logits[new_rows[n]] for n in tree_nodes}
        if n_suffix:
            by_node[ROOT] = req.logits[n_suffix - 1]
        return torch.stack([by_node[n] for n in nodes])

    def renumber(self, mapping: dict[int, int]) -> None:
        """See dyspec.builders.base.DraftOracle: slots follow the builder's numbering."""
        self.node_slot = {mapping[n]: s for n, s in self.node_slot.items() if n in mapping}

    def commit(self, tree: TokenTree, verdict: Verdict) -> None:
        super().commit(verdict)


class PooledVerifier(_RunOnPool):
    """dyspec.decoding.TreeVerifier over a pool: the walk of `verify_stochastic`, with the target
    forwarding only the nodes the walk visits (the root via the uncached suffix, then each
    accepted node), one row per request."""

    last_forward_s = 0.0  # forwards are shared between runs: no per-run forward time

    def __init__(self, pool, prefix, prompt, sampling: SamplingParams, coins):
        super().__init__(pool, prefix, prompt)
        if sampling.greedy:
            raise ValueError("the pooled verifier walks sampled verification; T=0 is scored without the target")
        self.sampling, self.coins = sampling, coins

    def _target_p(self, tree: TokenTree, node: int) -> torch.Tensor:
        if node == ROOT:
            rows = self.suffix_rows()
            req = self.pool.request(rows)
            self.suffix_slots = req.slots
            logits = req.logits[-1]
        else:
            req = self.pool.request([self.node_row(tree, node, {})])
            self.node_slot[node] = req.slots[0]
            logits = req.logits[0]
        return target_probs(logits, self.sampling)

    def verify(self, tree: TokenTree) -> Verdict:
        verdict = verify_stochastic(tree, lambda node: self._target_p(tree, node), self.coins)
        self.commit(verdict)
        return verdict


@dataclass(frozen=True)
class VerifiedRun:
    method: str
    budget: int
    seed: int


def run_verified_pooled(draft, target, prompts: list[list[int]], runs: list[list[VerifiedRun]], max_new_tokens: int,
                        temperature: float, draft_params: SamplingParams, options_for, progress=None,
                        max_threads: int = 12) -> tuple[list[list[dict]], dict]:
    """Every run of every prompt, in flight together. runs[k]: the runs of prompts[k];
    options_for(method): builder options. Returns, per prompt and run, {"tokens", "accepted"}:
    what `dyspec.generate(target, draft, prompt, max_new_tokens, method, budget, temperature,
    draft_params.temperature, seed, eos_token_id=[])` returns as tokens and accepted_per_step;
    and the pools' counters (forwards, rows, requests, compactions per model)."""
    coordinator = Coordinator()
    draft_pool = ModelPool(draft, coordinator, "draft")
    target_pool = ModelPool(target, coordinator, "target")
    sampling = SamplingParams(temperature)
    # the prompt without its last token is shared by the prompt's runs; the last is each run's root
    prefixes = [(PinnedSlots(draft_pool, p[:-1]), PinnedSlots(target_pool, p[:-1])) for p in prompts]
    results: list[list[dict | None]] = [[None] * len(r) for r in runs]

    def job(k, j, run: VerifiedRun):
        def go():
            speculative = run.method != "autoregressive"
            builder = make_builder(run.method if speculative else "chain", draft_params=draft_params,
                                   **(options_for(run.method) if speculative else {}))
            draft_session = PooledDraftSession(draft_pool, prefixes[k][0], prompts[k])
            verifier = PooledVerifier(target_pool, prefixes[k][1], prompts[k], sampling,
                                      TorchCoins(stream_seed(run.seed, VERIFY_STREAM)))
            draft_coins = draft_coins_for_round(run.seed)  # per round, as dyspec.generate draws them
            out, accepted = [], []
            try:
                while len(out) < max_new_tokens:
                    result = speculative_round(draft_session, verifier, builder, run.budget if speculative else 0,
                                               draft_coins(len(accepted) + 1))
                    accepted.append(result.stats.accepted)
                    kept, _ = take_new_tokens(result.verdict.tokens, len(out), max_new_tokens, set())
                    out += kept
            finally:
                draft_session.close()
                verifier.close()
            results[k][j] = {"tokens": out, "accepted": accepted}
        return go

    # biggest trees first: they take longest, and started last they leave a tail of forwards of a
    # row or two while every other run is done
    order = sorted(((k, j, run) for k, prompt_runs in enumerate(runs) for j, run in enumerate(prompt_runs)),
                   key=lambda item: -item[2].budget)
    jobs = [job(k, j, run) for k, j, run in order]
    coordinator.run_threads(jobs, max_threads=max_threads, progress=progress)
    stats = {f"{p.name}_{k}": getattr(p, k) for p in (draft_pool, target_pool)
             for k in ("forwards", "rows", "requests", "compactions")}
    return results, stats
