"""How many threads our kernels (engine.packed_linear's panel products: float32, bf16, int8, int4)
split their panels over, apart from torch's own intra-op thread count.

Why apart. The kernels split their panels over a Python thread pool (ctypes drops the GIL), while
torch's ops between them (norms, activations, rotary embeddings) run on torch's OpenMP workers, and
libgomp's workers spin for a while after each parallel op on the very cores the pool's threads then
need. Measured on the 2-core Zen 5 with the 1.5B fp32 target: with torch on two threads a 128-token
prompt's prefill took 1.6-1.7 s, no faster than on one thread (1.6-1.8 s), and a 16-node tree 265 ms
against 191 ms on one; with torch's ops on one thread and the kernels on two, 0.9-1.1 s and 177 ms.
The ops between the products are small next to them, so a forward that wants more threads gives
them to the kernels (`using`), and a process started on several threads hands them over once its
model runs on our kernels (`take_from_torch`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_local = threading.local()  # .threads: this thread's override (a forward on more threads), if any
_process_threads: int | None = None  # take_from_torch's count, for every thread without an override


def kernel_threads() -> int:
    """Threads for the kernels called from this thread: its override (`using`), else the process's
    count (`take_from_torch`), else torch's intra-op count."""
    override = getattr(_local, "threads", None)
    if override is not None:
        return override
    return _process_threads if _process_threads is not None else torch.get_num_threads()


@contextmanager
def using(threads: int) -> Iterator[None]:
    """The kernels called from this thread split over `threads` threads inside the block; torch's
    own ops keep their count."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = getattr(_local, "threads", None)
    _local.threads = threads
    try:
        yield
    finally:
        _local.threads = before


def take_from_torch() -> int:
    """Give torch's intra-op threads to the kernels: they split over the process's torch thread count,
    and torch's own ops run on one thread from now on. For a process whose model runs on our
    kernels; a no-op on one thread. Returns the kernels' count."""
    global _process_threads
    threads = torch.get_num_threads()
    if threads > 1:
        _process_threads = threads
        torch.set_num_threads(1)
    return kernel_threads()


def give_back_to_torch() -> None:
    """Undo take_from_torch (tests, in-process benchmarks): torch gets the count back."""
    global _process_threads
    if _process_threads is not None:
        torch.set_num_threads(_process_threads)
        _process_threads = None
