"""Target service configuration: limits and serving options, defaults in one place."""
from __future__ import annotations

from dataclasses import dataclass

from serving.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from serving.tls import TlsFiles


WINDOW_FRACTION = 0.1  # the automatic batching window: this share of the recent forward time
WINDOW_MAX_S = 0.05  # and never longer
# a drafting session's next round is awaited if it is expected within this share of the recent
# forward time (target_service.batcher: each session's think time, verdict to next round). A round
# due within the forward that would run without it gets its verdict sooner by the wait (else it
# waits out that forward, then pays a forward of its own), and the two sessions' next rounds start
# in step. Half a forward missed two sessions that alternated (each drafting during the other's
# forward, ~470 ms of drafting against ~800 ms forwards on the 2-core Sapphire Rapids class CPU):
# they shared 5 of 22 forwards.
DRAFT_WINDOW_FRACTION = 1.0
# how late past its expected time an awaited drafting session's round may come: this share of its
# think time. Trees change size round by round (the joint budget splits anew), so drafting times
# vary by half and more; waiting only a plain window past the (decayed mean) estimate gave up on
# half the rounds of two sessions in step, which then alternated again.
DRAFT_LATE_FRACTION = 0.5


@dataclass(frozen=True)
class BatchingConfig:
    """How the target batches rounds of many sessions into one forward (target_service.batcher)."""

    enabled: bool = True  # False: one round per forward, in arrival order (the pre-batching target)
    max_batch_rows: int = 4096  # rows in one forward (suffixes + roots + tree nodes); one round always fits
    # How long a drain may wait for open sessions that have not sent a round yet; None (auto):
    # WINDOW_FRACTION of the recent forward time, at most WINDOW_MAX_S, and only for sessions in
    # plain decoding (last round without a tree). Without a window, two plain sessions ping-pong:
    # each round arrives just after the other's forward began, so no forward ever holds both
    # (measured: 2 streams, 63 forwards for 64 rounds, no faster than one stream); their next
    # rounds come milliseconds after the verdict, so a short wait batches them. Drafting sessions
    # are awaited too, but only those whose next round is expected (their own measured think time
    # after their last verdict) within DRAFT_WINDOW_FRACTION of the forward time: sessions drafting
    # trees at 4-8 streams otherwise split into groups a few milliseconds apart that never met
    # again (fixed budget 3 at 8 streams: 85 rounds in 24 forwards, 3.5 sessions each, where a
    # 200 ms window for all made it 14). (Waiting a fixed window for every drafting session, with
    # no estimate of when each comes, measured slower at 2-4 streams in an earlier version.)
    window_s: float | None = None
    # threads (0: the process's own count; our kernels take them, torch's ops keep theirs:
    # engine.kernel_threads) for prompt prefills while two or more sessions are
    # open, and for round forwards while, besides, no session outside the forward is being drafted
    # for (its last round carried a tree and its next is not in this forward). Where draft workers
    # share the target's machine, a worker has nothing to draft while every session it drafts for
    # waits on the forward (serial rounds), or once the joint budget has shrunk every tree to plain
    # decoding under load, so its cores can go to the target's forwards; a prefill is compute-bound
    # and long, so it takes them even while some session drafts (so does a round carrying its
    # prompt, having overtaken its prefill); round forwards while a session outside them drafts, and
    # every forward of a lone session, keep the one thread and leave the draft its core. (Switching
    # whenever two sessions were open lost at 4-8 streams, where the drafts still drafted:
    # reports/concurrency/zen5_fp32_threads.)
    batched_threads: int = 0

    def __post_init__(self):
        if self.max_batch_rows < 1 or (self.window_s is not None and self.window_s < 0) or self.batched_threads < 0:
            raise ValueError(f"max_batch_rows must be >= 1, window_s and batched_threads >= 0, got {self}")


@dataclass(frozen=True)
class TargetConfig:
    host: str = "127.0.0.1"
    port: int = 50061  # 0 picks a free port (printed on the READY line)
    tp_size: int = 1  # > 1: tensor parallel under the deepspeed launcher, one process per rank
    max_sessions: int = 64
    max_cached_tokens: int = 1 << 18  # committed tokens summed over sessions (their KV caches)
    idle_timeout_s: float = 120.0  # a session with no round for this long is evicted
    max_tree_nodes: int = 1024
    max_context_tokens: int = 0  # 0: the model's max_position_embeddings
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_grace_s: float = 30.0  # on SIGTERM, how long in-flight sessions may keep going
    warmup: bool = True  # a few dummy rounds before serving (serving.warmup), so round 1 runs at full speed
    tls: TlsFiles | None = None  # mutual TLS: only draft workers with a certificate from its CA get in; None: plaintext
    health_port: int | None = None  # plaintext grpc.health.v1 alone, for probes that speak no TLS; None: off
    batching: BatchingConfig = BatchingConfig()  # many sessions' rounds in one forward
    # forward a new session's prompt right after opening it, while the draft drafts tree 1, instead
    # of with tree 1 (under tensor parallelism every rank prefills: target_service.tp.Prefill)
    prefill_at_open: bool = True

    def __post_init__(self):
        for name in ("tp_size", "max_sessions", "max_cached_tokens", "max_tree_nodes", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.idle_timeout_s <= 0 or self.drain_grace_s < 0 or self.max_context_tokens < 0:
            raise ValueError("idle_timeout_s must be > 0, drain_grace_s and max_context_tokens >= 0")
