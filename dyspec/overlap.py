"""Overlapped rounds: the draft grows round r+1's tree while the target verifies round r's.

Serial speculative decoding leaves each side idle while the other works (on the 2-core CPU the
draft took 56-71% of a round, the target the rest). Here, once tree r is sent, the draft guesses
the verdict (the likeliest path of tree r, every node accepted, then the draft's own argmax after
its leaf), commits that guess to a checkpoint of its cache and grows tree r+1 below it. Before
each draft forward it looks whether the verdict has arrived: a verdict equal to the guess makes
the pre-drafted part the real start of tree r+1 (the build just goes on); any other verdict
abandons it, the cache returns to the checkpoint, the true verdict is committed and tree r+1 is
drafted from scratch. Verdicts are compared node for node (accepted indices and next token).

Why this is lossless. Call a round's draft randomness C_{r+1} (its coins, `coins_for_round(r+1)`,
drawn independently of the target's verification coins and of every other round's). The tree
verified in round r+1 is T(prefix_{r+1}, C_{r+1}) in both cases: a kept pre-draft was grown below
the guessed prefix, which equals the true prefix_{r+1} (that is the test for keeping it), with
C_{r+1}; a rebuilt one is grown below prefix_{r+1} with C_{r+1} again (production coins are a
fresh generator per round, so the rebuild even replays the same uniforms; an abandoned pre-draft
was discarded and influenced nothing the target saw). So given the history, tree r+1 is drawn from
exactly the draft distribution the serial loop would use, with coins independent of the target's,
and each child still carries the exact q it was drawn from. Multi-branch speculative sampling is
lossless for any tree drawn that way (reference/losslessness_and_reliability.md), so the emitted
sequence is distributed as target sampling; at temperature 0 any tree gives the target's greedy
output. The budget of round r+1 is chosen before verdict r arrives, from rounds <= r-1 only: a
function of the past, which the argument allows. Builder state carried across rounds (dyspec-layer's
threshold) is advanced on a copy during a pre-draft and adopted only when the pre-draft is kept.

Timing changes only how much work is wasted, never the tokens: which tree is verified depends on
whether guess == verdict, not on when the verdict came, so a seeded request gives the same output
with any overlap schedule (and the same as `dyspec.generate(..., overlap=True)`).
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol

from dyspec.builders.base import TreeBuilder
from dyspec.coins import Coins
from dyspec.decoding import DraftSession, RoundResult, RoundStats, TimedOracle
from dyspec.tree import ROOT, TokenTree
from dyspec.verify import Verdict


class PendingVerdict(Protocol):
    arrived_s: float | None  # perf_counter() when the verdict arrived (None while pending)

    def done(self) -> bool:
        """Whether `result()` would return without waiting."""

    def result(self) -> Verdict:
        """The verdict (waits for it); raises what the verification raised."""


class SubmittingVerifier(Protocol):
    """A verifier that can take a tree and answer later (a remote target, or a local one on its
    own thread). `last_forward_s` is the target forward time of the last verdict returned."""

    last_forward_s: float

    def submit(self, tree: TokenTree) -> PendingVerdict: ...


class FuturePending:
    """A PendingVerdict over a concurrent.futures.Future (a verification running elsewhere)."""

    def __init__(self, future, finish: Callable[[object], Verdict] = lambda value: value):
        self.future, self.finish = future, finish
        self.arrived_s: float | None = None
        self._verdict: Verdict | None = None
        future.add_done_callback(self._arrived)

    def _arrived(self, _future) -> None:
        self.arrived_s = time.perf_counter()

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> Verdict:
        if self._verdict is None:
            self._verdict = self.finish(self.future.result())
        return self._verdict


class ThreadedVerifier:
    """A local verifier (dyspec.decoding.LocalVerifier) on its own thread: `submit` returns at
    once, so the draft can work while the target forward runs (torch releases the GIL)."""

    def __init__(self, verifier, executor):
        self.verifier, self.executor = verifier, executor

    @property
    def last_forward_s(self) -> float:
        return self.verifier.last_forward_s

    def submit(self, tree: TokenTree) -> FuturePending:
        return FuturePending(self.executor.submit(self.verifier.verify, tree))

    def verify(self, tree: TokenTree) -> Verdict:
        return self.submit(tree).result()


class InlineVerifier:
    """A local verifier behind the submitting interface, verifying at submit time (serial rounds)."""

    def __init__(self, verifier):
        self.verifier = verifier

    @property
    def last_forward_s(self) -> float:
        return self.verifier.last_forward_s

    def submit(self, tree: TokenTree) -> FuturePending:
        future = Future()
        try:
            future.set_result(self.verifier.verify(tree))
        except Exception as exc:  # delivered by result(), as a remote failure would be
            future.set_exception(exc)
        return FuturePending(future)


class CheckpointingDraft(DraftSession, Protocol):
    def checkpoint(self) -> object:
        """A mark of the committed tokens and the cache, taken after this round's forwards."""

    def restore(self, mark: object) -> None:
        """Return to `mark`: drop every commit and forward made since."""


