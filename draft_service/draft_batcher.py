"""Batched drafting: the draft forwards that a worker's sessions ask for at the same time run as one
forward of the draft model (engine.batched_forward), each session keeping its own KV cache, mask
and positions.

Why: a few-row draft forward is bound by reading the draft's weights, so N sessions each drafting
one row pay N reads where one would do. Sessions run their rounds on draft threads; each draft
forward is handed to `forward` here and waits. One model thread takes whatever is queued when it
is free (the forwards that arrived while the last one ran), so a lone session never waits. Sessions
that draft in step (their verdicts came from one target forward) need one thing more: a session's
next forward comes a few milliseconds after its last one's logits (the builder picks the next
nodes), so whichever session was quicker went alone and the two alternated, forward by forward,
never sharing one (measured: 507 session forwards in 507 draft forwards at 2-4 streams). So before
a forward, the thread waits a little (GATHER_FRACTION of a recent forward) for the sessions that
shared the last forward and have not asked again yet; a session whose tree is done costs that
wait once. A lone forward runs as the session's own forward, with its usual kernels and bits.

Exactness does not depend on the draft's numerics (the verifier uses the distribution each child
was drawn from). A session's draft logits in a batch equal its logits alone where the draft's
kernels are batch-invariant (the packed float32 and bf16 layers); the int8 draft picks its kernel by
the rows of a call, so under batching a seeded sampled request may draw other (equally exact)
tokens than it would alone. A batch that fails is retried forward by forward, after rolling each
cache back, so a bad forward fails its own session only.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.batched_forward import Segment, forward_segments
from orchestrator.estimators import LinearFit

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 512  # rows per batched forward; forwards over it wait for the next one
# How long a forward waits for the sessions of the last forward that have not asked again: this share
# of the decayed mean forward time. A session's next ask follows its logits by the builder's work
# (~1-5 ms); a batch-mate that joins costs a few rows where a forward of its own reads every weight.
GATHER_FRACTION = 0.5
FORWARD_DECAY = 0.2  # weight of the newest forward in the decayed mean


@dataclass
class _Job:
    own_forward: Callable[[], torch.Tensor]
    segment: Segment
    future: Future = field(default_factory=Future)


@dataclass
class BatchingStats:
    forwards: int = 0  # draft model forwards run
    batched_forwards: int = 0  # of them, over more than one session
    session_forwards: int = 0  # session forwards served (>= forwards)
    rows: int = 0
    largest_batch: int = 0


class DraftForwardBatcher:
    def __init__(self, model, max_batch_rows: int = MAX_BATCH_ROWS):
        self.model, self.max_batch_rows = model, max_batch_rows
        self.stats = BatchingStats()
        self.forward_s = 0.0  # decayed mean duration of a forward (the gathering wait's scale)
        self.cost = LinearFit()  # seconds of a forward against its rows, every forward (batch_share)
        self._last_caches: set[int] = set()  # id() of the caches the last forward served (model thread)
        self._queue: deque[_Job] = deque()
        self._arrived = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="draft-model", daemon=True)
        self._thread.start()

    def forward(self, own_forward, cache, ids: list[int], mask: torch.Tensor, positions: torch.Tensor,
                keep: int) -> torch.Tensor:
        """HFDraftSession's forward_rows hook: the logits of the last `keep` rows; any draft thread."""
        job = _Job(own_forward, Segment(cache, list(ids), mask, positions, keep))
        with self._arrived:
            if self._closed:
                raise RuntimeError("the draft worker is stopping")
            self._queue.append(job)
            self._arrived.notify()
        return job.future.result()

    def batch_share(self) -> float:
        """What a session's forward adds to a forward that runs anyway (a batch-mate's), as a share of
        that forward run alone: its mean rows priced by the fit of forward time against rows. 1 (as
        dear as alone) until forwards of different sizes were seen; the draft cost of sessions drafting
        in step (orchestrator.policy.BatchCost.draft_batch_share)."""
        fixed, per_row = self.cost.coefficients()
        rows = self.stats.rows / max(1, self.stats.session_forwards)
        alone = fixed + per_row * rows
        return 1.0 if alone <= 0 else min(1.0, max(0.0, per_row * rows / alone))

    def close(self) -> None:
        with self._arrived:
            self._closed = True
            self._arrived.notify()
        self._thread.join()

    def _take(self) -> list[_Job] | None:
        with self._arrived:
            while not self._queue and not self._closed:
                self._arrived.wait()
            if not self._queue:
                return None
            self._gather()
            jobs = [self._queue.popleft()]
            rows = len(jobs[0].segment.input_ids)
            while self._queue and rows + len(self._queue[0].segment.input_ids) <= self.max_batch_rows:
                rows += len(self._queue[0].segment.input_ids)
                jobs.append(self._queue.popleft())
            return jobs

    def _gather(self) -> None:
        """Under _arrived, with a forward queued: wait up to GATHER_FRACTION of a forward for the
        sessions the last forward served that have not asked again: they draft in step with the ones
        queued, or (two sessions starting their trees a few milliseconds apart) are about to."""
        deadline = time.perf_counter() + GATHER_FRACTION * self.forward_s
        while not self._closed:
            queued = {id(job.segment.cache) for job in self._queue}
            left = deadline - time.perf_counter()
            if not (self._last_caches - queued) or left <= 0:
                return
            self._arrived.wait(left)

    def _serve(self) -> None:
        while (jobs := self._take()) is not None:
            started = time.perf_counter()
            self._run(jobs)
            elapsed = time.perf_counter() - started
            self.forward_s += (elapsed - self.forward_s) * (FORWARD_DECAY if self.forward_s else 1.0)
            self.cost.update(sum(len(job.segment.input_ids) for job in jobs), elapsed)
            self._last_caches = {id(job.segment.cache) for job in jobs}

    def _run(self, jobs: list[_Job]) -> None:
        stats = self.stats
        stats.forwards += 1
        stats.session_forwards += len(jobs)
        stats.rows += sum(len(job.segment.input_ids) for job in jobs)
        stats.largest_batch = max(stats.largest_batch, len(jobs))
        if len(jobs) == 1:
            _resolve(jobs[0], jobs[0].own_forward)
            return
        stats.batched_forwards += 1
        lengths = [_cache_lengths(job.segment.cache) for job in jobs]
        try:
            logits = forward_segments(self.model, [job.segment for job in jobs])
        except Exception as error:  # noqa: BLE001 - retried one by one: only a bad forward fails
            log.warning("a batched draft forward of %d sessions failed (%s); running them one by one", len(jobs), error)
            for job, before in zip(jobs, lengths):
                _truncate(job.segment.cache, before)
                _resolve(job, job.own_forward)
            return
        for job, rows in zip(jobs, logits):
            job.future.set_result(rows)


def _resolve(job: _Job, run: Callable[[], torch.Tensor]) -> None:
    try:
        job.future.set_result(run())
    except Exception as error:  # noqa: BLE001 - it belongs to the session that asked
        job.future.set_exception(error)


def _cache_lengths(cache) -> list[int]:
    return [layer.keys.shape[2] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
            for layer in cache.layers]


def _truncate(cache, lengths: list[int]) -> None:
    """Drop what a failed forward appended to each layer (a layer it started is left empty)."""
    with torch.inference_mode():
        for index, layer in enumerate(cache.layers):
            length = lengths[index] if index < len(lengths) else 0
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
