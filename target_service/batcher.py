"""Batched verification: the rounds of every session waiting for the model thread are verified in
one target forward (engine.batched_forward), each committed to its own session afterwards.

The servicer hands each round to `submit` and awaits its future. The first round to find the queue
empty schedules a drain on the model thread; the drain takes whatever is queued by the time it runs
(rounds that arrived while the previous forward ran), optionally waits a short window for the
sessions that have not sent theirs yet (BatchingConfig.window_s: by default a tenth of the recent
forward time), checks each round (a bad one fails alone, at once), runs one
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
from target_service.config import WINDOW_FRACTION, WINDOW_MAX_S, BatchingConfig
from target_service.engine import PreparedRound, VerificationEngine

log = logging.getLogger(__name__)


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
        self.forward_s = 0.0  # decayed mean duration of the round forwards (the automatic window's scale)

    def submit(self, session_id: str, msg: target_pb2.Tree, received_ns: int) -> Future:
        """Queue one round; the future gets its Verdict or the exception that ended it. Any thread."""
        future: Future = Future()
        with self._arrived:
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

    def _take(self) -> list[_Queued]:
        """Model thread: the queued rounds for this drain (one when batching is off), after the
        window for sessions yet to send theirs."""
        with self._arrived:
            window = self.window_s()
            if self.config.enabled and window > 0:
                until = time.monotonic() + window
                # a configured window waits for every open session; the automatic one for those in
                # plain decoding only, whose rounds come within milliseconds (a drafting session's
                # tree takes tens, and the forward it would join is better not held for it)
                awaited = ({sid for sid, _ in self.engine.store.items()} if self.config.window_s is not None
                           else self.engine.plain_sessions())
                while awaited - {q.session_id for q in self._queue}:
                    left = until - time.monotonic()
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
                self.forward_s = elapsed if self.forward_s == 0 else self.forward_s + 0.2 * (elapsed - self.forward_s)
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
