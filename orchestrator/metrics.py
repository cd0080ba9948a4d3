"""Prometheus metrics with vLLM's names and meanings under the `dyspec:` prefix, so existing
spec-decode dashboards and tools read them unchanged.

Spec-decode counters follow vLLM: a draft is one round that sent a tree, draft tokens are tree
nodes, accepted tokens exclude the target's next token, and per-position counts are by tree
depth (position 0 = depth 1). Mean acceptance length is 1 + accepted / drafts; for trees, draft
tokens far exceed what can be accepted, so the acceptance-length histogram carries the shape.
Counters and round histograms come from the worker's final summary, so a request counts when it
finishes; a request cut short (cancelled, stop string, error) adds latency and error metrics only.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from proto.dyspec.v1 import generation_pb2

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_LENGTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
FINISH_REASONS = {generation_pb2.FINISH_REASON_LENGTH: "length", generation_pb2.FINISH_REASON_EOS: "stop",
                  generation_pb2.FINISH_REASON_CONTEXT: "length"}  # OpenAI's names


class Metrics:
    """One registry per server (tests run several servers in one process)."""

    def __init__(self, model_name: str):
        disable_created_metrics()  # no `*_created` series beside each counter and histogram, as in vLLM
        self.model_name = model_name
        self.registry = r = CollectorRegistry()
        m = ["model_name"]
        self.drafts = Counter("dyspec:spec_decode_num_drafts", "Rounds that sent a draft tree.", m, registry=r)
        self.draft_tokens = Counter("dyspec:spec_decode_num_draft_tokens", "Draft tree nodes sent.", m, registry=r)
        self.accepted_tokens = Counter("dyspec:spec_decode_num_accepted_tokens",
                                       "Draft tokens accepted (the target's next token not counted).", m, registry=r)
        self.accepted_per_pos = Counter("dyspec:spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by tree depth (position 0 = depth 1).",
                                        [*m, "position"], registry=r)
        self.acceptance_length = Histogram("dyspec:spec_decode_acceptance_length",
                                           "Tokens per round, including the target's next token.", m,
                                           buckets=_LENGTHS, registry=r)
        self.round_s = Histogram("dyspec:spec_decode_round_seconds",
                                 "Round wall time on the worker: draft + network + verify.", m, buckets=_FAST,
                                 registry=r)
        self.round_draft_s = Histogram("dyspec:spec_decode_round_draft_seconds",
                                       "Draft forwards and tree building per round.", m, buckets=_FAST, registry=r)
        self.round_network_s = Histogram("dyspec:spec_decode_round_network_seconds",
                                         "Round trip to the target minus the target's own time.", m, buckets=_FAST,
                                         registry=r)
        self.round_verify_s = Histogram("dyspec:spec_decode_round_verify_seconds",
                                        "The target's handling of a round (forward + verification + commit).", m,
                                        buckets=_FAST, registry=r)
        self.round_queue_s = Histogram("dyspec:spec_decode_round_target_queue_seconds",
                                       "Of the target's handling, time a round waited behind other sessions' "
                                       "forwards.", m, buckets=_FAST, registry=r)
        self.batch_sessions = Histogram("dyspec:target_batch_sessions",
                                        "Sessions whose rounds shared a round's target forward (1: alone).", m,
                                        buckets=_BATCH, registry=r)
        self.batch_rows = Histogram("dyspec:target_batch_rows", "Rows of the target forward that verified a round.",
                                    m, buckets=_ROWS, registry=r)
        self.budget = Gauge("dyspec:spec_decode_budget", "Tree budget of the last finished round.", m, registry=r)
        self.ttft_s = Histogram("dyspec:time_to_first_token_seconds", "Arrival to the first token.", m,
                                buckets=_SLOW, registry=r)
        self.itl_s = Histogram("dyspec:inter_token_latency_seconds",
                               "Time between token chunks (one chunk per round).", m, buckets=_FAST, registry=r)
        self.e2e_s = Histogram("dyspec:e2e_request_latency_seconds", "Arrival to the last message.", m,
                               buckets=_SLOW, registry=r)
        self.running = Gauge("dyspec:num_requests_running", "Requests in flight.", m, registry=r)
        self.prompt_tokens = Counter("dyspec:prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter("dyspec:generation_tokens", "Tokens streamed to clients.", m, registry=r)
        self.success = Counter("dyspec:request_success", "Finished requests by finish reason.",
                               [*m, "finished_reason"], registry=r)
        self.failure = Counter("dyspec:request_failure", "Failed requests by gRPC status code.", [*m, "code"],
                               registry=r)
        self.workers = Gauge("dyspec:draft_workers", "Draft workers known to this orchestrator, by health.",
                             [*m, "state"], registry=r)

    def track_workers(self, pool) -> None:
        """Read the pool's worker counts at each scrape (they change with health checks and DNS)."""
        for state, healthy in (("healthy", True), ("down", False)):
            self.workers.labels(self.model_name, state).set_function(
                lambda healthy=healthy: sum(w.healthy == healthy for w in pool.workers))

    def request(self) -> "RequestMetrics":
        return RequestMetrics(self)

    def totals(self) -> tuple[float, float, float, float]:
        """(drafts, draft tokens, accepted tokens, generated tokens) so far."""
        names = ("dyspec:spec_decode_num_drafts_total", "dyspec:spec_decode_num_draft_tokens_total",
                 "dyspec:spec_decode_num_accepted_tokens_total", "dyspec:generation_tokens_total")
        labels = {"model_name": self.model_name}
        return tuple(self.registry.get_sample_value(name, labels) or 0.0 for name in names)


