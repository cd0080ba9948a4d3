"""Pooling the forwards of many threads: the barrier shared by the tree-quality scorers.

Scoring runs one at a time is a chain of small forwards (a node is drawn only after its parent
was evaluated), and small forwards on a CPU cost nearly as much as large ones. So each run is a
thread, and its model requests wait until every thread waits; then they go out as one forward.
"""
from __future__ import annotations

import threading
import time

import torch


class Coordinator:
    """The batching barrier of one or more model pools: runs are threads, and a pool's pending
    requests are served when every running thread waits on some pool (or on another thread), so
    each forward carries as many requests as the runs can produce.

    A pool has `name`, `pending` (a list the coordinator fills), `serve(batch)` (sets each
    request's `logits` or `error`), and `forwards` / `rows` counters for progress lines."""

    def __init__(self):
        self.cond = threading.Condition()
        self.pools: list = []
        self.working = 0
        # True while the forwards run: threads neither start a job nor resume, so the pools may
        # compact their caches and remap the runs' slots with nobody reading them
        self.serving = False

    def submit(self, pool, req):
        with self.cond:
            pool.pending.append(req)
            self.cond.notify_all()
            self.cond.wait_for(lambda: (req.logits is not None or req.error is not None) and not self.serving)
        if req.error is not None:
            raise req.error
        return req

    def park(self, event: threading.Event) -> None:
        """Wait for another thread's result without holding up the forwards."""
        with self.cond:
            self.working -= 1
            self.cond.notify_all()
        event.wait()
        with self.cond:
            self.cond.wait_for(lambda: not self.serving)
            self.working += 1

    def _pending(self) -> int:
        return sum(len(p.pending) for p in self.pools)

    def run_threads(self, jobs, max_threads: int = 12, progress=None, every_s: float = 60.0) -> None:
        """Run the callables in `jobs` on up to `max_threads` threads while this thread serves
        their forwards. The cap bounds memory: a tree being built holds a float distribution over
        the whole vocabulary per evaluated node (~2 MB for 152k tokens untruncated)."""
        errors: list[BaseException] = []
        queue = list(reversed(jobs))
        started = last_report = time.monotonic()
        finished = threading.Event()
        live = [min(max_threads, len(jobs))]

        def worker():
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: not self.serving)
                    if not queue or errors:
                        live[0] -= 1
                        if live[0] == 0:
                            finished.set()
                        self.cond.notify_all()
                        return
                    job = queue.pop()
                    self.working += 1
                try:
                    job()
                except BaseException as e:  # surfaced to the caller once the threads drain
                    errors.append(e)
                finally:
                    with self.cond:
                        self.working -= 1
                        self.cond.notify_all()

        # torch's thread count is process-wide: one while builders run (else each starts a team of
        # OpenMP threads), all of them for the forwards, which run while every builder waits
        forward_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(live[0])]
        for t in threads:
            t.start()
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: finished.is_set() or (self._pending() and self._pending() >= self.working))
                    if finished.is_set() and not self._pending():
                        break
                    batches = [(p, p.pending) for p in self.pools if p.pending]
                    for p in self.pools:
                        p.pending = []
                    self.serving = True
                torch.set_num_threads(forward_threads)
                try:
                    for pool, batch in batches:
                        pool.serve(batch)
                finally:
                    torch.set_num_threads(1)
                    with self.cond:
                        self.serving = False
                        self.cond.notify_all()
                if progress is not None and time.monotonic() - last_report > every_s:
                    last_report = time.monotonic()
                    with self.cond:
                        left = len(queue) + self.working
                    stats = ", ".join(f"{p.name} {p.forwards} forwards ({p.rows} rows)" for p in self.pools)
                    progress(f"  {len(jobs) - left}/{len(jobs)} runs done, {stats} in {last_report - started:.0f}s")
        finally:
            torch.set_num_threads(forward_threads)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def masked_forward(model, cache, ids: list[int], visible: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Forward `ids` as new cache entries, row i attending to the cache slots and new rows where
    visible[i] ([len(ids), cache length + len(ids)] bool) is set, at positions[i]. Returns the
    rows' logits, float32 on the host."""
    first = next(model.parameters())
    mask = torch.zeros(visible.shape, dtype=first.dtype).masked_fill_(~visible, torch.finfo(first.dtype).min)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=first.device),
                    attention_mask=mask[None, None].to(first.device), position_ids=positions[None].to(first.device),
                    cache=cache, use_cache=True, logits_to_keep=len(ids))
    return out.logits[0].float().cpu()


def forward_rows(model, cache, rows: list[tuple[int, int, list[int]]]) -> torch.Tensor:
    """Forward new cache entries given as (token, position, the slots it attends to); the new rows
    take slots cache length, cache length + 1, ... in order, and each must name its own. Returns
    the rows' logits, float32 on the host."""
    n_before = cache.get_seq_length()
    visible = torch.zeros(len(rows), n_before + len(rows), dtype=torch.bool)
    positions = torch.empty(len(rows), dtype=torch.long)
    for i, (_, position, sees) in enumerate(rows):
        visible[i, sees] = True
        positions[i] = position
    return masked_forward(model, cache, [token for token, _, _ in rows], visible, positions)
