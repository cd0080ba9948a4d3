"""Many sessions at once through the real services (processes on loopback): a target whose rounds
are batched across sessions, two draft workers sharing it and an orchestrator, reached through the
SDK. Eight concurrent requests with different prompts and lengths each get exactly what they get
alone: greedy equal to target-only greedy decoding, seeded sampling equal to the same seed alone;
and the target did verify rounds of different sessions in shared forwards."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from orchestrator.sdk import Client
from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from tests import service_models
from tests.service_process import ServiceProcess
from tests.tiny_models import greedy_reference

PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5], [8], [9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4], [33, 8, 3],
           [2, 7, 9, 5, 0, 2, 8], [60, 61], [4, 1, 9, 7, 1, 6, 9, 3, 9, 9, 3, 7, 5, 1, 0]]
LENGTHS = [24, 40, 17, 32, 9, 28, 36, 20]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = []
    try:
        target = ServiceProcess.module("target_service", [
            "--no-warmup", "--model-factory", "tests.service_models:slow_target",
            "--model-kwargs", '{"forward_s": 0.03}'], logs / "target.log")  # rounds long enough to queue
        started.append(target)
        target.wait_ready(120)
        workers = [ServiceProcess.module("draft_service", [
            "--no-warmup", "--target-address", target.address, "--budget", "6",
            "--model-factory", "tests.service_models:draft"], logs / f"worker{i}.log") for i in range(2)]
        started += workers
        for worker in workers:
            worker.wait_ready(120)
        front = ServiceProcess.module("orchestrator", [
            *(arg for w in workers for arg in ("--worker", w.address)), "--http-port", "0"], logs / "orchestrator.log")
        started.append(front)
        front.wait_ready(60)
        yield target, front
    finally:
        for process in reversed(started):
            process.stop()


def target_stats(target) -> target_pb2.TargetStatsResponse:
    with grpc.insecure_channel(target.address) as channel:
        return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)


def run_all(front, options: list[dict], concurrent: bool) -> list[list[int]]:
    with Client(front.address, timeout=120) as client:
        def one(i: int) -> list[int]:
            return client.generate(PROMPTS[i], LENGTHS[i], ignore_eos=True, **options[i]).token_ids

        if not concurrent:
            return [one(i) for i in range(len(PROMPTS))]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(one, range(len(PROMPTS))))


def test_eight_concurrent_greedy_requests_each_equal_target_only_greedy_and_themselves_alone(stack):
    target, front = stack
    before = target_stats(target)
    greedy = [dict(temperature=0.0)] * len(PROMPTS)
    together = run_all(front, greedy, concurrent=True)
    during = target_stats(target)
    model = service_models.target()
    for i, tokens in enumerate(together):
        assert tokens == greedy_reference(model, PROMPTS[i], LENGTHS[i]), f"request {i} under concurrency"
    assert run_all(front, greedy, concurrent=False) == together
    shared = during.batched_rounds - before.batched_rounds
    assert shared >= len(PROMPTS), f"only {shared} rounds shared a forward: batching did not happen"
    assert during.forwards - before.forwards < during.rounds_verified - before.rounds_verified


def test_concurrent_seeded_sampling_equals_each_request_alone(stack):
    target, front = stack
    before = target_stats(target)
    sampled = [dict(temperature=[1.0, 0.7, 1.2][i % 3], top_k=[0, 20, 0][i % 3], seed=500 + i)
               for i in range(len(PROMPTS))]
    together = run_all(front, sampled, concurrent=True)
    assert target_stats(target).batched_rounds > before.batched_rounds
    assert run_all(front, sampled, concurrent=False) == together, "a session's draws moved with its batch-mates"
    assert len({tuple(t) for t in together}) == len(PROMPTS)
