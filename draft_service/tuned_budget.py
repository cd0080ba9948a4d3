"""The automatic budget policy (`--budget auto`): the orchestrator's BudgetTuner behind the
worker's BudgetPolicy seam, one tuner per session, warm-started from the worker's experience.

The tuner learns from the session's own rounds (draft cost per node, the target's verify curve,
the network round trip, and how often nodes of a given draft value were accepted), so each stream
adapts to its own prompt and to the link it runs over. Every round a session sees is also fed to
one worker-wide tuner, and a new session starts as a copy of it: all of a worker's sessions talk
to the same target over the same link with the same draft, so a request need not spend its first
rounds re-measuring them (short requests never got past that cold start).
"""
from __future__ import annotations

import copy
import threading
from typing import Sequence

import numpy as np

from draft_service.budget import BudgetFn, RequestShape, RoundRecord
from dyspec.warp import SamplingParams
from draft_service.shared_budget import LoadShare, shared_budget
from orchestrator.estimators import BudgetTuner, RoundObservation

_PLAIN_PROBE_ROUND = 2  # 0-based: the third round
FIRST_TREE_CAP = 8  # nodes a request may draft before it has verified a tree (TunedSession: trust region)
# a draft cache behind by fewer tokens catches up inside its root forward, which the draft-cost fit prices
SETUP_MIN_TOKENS = 16
ACCEPTED_HEADROOM = 4  # and at most this many times (1 + the most tokens one of its rounds accepted)


def observation(record: RoundRecord) -> RoundObservation:
    """What the tuner learns from one finished round. Draft time counts the forwards and the tree
    building (both grow with the budget); target time is the target's own report, so the network
    estimate is round time minus draft, target and serialisation."""
    result = record.result
    overlap = result.overlap
    kept_ahead = overlap.kept if overlap is not None and overlap.predrafted else None
    accepted = [False] * len(result.tree)
    for node in result.verdict.accepted:
        accepted[node] = True
    return RoundObservation(budget=record.budget, node_values=list(result.tree.values), node_accepted=accepted,
                            round_s=record.round_s, draft_s=result.stats.draft_s + result.stats.build_s,
                            target_s=record.target_total_s, wire_s=record.wire_s, kept_ahead=kept_ahead)


class SharedTuner:
    """The worker-wide tuner: every session's rounds go in, new sessions start from a copy."""

    def __init__(self, max_budget: int):
        self._tuner = BudgetTuner(max_budget=max_budget)
        self._lock = threading.Lock()  # sessions run on the server's threads

    def observe(self, obs: RoundObservation) -> None:
        with self._lock:
            self._tuner.observe(obs)

    def snapshot(self) -> BudgetTuner:
        with self._lock:
            return copy.deepcopy(self._tuner)


