"""One budget over a worker's concurrent sessions (`--budget auto`): when several of them draft at
once and the target verifies their rounds in one batched forward, their trees are sized together
by orchestrator.policy.split_budget, from each session's own value curve (its tuner's gains) and
the cost the batch shares: the worker's drafting summed over sessions and the target's forward as
a function of the batch's rows, fitted from the rows and times the target reports in every verdict.

Alone, a session's tuner decides as before. Why a joint split: each session's own tuner prices a
node at what it costs that session, but a node in a shared forward delays every session in it, and
under load the draft worker's time is spent on all of them; sized alone, trees stay large at any
load (the measured cost per row stays flat while each session's wait grows), and the batch drafts
far more than pays. Jointly, trees shrink toward batched plain decoding as sessions are added.

A session counts from its start (`join`, before its first round) until its end (`leave`), and while
it has asked within the last few of its round times besides, for a BudgetFn whose end is never
signalled. From the start, not from its first ask: a burst's sessions wait for each other's prompt
prefills on the target before their first verdicts (~2 s a prompt on two Zen 4 cores), and counted
from their asks only (1 s without a round time), each first asker of a burst of 4-16 saw itself
alone and drafted a tree of its own choosing, which put the burst's batched forwards on one thread.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from orchestrator.estimators import BudgetTuner, Ewma, LinearFit
from orchestrator.policy import BatchCost, BudgetSplit, split_budget

_ACTIVE_ROUNDS = 4.0  # a session is drafting while its last ask is within this many of its rounds
_MIN_ACTIVE_S = 1.0
# a session that joined but has not finished a round (no round time yet) counts this long: its first
# verdict waits for the prompts queued ahead of it on the target
_FIRST_ROUND_S = 120.0
# The target batches if one of the worker's last this-many rounds shared its forward. Not an
# average: as a burst of sessions ends, its last rounds run alone, and an average (it was an
# EWMA over 1.5) then told the next burst's first rounds that the target does not batch, so every new
# session drafted its first trees alone while the target prefilled the other prompts.
_BATCH_EVIDENCE_ROUNDS = 64
_PLAIN_EVIDENCE = 4  # batches of plain rounds seen before they are priced apart from the rest
# how long a split stays the one its sessions take: batch-mates' verdicts arrive together and their
# asks follow within milliseconds; a round later (a forward, >= ~100 ms here) they split anew
SPLIT_REUSE_S = 0.05


class LoadShare:
    """The worker's drafting sessions and the costs they share. Thread-safe (sessions run on the
    worker's draft threads)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._active: dict[int, tuple[object, float, float]] = {}  # id -> (session, last ask, its round s)
        self.batch_verify = LinearFit()  # target time without its queue, against the batch's rows
        # the same for batches of plain rounds only (one row a session), which a target with
        # --batched-threads runs on more cores: priced apart, so the split sees what going plain buys
        # a plain row is nearly free beside the weights' read, so one batch size seen is priced flat
        self.plain_verify = LinearFit(one_size_slope=0.0)
        self.plain_seen = 0
        self.batch_sessions: deque[int] = deque(maxlen=_BATCH_EVIDENCE_ROUNDS)  # sessions per forward, recent rounds
        self.recent_network: deque[float] = deque(maxlen=64)
        self.recent_verify: deque[float] = deque(maxlen=64)
        # seconds per token of a draft catch-up (a new session's prompt): a long forward of the draft,
        # far cheaper a token than a tree's, which a session's first tree pays on top
        self.catch_up = Ewma(0.3)
        self._split: tuple[float, dict[int, int]] | None = None  # (when, id(session) -> budget): keep_split
        # the worker's draft batcher's batch_share, where it batches its sessions' draft forwards
        # (set by the servicer); None: drafting priced as summed over sessions
        self.draft_batch_share: Callable[[], float] | None = None

    def observe_catch_up(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self.catch_up.update(seconds / tokens)

    def catch_up_s_per_token(self) -> float:
        with self._lock:
            return self.catch_up.value or 0.0

    def observe(self, batch_sessions: int, batch_rows: int, verify_s: float, network_s: float) -> None:
        with self._lock:
            self.batch_sessions.append(batch_sessions)
            if 0 < batch_rows == batch_sessions:  # every session of the batch sent a plain round
                self.plain_verify.update(batch_rows, verify_s)
                self.plain_seen += 1
            elif batch_rows > 0:
                self.batch_verify.update(batch_rows, verify_s)
            self.recent_verify.append(verify_s)
            self.recent_network.append(network_s)

    def join(self, session) -> None:
        """`session` has started: it counts among the worker's sessions until `leave` (or until it
        stops asking, by the rule of `ask`)."""
        with self._lock:
            self._active[id(session)] = (session, self.clock(), 0.0)

    def leave(self, session) -> None:
        with self._lock:
            self._active.pop(id(session), None)

    def ask(self, session, round_s: float) -> list:
        """Mark `session` drafting now; the sessions drafting (it among them), in a stable order."""
        now = self.clock()
        with self._lock:
            self._active[id(session)] = (session, now, round_s)
            for key, (_, last, seconds) in list(self._active.items()):
                if now - last > (max(_MIN_ACTIVE_S, _ACTIVE_ROUNDS * seconds) if seconds > 0 else _FIRST_ROUND_S):
                    del self._active[key]
            return [entry[0] for _, entry in sorted(self._active.items())]

    def keep_split(self, peers: list, split: BudgetSplit) -> None:
        """The split just taken over `peers`, for the batch-mates that ask next (recent_split)."""
        with self._lock:
            self._split = (self.clock(), {id(p): b for p, b in zip(peers, split.budgets)})

    def recent_split(self, session) -> int | None:
        """`session`'s part of the split a batch-mate took within the last SPLIT_REUSE_S, if it had one."""
        with self._lock:
            if self._split is None:
                return None
            taken_at, parts = self._split
            if self.clock() - taken_at > SPLIT_REUSE_S:
                return None
            return parts.pop(id(session), None)  # a session takes its part once: its next ask is its next round

    def batching(self) -> bool:
        """Whether the target verifies this worker's concurrent rounds in shared forwards."""
        with self._lock:
            return max(self.batch_sessions, default=1) >= 2

    def cost(self, tuner: BudgetTuner) -> BatchCost:
        """The batch cost from the shared fits and the asking session's draft and overlap estimates.
        The network is the floor of recent rounds: under load the estimate per round also holds
        the wait for other sessions' work, which the batch model prices itself."""
        d0, d1 = tuner.draft.coefficients()
        with self._lock:
            v0, v1 = self.batch_verify.coefficients()
            floor = min(self.recent_verify, default=0.0)
            network = min(self.recent_network, default=0.0)
            plain = self.plain_verify.coefficients() if self.plain_seen >= _PLAIN_EVIDENCE else None
        plain_verify = None if plain is None else (lambda rows: np.maximum(0.0, plain[0] + plain[1] * rows))
        share = 1.0 if self.draft_batch_share is None else self.draft_batch_share()
        return BatchCost(network_s=network, draft_fixed_s=d0, draft_per_node_s=d1,
                         verify_s=lambda rows: np.maximum(floor, v0 + v1 * rows), overlap=tuner.kept_ahead.value or 0.0,
                         plain_verify_s=plain_verify, draft_batch_share=share)


def shared_budget(session, own_budget: int, load: LoadShare) -> int:
    """`session` (a TunedSession)'s budget this round: its tuner's own choice when it drafts alone
    or the target does not batch, else its part of the joint split over the drafting sessions.

    Sessions verified in one forward get their verdicts together and ask within milliseconds of one
    another: the first to ask splits for all of them, and the others take their parts of that split
    (LoadShare.recent_split). Each used to split on its own, priced with its own tuner's draft
    costs and a moment's newer estimates, and the batch came apart: at 4-8 streams one session
    drafted a 9-node tree while its peers went plain, which kept the target's forward on one thread
    (the draft needs its core) and split the batch in two."""
    round_s = session.last_round_s
    peers = load.ask(session, round_s)
    if len(peers) < 2 or not load.batching() or session.tuner.rounds == 0:
        return own_budget
    taken = load.recent_split(session)
    if taken is not None:
        return taken
    per_token = load.catch_up_s_per_token()
    # each session's cap is its trust region (TunedSession: a request that has not verified a tree yet
    # drafts at most FIRST_TREE_CAP nodes), as when it sizes its tree alone; capped at max_budget only,
    # a burst of 4 sessions drafted 15-node first trees with their prompts' catch-up
    split = split_budget([p.tuner.gains() for p in peers], [1] * len(peers), load.cost(session.tuner),
                         [p.trust_cap() for p in peers], [p.setup_s(per_token) for p in peers])
    load.keep_split(peers, split)
    session.last_split = split
    return split.budgets[peers.index(session)]
