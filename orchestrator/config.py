"""Orchestrator configuration: endpoints, limits and defaults in one place."""
from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.discovery import parse_worker
from serving.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from serving.tls import TlsFiles


@dataclass(frozen=True)
class OrchestratorConfig:
    workers: tuple[str, ...]  # draft worker "host:port"s or "dns:///name:port"s (every address), round-robin
    host: str = "127.0.0.1"
    port: int = 50051  # public gRPC (dyspec.v1.Generation); 0 picks a free port
    http_host: str = "127.0.0.1"
    http_port: int = 8000  # OpenAI-compatible HTTP; 0 picks a free port
    model_name: str = "dyspec"  # the served model's public name (/v1/models, the `model` field)
    max_concurrent: int = 64  # requests in flight over gRPC and HTTP together; more are refused
    default_timeout_s: float = 600.0  # deadline of a request whose caller set none (all HTTP requests)
    default_max_tokens: int = 256  # OpenAI requests without max_tokens
    health_interval_s: float = 2.0  # between health checks of each worker
    health_timeout_s: float = 1.0  # deadline of one health check
    log_interval_s: float = 10.0  # between summary lines in the log (intervals with traffic only)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_grace_s: float = 30.0
    # Who may call (orchestrator.auth): none configured means open. Never printed (repr=False).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_concurrent_per_key: int = 0  # requests in flight per API key; 0: only max_concurrent
    public_metrics: bool = False  # /metrics without a key even when keys are required
    # Request limits (orchestrator.limits); 0 derives: the context from the tokenizer's
    # model_max_length, the prompt's characters from the context.
    max_context_tokens: int = 0
    max_prompt_chars: int = 0
    max_body_bytes: int = 8 << 20  # HTTP bodies; larger ones get 413 before they are read
    # TLS (serving.tls). `tls`: the public gRPC and HTTP ports (server TLS; callers bring API keys,
    # not certificates). `worker_tls`: the links to the draft workers, mutual TLS (its cert is the
    # client certificate, its ca checks the workers'). None: plaintext.
    tls: TlsFiles | None = None
    worker_tls: TlsFiles | None = None
    worker_tls_server_name: str = ""  # the name the workers' certificates carry (they are dialled by IP)
    health_port: int | None = None  # plaintext grpc.health.v1 alone, for probes that speak no TLS; None: off

    def __post_init__(self):
        if not self.workers:
            raise ValueError("give at least one draft worker address")
        for worker in self.workers:
            parse_worker(worker)  # ValueError naming the bad address
        if self.max_concurrent < 1 or self.default_max_tokens < 1:
            raise ValueError("max_concurrent and default_max_tokens must be >= 1")
        if min(self.max_concurrent_per_key, self.max_context_tokens, self.max_prompt_chars) < 0 \
                or self.max_body_bytes < 1:
            raise ValueError("max_concurrent_per_key, max_context_tokens and max_prompt_chars must be >= 0 "
                             "(0: no per-key limit / derived), max_body_bytes >= 1")
        intervals = (self.default_timeout_s, self.health_interval_s, self.health_timeout_s, self.log_interval_s)
        if min(intervals) <= 0 or self.drain_grace_s < 0:
            raise ValueError("timeouts and intervals must be > 0, drain_grace_s >= 0")
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if self.worker_tls is not None and not (self.worker_tls.cert and self.worker_tls.ca):
            raise ValueError("worker_tls needs a client certificate and a CA: the workers' links are mutual TLS")


# Read for the entry points' defaults only (a config needs a worker; this one is never connected to).
DEFAULTS = OrchestratorConfig(workers=("localhost:50062",))
