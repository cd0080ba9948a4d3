"""The system under test for the speed benchmarks: a target service and draft workers as separate
processes on loopback (`python -m target_service`, `python -m draft_service`, READY lines), the
workers reaching the target through a byte-counting delay proxy, and a client of the
DraftWorker.Generate RPC that times each request and keeps the worker's per-round stats.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from benchmarks.model_pairs import ModelPair
from benchmarks.wire_counter import CountingDelayProxy
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from tests.service_process import ServiceProcess

ROUND_FIELDS = ("budget", "drafted_tokens", "accepted_tokens", "round_ns", "draft_ns", "verify_ns",
                "target_total_ns", "network_ns", "drafted_ahead", "kept_ahead", "overlapped_ns", "wasted_ns", "wait_ns")
STAT_FIELDS = ("steps", "generated_tokens", "accepted_tokens", "drafted_tokens", "draft_ns", "build_ns", "verify_ns",
               "target_forward_ns", "target_total_ns", "network_ns", "total_ns")


@dataclass
class RunResult:
    tokens: list[int]
    wall_s: float  # request sent -> summary received, at the client
    first_chunk_s: float  # request sent -> first token chunk
    first_chunk_tokens: int
    chunk_times_s: list[float]  # arrival of each chunk (one per round), from the request
    stats: dict  # GenerationStats fields in STAT_FIELDS
    rounds: list[list[int]]  # per round, ROUND_FIELDS in order
    finish_reason: str
    bytes_to_target: int = 0
    bytes_to_draft: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s

    @property
    def decode_tokens_per_s(self) -> float:
        """After the first chunk: excludes session open, prefill and the first round."""
        rest = len(self.tokens) - self.first_chunk_tokens
        span = self.wall_s - self.first_chunk_s
        return rest / span if rest > 0 and span > 0 else float("nan")


class Pipeline:
    """Target + draft workers on loopback. Workers are keyed by name (e.g. one per draft top-k)."""

    def __init__(self, pair: ModelPair, log_dir: Path, rtt_s: float = 0.0, progress=print):
        self.pair, self.log_dir, self.progress = pair, Path(log_dir), progress
        self.log_dir.mkdir(parents=True, exist_ok=True)
        progress(f"  service logs: {self.log_dir}")
        self.target: ServiceProcess | None = None
        self.proxy: CountingDelayProxy | None = None
        self.workers: dict[str, ServiceProcess] = {}
        self.channels: dict[str, grpc.Channel] = {}
        self.initial_rtt_s = rtt_s

    def start_target(self, timeout_s: float = 900, extra: list[str] = ()) -> str:
        start = time.perf_counter()
        self.target = ServiceProcess.module("target_service", [*ModelPair.service_args(self.pair.target), *extra],
                                            self.log_dir / "target.log")
        address = self.target.wait_ready(timeout_s)
        self.proxy = CountingDelayProxy(address, self.initial_rtt_s)
        self.progress(f"  target ready at {address} ({time.perf_counter() - start:.0f} s); "
                      f"workers connect through the counting proxy {self.proxy.address}")
        return address

    def start_worker(self, key: str, extra: list[str], timeout_s: float = 900) -> str:
        start = time.perf_counter()
        worker = ServiceProcess.module(
            "draft_service", ["--target-address", self.proxy.address, "--deadline-s", "600", *extra,
                              *ModelPair.service_args(self.pair.draft)], self.log_dir / f"draft-{key}.log")
        self.workers[key] = worker
        address = worker.wait_ready(timeout_s)
        self.channels[key] = grpc.insecure_channel(address)
        self.progress(f"  draft worker {key!r} ready at {address} ({time.perf_counter() - start:.0f} s): {' '.join(extra)}")
        return address

    def stop_worker(self, key: str) -> None:
        self.channels.pop(key).close()
        self.workers.pop(key).stop()

    def generate(self, key: str, prompt: list[int], max_new_tokens: int, method: str, budget: int = 0,
                 temperature: float = 0.0, seed: int = 0, timeout_s: float = 3600, on_chunk=None) -> RunResult:
        """One DraftWorker.Generate call; `on_chunk(index, elapsed_s, tokens_so_far)` is called after each chunk."""
        request = generation_pb2.GenerateRequest(
            request_id=f"bench-{method}-{budget}", token_ids=generation_pb2.TokenIds(ids=prompt),
            max_new_tokens=max_new_tokens, method=method, budget=budget,
            sampling=sampling_pb2.SamplingParams(temperature=temperature, seed=seed))
        stub = generation_pb2_grpc.DraftWorkerStub(self.channels[key])
        before = self.proxy.counts()
        tokens, times, first_tokens, summary = [], [], 0, None
        start = time.perf_counter()
        for response in stub.Generate(generation_pb2.WorkerGenerateRequest(request=request), timeout=timeout_s):
            now = time.perf_counter() - start
            if response.HasField("tokens"):
                if not times:
                    first_tokens = len(response.tokens.token_ids)
                tokens += response.tokens.token_ids
                times.append(now)
                if on_chunk is not None:
                    on_chunk(len(times) - 1, now, len(tokens))
            else:
                summary = response.summary
        wall = time.perf_counter() - start
        after = self.proxy.counts()
        stats = summary.stats
        return RunResult(
            tokens=list(tokens), wall_s=wall, first_chunk_s=times[0] if times else wall, first_chunk_tokens=first_tokens,
            chunk_times_s=times, stats={f: getattr(stats, f) for f in STAT_FIELDS},
            rounds=[[getattr(r, f) for f in ROUND_FIELDS] for r in stats.rounds],
            finish_reason=generation_pb2.FinishReason.Name(summary.finish_reason),
            bytes_to_target=after["to_target"] - before["to_target"], bytes_to_draft=after["to_draft"] - before["to_draft"])

    def close(self) -> None:
        for key in list(self.workers):
            try:
                self.stop_worker(key)
            except Exception as exc:  # keep stopping the others
                self.progress(f"  stopping worker {key}: {exc}")
        if self.proxy is not None:
            self.proxy.close()
        if self.target is not None:
            self.target.stop()
