"""A target killed mid-stream, across processes: every session on it fails with UNAVAILABLE within
5 s, its message naming the target, whether the client comes through the SDK and the orchestrator
or calls a draft worker directly, with serial or overlapped rounds; and a target restarted on the
same port serves again.

The drafts are slow and the target fast, so the kill lands while the target is idle between rounds:
the worker finds the stream dead on its next write (which once escaped as UNKNOWN "RPC already
finished"), not on a read."""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from orchestrator.sdk import Client, RetryPolicy, Unavailable
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from tests.service_process import ServiceProcess, free_port

PROMPT = [3, 1, 4, 1, 5]
FAILED_WITHIN_S = 5.0
SLOW_DRAFT = ["--model-factory", "tests.service_models:slow_draft", "--model-kwargs", '{"forward_s": 0.05}']
pytestmark = pytest.mark.e2e


def start_target(logs, port: int, name: str) -> ServiceProcess:
    target = ServiceProcess.module("target_service", ["--port", str(port), "--no-warmup",
                                                      "--model-factory", "tests.service_models:target"],
                                   logs / f"{name}.log")
    target.wait_ready(120)
    return target


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """{"target", "serial" (a --no-overlap worker behind "front", the orchestrator), "overlapped"
    (a worker called directly)}; the target's port, logs folder."""
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    processes = {}
    try:
        processes["target"] = start_target(logs, port, "target")
        address = processes["target"].address
        for name, extra in (("serial", ["--no-overlap"]), ("overlapped", ["--overlap", "on"])):
            processes[name] = ServiceProcess.module("draft_service", [
                "--no-warmup", "--target-address", address, "--budget", "4", *extra, *SLOW_DRAFT],
                logs / f"{name}.log")
        for name in ("serial", "overlapped"):
            processes[name].wait_ready(120)
        processes["front"] = ServiceProcess.module("orchestrator", [
            "--worker", processes["serial"].address, "--http-port", "0", "--health-interval-s", "0.5"],
            logs / "orchestrator.log")
        processes["front"].wait_ready(60)
        yield processes, port, logs
    finally:
        for process in reversed(list(processes.values())):
            process.stop()


def worker_active(worker) -> int:
    with grpc.insecure_channel(worker.address) as channel:
        return generation_pb2_grpc.DraftWorkerStub(channel).Stats(generation_pb2.WorkerStatsRequest(),
                                                                  timeout=5).active_sessions


def failure_after(stream, killed: list[float]) -> tuple[Exception, float]:
    """Drain `stream`; the exception that ended it and its delay after the kill time in `killed`."""
    try:
        for _ in stream:
            pass
    except Exception as exc:  # what the caller sees is the point of the test
        return exc, time.monotonic() - killed[0]
    raise AssertionError("the stream ended cleanly although its target was killed")


def test_a_killed_target_fails_every_session_with_unavailable_naming_it(stack):
    processes, port, logs = stack
    target_address = processes["target"].address
    direct = grpc.insecure_channel(processes["overlapped"].address)
    request = generation_pb2.WorkerGenerateRequest(request=generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=200, ignore_eos=True,
        sampling=sampling_pb2.SamplingParams(temperature=1.0, seed=0)))
    with Client(processes["front"].address, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        through_sdk = client.stream(PROMPT, max_new_tokens=200, temperature=1.0, seed=0, ignore_eos=True)
        worker_call = generation_pb2_grpc.DraftWorkerStub(direct).Generate(request, timeout=60)
        assert next(through_sdk).token_ids and next(worker_call).tokens.token_ids  # both sessions run
        killed = [time.monotonic()]
        processes["target"].signal(signal.SIGKILL)
        sdk_error, sdk_s = pool.submit(failure_after, through_sdk, killed).result(30)
        worker_error, worker_s = pool.submit(failure_after, worker_call, killed).result(30)
    direct.close()

    assert isinstance(sdk_error, Unavailable), repr(sdk_error)
    assert f"target {target_address}" in sdk_error.details, sdk_error.details
    assert sdk_s < FAILED_WITHIN_S, f"the SDK client heard of the failure {sdk_s:.2f} s after the kill"
    assert isinstance(worker_error, grpc.RpcError), repr(worker_error)
    assert worker_error.code() == grpc.StatusCode.UNAVAILABLE, (worker_error.code(), worker_error.details())
    assert f"target {target_address}" in worker_error.details(), worker_error.details()
    assert worker_s < FAILED_WITHIN_S, f"the worker's caller heard of the failure {worker_s:.2f} s after the kill"
    for name in ("serial", "overlapped"):
        assert worker_active(processes[name]) == 0, f"the {name} worker still counts the failed session"

    processes["target"].stop()
    restarted_at = time.monotonic()
    processes["target"] = start_target(logs, port, "target-restarted")
    patient = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=0.5)
    with Client(processes["front"].address, timeout=60, retry=patient) as client:
        assert len(client.generate(PROMPT, 4, ignore_eos=True).token_ids) == 4  # the same stack serves again
    assert time.monotonic() - restarted_at < 30