def summary_line(before: tuple[float, ...], after: tuple[float, ...], seconds: float) -> str | None:
    """vLLM-style periodic log line over an interval, or None when nothing was generated in it."""
    drafts, drafted, accepted, generated = (a - b for a, b in zip(after, before))
    if generated == 0:
        return None
    return (f"generation {generated / seconds:.1f} tokens/s; spec decode: mean acceptance length "
            f"{1 + accepted / drafts if drafts else 1.0:.2f}, accepted {accepted:.0f} of {drafted:.0f} draft tokens "
            f"({accepted / drafted if drafted else 0.0:.1%}) in {drafts:.0f} drafts")


class RequestMetrics:
    """The timings of one request, recorded as its messages pass through."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.label = metrics.model_name
        self.start = self.last = time.perf_counter()
        self.first = True

    def tokens(self, count: int) -> None:
        now = time.perf_counter()
        (self.m.ttft_s if self.first else self.m.itl_s).labels(self.label).observe(now - self.last)
        self.first, self.last = False, now
        self.m.generation_tokens.labels(self.label).inc(count)

    def summary(self, summary: generation_pb2.GenerationSummary) -> None:
        m, label, stats = self.m, self.label, summary.stats
        m.e2e_s.labels(label).observe(time.perf_counter() - self.start)
        m.success.labels(label, FINISH_REASONS.get(summary.finish_reason, "length")).inc()
        m.prompt_tokens.labels(label).inc(stats.prompt_tokens)
        for round_ in stats.rounds:
            if round_.drafted_tokens:
                m.drafts.labels(label).inc()
                m.draft_tokens.labels(label).inc(round_.drafted_tokens)
                m.accepted_tokens.labels(label).inc(round_.accepted_tokens)
            m.acceptance_length.labels(label).observe(round_.accepted_tokens + 1)
            m.round_s.labels(label).observe(round_.round_ns / 1e9)
            m.round_draft_s.labels(label).observe(round_.draft_ns / 1e9)
            m.round_network_s.labels(label).observe(round_.network_ns / 1e9)
            m.round_verify_s.labels(label).observe(round_.target_total_ns / 1e9)
            m.round_queue_s.labels(label).observe(round_.target_queue_ns / 1e9)
            if round_.batch_rows:  # 0: a target that does not report its batches
                m.batch_sessions.labels(label).observe(max(1, round_.batch_sessions))
                m.batch_rows.labels(label).observe(round_.batch_rows)
        for position, count in enumerate(stats.accepted_per_position):
            m.accepted_per_pos.labels(label, str(position)).inc(count)
        if stats.rounds:
            m.budget.labels(label).set(stats.rounds[-1].budget)

    def failed(self, code_name: str) -> None:
        self.m.failure.labels(self.label, code_name).inc()
