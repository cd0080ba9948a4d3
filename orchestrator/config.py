"""Orchestrator configuration: endpoints, limits and defaults in one place."""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.discovery import parse_worker
from serving.grpc_server import DEFAULT_MAX_MESSAGE_BYTES


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

    def __post_init__(self):
        if not self.workers:
            raise ValueError("give at least one draft worker address")
        for worker in self.workers:
            parse_worker(worker)  # ValueError naming the bad address
        if self.max_concurrent < 1 or self.default_max_tokens < 1:
            raise ValueError("max_concurrent and default_max_tokens must be >= 1")
        intervals = (self.default_timeout_s, self.health_interval_s, self.health_timeout_s, self.log_interval_s)
        if min(intervals) <= 0 or self.drain_grace_s < 0:
            raise ValueError("timeouts and intervals must be > 0, drain_grace_s >= 0")
        if not self.model_name:
            raise ValueError("model_name must not be empty")


# Read for the entry points' defaults only (a config needs a worker; this one is never connected to).
DEFAULTS = OrchestratorConfig(workers=("localhost:50062",))
