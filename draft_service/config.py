"""Draft worker configuration, defaults in one place."""
from __future__ import annotations

from dataclasses import dataclass

from dyspec import METHODS
from dyspec.warp import SamplingParams
from serving.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from serving.tls import TlsFiles


@dataclass(frozen=True)
class DraftConfig:
    target_address: str  # default target "host:port" (a request may name another)
    host: str = "127.0.0.1"
    port: int = 50062  # 0 picks a free port (printed on the READY line)
    method: str = "dyspec"  # tree builder when a request leaves it empty
    budget: int = 0  # tree budget when a request leaves it 0: a fixed number, or 0 for automatic (tuned per session)
    max_budget: int = 64  # the automatic policy's largest tree
    deadline_s: float = 10.0  # per round (and for opening the target session)
    max_sessions: int = 8  # concurrent Generate calls; also the draft thread pool size
    # Draft temperature as dyspec.generate's default. Top-k 32 truncation keeps every shipped
    # distribution sparse (an untruncated Qwen row is ~1 MB on the wire, 32 entries ~0.3 kB) and is
    # lossless: the target verifies with exactly the truncated distribution each child was drawn from.
    draft_sampling: SamplingParams = SamplingParams(temperature=0.6, top_k=32)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_grace_s: float = 30.0
    # Draft round r+1 while the target verifies round r (dyspec.overlap): True, False, or None (auto:
    # only when the target is on another host). On one machine the pre-drafting competes with the
    # target for memory bandwidth and its guess held in 20-30% of rounds, so serial rounds measured
    # faster on both CPUs we had then (benchmarks/reports/pipeline_speed/fp32_avx2, bf16_zen5). With
    # today's kernels on the AVX2 Zen 3 (fp32_avx2_zen3) the two were within noise of each other:
    # overlapped 1.05x serial at T=0, 0.98x at T=0.6, its worst prompt lower (0.98x the target alone
    # against 1.09x), so loopback stays serial.
    overlap: bool | None = None
    # budget auto: sessions drafting at once for a batching target share one budget (draft_service.shared_budget)
    joint_budget: bool = True
    # draft forwards that sessions ask for at the same time run as one forward (draft_service.draft_batcher)
    batch_drafting: bool = True
    warmup: bool = True  # a few dummy draft forwards before serving (serving.warmup)
    # added to round 1's deadline per prompt token: that round carries the target's prefill. A
    # 1.5B fp32 target's long forwards cost ~26 ms per token on 2 cores of these CPUs (BENCHMARKS.md
    # s.3), so about twice that on one; 0.1 s leaves room for a busy machine. The allowance only
    # lengthens round 1's deadline; the caller's own deadline still bounds the whole call.
    prefill_s_per_token: float = 0.1
    # Mutual TLS on both sides: its port admits callers with a certificate from tls.ca, and it dials
    # the target with tls.cert as its client certificate, checking the target's against tls.ca.
    # None: plaintext both ways (loopback development).
    tls: TlsFiles | None = None
    tls_server_name: str = ""  # the name the target's certificate carries, if not the host dialled
    health_port: int | None = None  # plaintext grpc.health.v1 alone, for probes that speak no TLS; None: off

    def overlaps(self, target_address: str) -> bool:
        """Whether sessions against `target_address` ("host:port") draft ahead."""
        if self.overlap is not None:
            return self.overlap
        from serving.tls import is_loopback

        return not is_loopback(target_address.rpartition(":")[0] or target_address)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.budget < 0 or self.max_budget < 1 or self.max_sessions < 1 or self.deadline_s <= 0:
            raise ValueError("budget must be >= 0 (0: automatic), max_budget and max_sessions >= 1, deadline_s > 0")
        if self.prefill_s_per_token < 0:
            raise ValueError("prefill_s_per_token must be >= 0")