class TunedSession:
    """One session's BudgetFn: feeds the rounds it has not seen yet to its tuner (and to the
    worker's shared one), then asks it.

    The first round is not shown: both models process the whole prompt in it (draft and target
    caches fill lazily), a one-time cost that would read as a huge per-round cost and talk the
    tuner out of drafting for the rest of the request. A cold tuner (no round seen yet, here or by
    the worker) measures its own first point again until it saw a round after the first, and the
    round chosen with two rounds in the history is a plain round (no tree; round four, since
    overlapped rounds choose round k's budget from rounds <= k-2): the verification cost fit then has two sizes to go on, instead of extrapolating from
    trees of one size only. A warm tuner needs neither.

    Trust region: a request's tree is at most FIRST_TREE_CAP nodes until it has verified a tree of
    its own, then at most twice the largest it has verified. The worker's experience prices the
    machine and the link well, but how well the draft agrees with the target is the prompt's: on the
    2-core AVX2 CPU a worker that had just run a Python prompt at 34 nodes (21 accepted a round)
    opened a licence-text prompt with three 64-node rounds (2-10 accepted, 4.3 s each against 0.45 s
    for a plain round) and ran it at 0.67x the target alone. Growing 8, 16, 32, 64 costs a few rounds
    where big trees pay, and keeps a misjudged prompt's loss to small trees. Doubling alone still let
    a licence-text prompt on the AVX512-BF16 EPYC climb 16, 20, 32, 40 nodes for 2-5 accepted
    tokens a round (300-450 ms of drafting against ~100 ms for a plain round), so a tree is also at
    most ACCEPTED_HEADROOM times one more than the most tokens any round of the request accepted
    (never under FIRST_TREE_CAP): a prompt where 21 tokens were accepted may grow to 88 nodes, one
    that never passed 3 stays at 16."""

    def __init__(self, tuner: BudgetTuner, shared: SharedTuner | None = None, load: LoadShare | None = None,
                 shape: RequestShape | None = None):
        self.tuner, self.shared, self.load = tuner, shared, load
        self.shape = shape
        self.cold = tuner.rounds == 0
        # tokens the draft's cache lacks: the prompt until the first tree, then what plain rounds added
        self.draft_behind = shape.prompt_tokens if shape is not None else 0
        self.generated = 0
        self.seen = 0
        self.largest_tree = 0  # nodes of the largest tree this session has verified (first round included)
        self.most_accepted = 0  # the most tokens one of its rounds accepted
        self.last_round_s = 0.0
        self.last_split = None  # the joint split (orchestrator.policy.BudgetSplit) this session last took part in
        if load is not None:
            load.join(self)

    def close(self) -> None:
        """The session ended (BudgetFn's optional close): it no longer shares the worker's budget."""
        if self.load is not None:
            self.load.leave(self)

    def __call__(self, history: Sequence[RoundRecord]) -> int:
        for record in history[self.seen:]:
            self.largest_tree = max(self.largest_tree, len(record.result.tree))
            self.most_accepted = max(self.most_accepted, len(record.result.verdict.accepted))
            self._follow_draft_cache(record)
        for record in history[max(self.seen, 1):]:
            obs = observation(record)
            self.tuner.observe(obs)
            if self.shared is not None:
                self.shared.observe(obs)
            if self.load is not None:
                self.load.observe(record.batch_sessions, record.batch_rows,
                                  record.target_total_s - record.target_queue_s, record.network_s)
        if history:
            self.last_round_s = history[-1].round_s
        self.seen = len(history)
        if self.cold and len(history) == _PLAIN_PROBE_ROUND:
            return 0
        budget = self._in_trust_region(self.tuner.next_budget())
        return budget if self.load is None else shared_budget(self, budget, self.load)

    def _follow_draft_cache(self, record: RoundRecord) -> None:
        """Track how far the draft's cache is behind; a tree that first had to forward a long
        uncached stretch (a new session's prompt) teaches the worker what a draft token of it costs."""
        nodes = len(record.result.tree)
        if nodes:
            if self.load is not None and self.draft_behind >= SETUP_MIN_TOKENS:
                d0, d1 = self.tuner.draft.coefficients()
                extra = record.result.stats.draft_s + record.result.stats.build_s - (d0 + d1 * nodes)
                self.load.observe_catch_up(self.draft_behind, max(0.0, extra))
            self.draft_behind = 1  # the round's bonus token: the next tree's root, forwarded with it
        else:
            self.draft_behind += len(record.result.verdict.tokens)
        self.generated += len(record.result.verdict.tokens)

    def setup_s(self, s_per_token: float) -> float:
        """What drafting at all would cost this round besides the draft's usual root forward: the
        stretch its cache is behind (a new session's prompt, or the tokens of a run of plain rounds),
        spread over the rounds left to the request if it drafts from now on, since the catch-up is
        paid once. 0 for a cache behind by a few tokens only, or an unknown request."""
        if self.shape is None or self.draft_behind < SETUP_MIN_TOKENS or s_per_token <= 0:
            return 0.0
        left = max(1, self.shape.max_new_tokens - self.generated)
        per_round = 1.0 + float(np.sum(self.tuner.gains()[:FIRST_TREE_CAP]))
        return s_per_token * self.draft_behind / max(1.0, left / per_round)

    def trust_cap(self) -> int:
        """The largest tree this session may draft now (the trust region), at most max_budget."""
        grown = min(2 * self.largest_tree, ACCEPTED_HEADROOM * (self.most_accepted + 1))
        return min(self.tuner.max_budget, max(FIRST_TREE_CAP, grown))

    def _in_trust_region(self, budget: int) -> int:
        return min(budget, self.trust_cap())


class TunedBudget:
    """BudgetPolicy: a BudgetTuner (budgets in [0, max_budget]) for every session, started from
    the worker's shared tuner for its kind of request (`warm_start`, the default) or fresh.

    Greedy and sampled requests keep separate shared tuners: the same draft path value means a
    different chance of acceptance under greedy and under stochastic verification, and a budget
    learnt on one kind misprices the other. On the 2-core AVX2 CPU a worker warmed on greedy prose
    opened its first sampled request with 34-node trees (3-4 accepted, 3.8 s rounds against 0.6 s
    for 6 nodes) and ran it at 0.83x the target alone."""

    def __init__(self, max_budget: int = 64, warm_start: bool = True, joint: bool = True):
        if max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {max_budget}")
        self.max_budget = max_budget
        self.shared = {kind: SharedTuner(max_budget) for kind in REQUEST_KINDS} if warm_start else None
        # joint: concurrent sessions verified in one target forward share one budget (shared_budget)
        self.load = LoadShare() if joint else None

    def __call__(self, sampling: SamplingParams | None = None, shape: RequestShape | None = None) -> BudgetFn:
        if self.shared is None:
            return TunedSession(BudgetTuner(max_budget=self.max_budget), load=self.load, shape=shape)
        shared = self.shared[request_kind(sampling)]
        return TunedSession(shared.snapshot(), shared, self.load, shape)


REQUEST_KINDS = ("greedy", "sampled")


def request_kind(sampling: SamplingParams | None) -> str:
    """Which shared tuner a request learns from and adds to: greedy (temperature 0, or unknown) or sampled."""
    return "sampled" if sampling is not None and sampling.temperature > 0 else "greedy"
