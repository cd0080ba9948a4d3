"""Batched verification: the rounds of every session waiting for the model thread are verified in
one target forward (engine.batched_forward), each committed to its own session afterwards.

The servicer hands each round to `submit` and awaits its future. The first round to find the queue
empty schedules a drain on the model thread; the drain takes whatever is queued by the time it runs
(rounds that arrived while the previous forward ran), optionally waits a short window for the
sessions that have not sent theirs yet (BatchingConfig.window_s; by default, automatic: a tenth of
the recent forward time for sessions in plain decoding, and for drafting sessions until their next
round is due, if it is due within a forward: each session's think time, from its verdict to its
next round's arrival, is measured), checks each round (a bad one fails alone, at once), runs one
forward over the good ones up to a row limit, and resolves every future. Rounds left over by the row
limit, or arriving during the drain, get the next drain, queued behind whatever the model thread was
given meanwhile (opens, closes, upkeep), so those are never starved by a busy queue.

A round's queue wait is reported in its verdict's timings (queue_ns), never hidden in forward_ns.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from proto.dyspec.v1 import target_pb2
from target_service.config import (DRAFT_LATE_FRACTION, DRAFT_WINDOW_FRACTION, WINDOW_FRACTION, WINDOW_MAX_S,
                                   BatchingConfig)
from target_service.engine import PreparedRound, VerificationEngine

log = logging.getLogger(__name__)


FORWARD_DECAY = 0.2  # weight of the newest round forward in its decayed mean duration
THINK_DECAY = 0.3  # weight of a session's newest think time in its decayed mean


def _decayed(mean: float | None, sample: float, weight: float) -> float:
    """An exponentially decayed mean moved toward `sample` by `weight`; the first sample as it is."""
    return sample if mean is None else mean + weight * (sample - mean)


@dataclass
class _Queued:
    session_id: str
    msg: target_pb2.Tree
    received_ns: int
    future: Future


class RoundBatcher:
    def __init__(self, engine: VerificationEngine, executor: ThreadPoolExecutor, config: BatchingConfig):
        self.engine, self.executor, self.config = engine, executor, config
        self._queue: deque[_Queued] = deque()
        self._arrived = threading.Condition()
        self._scheduled = False  # a drain is queued on (or running on) the model thread
        # decayed mean duration of the round forwards (the automatic window's scale), 0 before the first
        self.forward_s = 0.0
        # per session (under _arrived): when its last verdict was given (perf_counter s), and the
        # decayed mean of its think time, verdict to the arrival of its next round
        self._answered: dict[str, float] = {}
        self._think_s: dict[str, float] = {}

    def submit(self, session_id: str, msg: target_pb2.Tree, received_ns: int) -> Future:
        """Queue one round; the future gets its Verdict or the exception that ended it. Any thread."""
        future: Future = Future()
        with self._arrived:
            answered = self._answered.pop(session_id, None)
            if answered is not None:
                think = max(0.0, received_ns / 1e9 - answered)
                self._think_s[session_id] = _decayed(self._think_s.get(session_id), think, THINK_DECAY)
            self._queue.append(_Queued(session_id, msg, received_ns, future))
            self._arrived.notify()
            if self._scheduled:
                return future
            self._scheduled = True
        try:
            self.executor.submit(self._drain)
        except RuntimeError as exc:  # the model thread has shut down: the server is stopping
            with self._arrived:
                self._scheduled = False
                self._queue.clear()
            future.set_exception(exc)
        return future

    @property
    def queued(self) -> int:
        return len(self._queue)

    def window_s(self) -> float:
        """How long a drain waits for open sessions whose round has not arrived: the configured
        window (for every open session), or (auto) WINDOW_FRACTION of the recent forward time, at
        most WINDOW_MAX_S (for the sessions in plain decoding)."""
        if self.config.window_s is not None:
            return self.config.window_s
        return min(WINDOW_MAX_S, WINDOW_FRACTION * self.forward_s)

    def _awaited(self) -> dict[str, float]:
        """Under _arrived: the open sessions this drain waits for, each with how long (a
        perf_counter deadline). A configured window: every open session, for the window. The
        automatic one: sessions in plain decoding (their rounds come milliseconds after the verdict)
        for the plain window; drafting sessions whose next round is due (their last verdict plus
        their think time) within DRAFT_WINDOW_FRACTION of a forward, until DRAFT_LATE_FRACTION of
        their think time (at least a plain window) past that, never past that share of a forward. A
        drafting session due later is not waited for: its tree comes after a forward's worth of
        drafting, and the forward it would join is better not held for it."""
        now = time.perf_counter()
        window = self.window_s()
        open_ids = {sid for sid, _ in self.engine.store.items()}
        for gone in set(self._answered) - open_ids:
            del self._answered[gone]
        for gone in set(self._think_s) - open_ids:
            del self._think_s[gone]
        if self.config.window_s is not None:
            return dict.fromkeys(open_ids, now + window) if window > 0 else {}
        awaited = dict.fromkeys(self.engine.plain_sessions(), now + window) if window > 0 else {}
        horizon = DRAFT_WINDOW_FRACTION * self.forward_s
        for sid, answered in self._answered.items():
            think = self._think_s.get(sid)
            if sid in awaited or think is None:
                continue
            due = answered + think
            until = min(now + horizon, due + max(window, DRAFT_LATE_FRACTION * think))
            if due <= now + horizon and until > now:
                awaited[sid] = until
        return awaited

    def _take(self) -> list[_Queued]:
        """Model thread: the queued rounds for this drain (one when batching is off), after the
        window for sessions yet to send theirs."""
        with self._arrived:
            if self.config.enabled:
                awaited = self._awaited()
                while True:
                    queued = {q.session_id for q in self._queue}
                    now = time.perf_counter()
                    left = max((until for sid, until in awaited.items() if sid not in queued and until > now),
                               default=now) - now
                    if left <= 0 or not self._arrived.wait(left):
                        break
            count = len(self._queue) if self.config.enabled else 1
            return [self._queue.popleft() for _ in range(min(count, len(self._queue)))]

    def _drain(self) -> None:
        taken = self._take()
        batch: list[tuple[_Queued, PreparedRound]] = []
        later: list[_Queued] = []  # over the row limit, or a second round of a session in this batch
        rows = reserved = 0
        for queued in taken:
            # Marks it running (no longer cancellable), or skips it: its stream went away while it
            # queued, so nobody waits for its verdict and the session is closing (or kept to resume).
            if not queued.future.running() and not queued.future.set_running_or_notify_cancel():
                continue
            if later or any(q.session_id == queued.session_id for q, _ in batch):
                later.append(queued)
                continue
            try:
                prepared = self.engine.prepare(queued.session_id, queued.msg, queued.received_ns, reserved)
            except Exception as exc:  # noqa: BLE001 - a bad round fails alone
                queued.future.set_exception(exc)
                continue
            if isinstance(prepared, target_pb2.Verdict):  # a replay: its cached verdict
                queued.future.set_result(prepared)
                continue
            if batch and rows + prepared.rows > self.config.max_batch_rows:
                later.append(queued)
                continue
            batch.append((queued, prepared))
            rows += prepared.rows
            reserved += len(prepared.tree) + 1
        try:
            started = time.perf_counter()
            outcomes = self.engine.verify_batch([p for _, p in batch])
            if batch:
                elapsed = time.perf_counter() - started
                self.forward_s = _decayed(self.forward_s or None, elapsed, FORWARD_DECAY)
            # recorded before the verdicts go out: a session's next round may arrive right after its own
            with self._arrived:
                answered = time.perf_counter()
                for (queued, _), outcome in zip(batch, outcomes):
                    if not isinstance(outcome, BaseException):
                        self._answered[queued.session_id] = answered
            for (queued, _), outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    queued.future.set_exception(outcome)
                else:
                    queued.future.set_result(outcome)
        finally:
            self._reschedule(later)

    def _reschedule(self, later: list[_Queued]) -> None:
        with self._arrived:
            self._queue.extendleft(reversed(later))  # first in line for the next drain
            if not self._queue:
                self._scheduled = False
                return
        try:
            self.executor.submit(self._drain)
        except RuntimeError as exc:
            with self._arrived:
                self._scheduled = False
                left, self._queue = list(self._queue), deque()
            for queued in left:
                queued.future.set_exception(exc)
