"""Batched drafting: the draft forwards that a worker's sessions ask for at the same time run as one
forward of the draft model (engine.batched_forward), each session keeping its own KV cache, mask
and positions.

Why: a few-row draft forward is bound by reading the draft's weights, so N sessions each drafting
one row pay N reads where one would do. Sessions run their rounds on draft threads; each draft
forward is handed to `forward` here and waits. One model thread takes whatever is queued when it
is free (the forwards that arrived while the last one ran), so a lone session never waits for a
window and under load the forwards batch themselves. A lone forward runs as the session's own
forward, with its usual kernels and bits.

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
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.batched_forward import Segment, forward_segments

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 512  # rows per batched forward; forwards over it wait for the next one


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
            jobs = [self._queue.popleft()]
            rows = len(jobs[0].segment.input_ids)
            while self._queue and rows + len(self._queue[0].segment.input_ids) <= self.max_batch_rows:
                rows += len(self._queue[0].segment.input_ids)
                jobs.append(self._queue.popleft())
            return jobs

    def _serve(self) -> None:
        while (jobs := self._take()) is not None:
            self._run(jobs)

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