def likeliest_path(tree: TokenTree) -> list[int]:
    """From the root, the child of highest draft value at each step, down to a leaf."""
    path, node = [], ROOT
    while kids := tree.children_of(node):
        node = max(kids, key=lambda child: tree.values[child])
        path.append(node)
    return path


def guess_verdict(draft: CheckpointingDraft, tree: TokenTree, path: list[int]) -> Verdict:
    """The verdict the draft expects: `path` (its likeliest) fully accepted, then its argmax after
    the path's end (one draft forward of that node, which the next round would forward anyway)."""
    end = path[-1] if path else ROOT
    next_token = int(draft.logits(tree, [end])[0].argmax())
    return Verdict(list(path), next_token, [tree.tokens[n] for n in path] + [next_token])


class _Mispredicted(Exception):
    """The verdict arrived and differs from the guess: abandon the pre-draft."""


class _WatchingOracle:
    """Forwards to the draft, but first looks whether the verdict of the previous round arrived."""

    def __init__(self, oracle, pending: PendingVerdict, guess: Verdict):
        self.oracle, self.pending, self.guess = oracle, pending, guess
        self.confirmed = False
        self.seconds_before_verdict = 0.0

    def logits(self, tree, nodes):
        if not self.confirmed:
            if self.pending.done():
                if not _same(self.pending.result(), self.guess):
                    raise _Mispredicted
                self.confirmed = True
            else:
                start = time.perf_counter()
                out = self.oracle.logits(tree, nodes)
                self.seconds_before_verdict += time.perf_counter() - start
                return out
        return self.oracle.logits(tree, nodes)

    def renumber(self, mapping):
        inner = getattr(self.oracle, "renumber", None)
        if inner is not None:
            inner(mapping)


def _same(a: Verdict, b: Verdict) -> bool:
    return a.accepted == b.accepted and a.next_token == b.next_token


@dataclass
class OverlapStats:
    """How one round's tree came about, beyond RoundStats."""

    budget: int = 0  # the node budget the tree was built under (after the caller's caps)
    predrafted: bool = False  # a pre-draft of this tree was started while the previous verdict was pending
    kept: bool = False  # and it was kept (the guess equalled the verdict)
    overlapped_s: float = 0.0  # this tree's draft forwards that ran while the previous verdict was pending
    wasted_s: float = 0.0  # draft forwards of an abandoned pre-draft of this tree
    wait_s: float = 0.0  # time the draft side sat idle waiting for this round's verdict


@dataclass
class _Built:
    tree: TokenTree
    timed: TimedOracle
    build_s: float
    overlap: OverlapStats


class OverlappedRounds:
    """Runs speculative rounds with drafting overlapped with verification.

    `next_round(choose_budget, room)` submits the current round's tree (drafting it first if none
    was drafted ahead), pre-drafts the following round while the target works, waits for the
    verdict, and returns the round's RoundResult (its `overlap` says how the tree came about), or
    None when the context has no room for another round. `choose_budget()` is the wanted node budget
    (0: a plain round); it is asked exactly once per round, for round k+1 right after round k was
    sent (so from rounds <= k-1; round 1 and 2 are chosen before any verdict), in serial mode too,
    so that both modes make the same choices. `room(committed)` caps it by the context: the most
    nodes a round starting with that many committed tokens may hold, or None for no round at all.
    The caller applies its own stop rules between calls; a pre-draft past the end is the only
    waste. `coins_for_round(k)` returns round k's draft coins (1-based); `overlap=False` runs the
    same rounds serially (for comparison).
    """

    def __init__(self, draft: CheckpointingDraft, verifier: SubmittingVerifier, builder: TreeBuilder,
                 coins_for_round: Callable[[int], Coins], overlap: bool = True):
        self.draft, self.verifier, self.builder = draft, verifier, builder
        self.coins_for_round, self.overlap = coins_for_round, overlap
        self.round = 0  # rounds returned so far
        self._ready: _Built | None = None  # round self.round + 1's tree, drafted below the committed verdict
        self._wanted: int | None = None  # round self.round + 1's wanted budget, when chosen already

    @staticmethod
    def _capped(wanted: int, room: int | None) -> int | None:
        return None if room is None else max(0, min(wanted, room))

    def next_round(self, choose_budget: Callable[[], int], room: Callable[[int], int | None]) -> RoundResult | None:
        index = self.round + 1
        built, self._ready = self._ready, None
        if built is None:
            wanted = choose_budget() if self._wanted is None else self._wanted
            budget = self._capped(wanted, room(len(self.draft.tokens)))
            if budget is None:
                return None
            built = self._build(self.draft, self.builder, budget, index, OverlapStats(budget))
        tree = built.tree
        t_sent = time.perf_counter()
        pending = self.verifier.submit(tree)
        self._wanted = choose_budget()  # round index + 1's, from rounds < index
        commit_s = 0.0
        verdict = self._draft_ahead(tree, pending, index + 1, built.overlap, room) if self.overlap else None
        if verdict is None:  # nothing was drafted ahead: wait, then commit
            verdict = self._wait(pending, built.overlap)
            t_commit = time.perf_counter()
            self.draft.commit(tree, verdict)
            commit_s = time.perf_counter() - t_commit
        self.round = index
        arrived = pending.arrived_s if pending.arrived_s is not None else time.perf_counter()
        stats = RoundStats(len(tree), tree.max_depth(), len(verdict.accepted), built.timed.calls,
                           built.timed.seconds, built.build_s - built.timed.seconds, max(0.0, arrived - t_sent),
                           self.verifier.last_forward_s, commit_s)
        return RoundResult(tree, verdict, stats, built.overlap)

    def _build(self, oracle, builder: TreeBuilder, budget: int, index: int, overlap: OverlapStats) -> _Built:
        timed = TimedOracle(oracle)
        start = time.perf_counter()
        tree = builder.build(timed, budget, self.coins_for_round(index)) if budget > 0 else TokenTree(draw=builder.draw)
        return _Built(tree, timed, time.perf_counter() - start, overlap)

    @staticmethod
    def _wait(pending: PendingVerdict, overlap: OverlapStats) -> Verdict:
        start = time.perf_counter()
        verdict = pending.result()
        overlap.wait_s += time.perf_counter() - start
        return verdict

    def _draft_ahead(self, tree: TokenTree, pending: PendingVerdict, next_index: int, this_round: OverlapStats,
                     room: Callable[[int], int | None]) -> Verdict | None:
        """Pre-draft round `next_index` below the guessed verdict of `tree`. Returns None when no
        pre-draft was worth starting (a plain or final round next, or the verdict already here);
        otherwise the true verdict, committed, with self._ready holding the next round's tree (kept
        or rebuilt; None if the context has no room for it)."""
        draft = self.draft
        path = likeliest_path(tree)
        budget = self._capped(self._wanted, room(len(draft.tokens) + len(path) + 1))
        if not budget or pending.done():
            return None
        guess = guess_verdict(draft, tree, path)
        mark = draft.checkpoint()
        draft.commit(tree, guess)
        builder = copy.deepcopy(self.builder)  # builder state advances only if the pre-draft is kept
        watcher = _WatchingOracle(draft, pending, guess)
        next_round = OverlapStats(budget, predrafted=True, kept=True)
        try:
            built = self._build(watcher, builder, budget, next_index, next_round)
            if not watcher.confirmed and not _same(self._wait(pending, this_round), guess):
                raise _Mispredicted
        except _Mispredicted:
            verdict = self._wait(pending, this_round)
            draft.restore(mark)
            draft.commit(tree, verdict)
            next_round.kept, next_round.wasted_s = False, watcher.seconds_before_verdict
            rebuilt = self._capped(self._wanted, room(len(draft.tokens)))
            if rebuilt is not None:
                next_round.budget = rebuilt
                self._ready = self._build(draft, self.builder, rebuilt, next_index, next_round)
            self._wanted = None
            return verdict
        self.builder = builder
        next_round.overlapped_s = watcher.seconds_before_verdict
        self._ready = built
        self._wanted = None
        return pending.result()


__all__ = ["CheckpointingDraft", "FuturePending", "InlineVerifier", "OverlapStats", "ThreadedVerifier", "OverlappedRounds", "PendingVerdict", "SubmittingVerifier",
           "guess_verdict", "likeliest_path"]
