"""Failure paths across processes: a stalled target ends the draft's call with DEADLINE_EXCEEDED
within the round deadline (and frees the session once it runs again), and a client that cancels
mid-stream frees its session on the draft worker and on the target."""
from __future__ import annotations

import signal
import time

import grpc
import pytest

from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2, target_pb2, target_pb2_grpc
from tests.service_process import ServiceProcess

DEADLINE_S = 1.0
IDLE_TIMEOUT_S = 2.0
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    target = ServiceProcess.module("target_service", ["--idle-timeout-s", str(IDLE_TIMEOUT_S),
                                                      "--model-factory", "tests.service_models:target"],
                                   logs / "target.log")
    try:
        address = target.wait_ready(120)
        draft = ServiceProcess.module("draft_service", ["--target-address", address, "--deadline-s", str(DEADLINE_S),
                                                        "--model-factory", "tests.service_models:draft"],
                                      logs / "draft.log")
        try:
            draft.wait_ready(120)
            yield target, draft
        finally:
            draft.stop()
    finally:
        target.stop()


@pytest.fixture(scope="module")
def stubs(services):
    with grpc.insecure_channel(services[0].address) as t, grpc.insecure_channel(services[1].address) as d:
        yield target_pb2_grpc.TargetVerificationStub(t), generation_pb2_grpc.DraftWorkerStub(d)


def long_request() -> generation_pb2.WorkerGenerateRequest:
    """Far more tokens than the tests wait for (the context limit is 256)."""
    return generation_pb2.WorkerGenerateRequest(request=generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=[1, 2, 3]), max_new_tokens=240, method="autoregressive",
        sampling=sampling_pb2.SamplingParams(temperature=1.0, seed=0)))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def open_sessions(target) -> int:
    return target.Stats(target_pb2.TargetStatsRequest(), timeout=5).open_sessions


def active_sessions(worker) -> int:
    return worker.Stats(generation_pb2.WorkerStatsRequest(), timeout=5).active_sessions


def test_a_stalled_target_ends_the_call_with_deadline_exceeded_in_time(services, stubs):
    target_process, _ = services
    target, worker = stubs
    wait_for(lambda: open_sessions(target) == 0, 10, "a clean target")
    stream = worker.Generate(long_request(), timeout=60)
    next(stream)  # the session runs
    evicted = target.Stats(target_pb2.TargetStatsRequest(), timeout=5).evicted_sessions
    target_process.signal(signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as error:
            for _ in stream:
                pass
        waited = time.monotonic() - stalled_at
    finally:
        target_process.signal(signal.SIGCONT)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.value.details()
    assert f"target {target_process.address} did not answer" in error.value.details()
    assert waited <= DEADLINE_S + 0.5, f"the call ended {waited:.2f} s after the stall"
    wait_for(lambda: active_sessions(worker) == 0, 5, "the worker to free the session")
    # The draft cancelled the stream of a session it opened non-resumable: once the target runs
    # again it sees the cancellation and closes the session, rather than keeping it to idle out.
    wait_for(lambda: open_sessions(target) == 0, IDLE_TIMEOUT_S / 2, "the target to close the session")
    assert target.Stats(target_pb2.TargetStatsRequest(), timeout=5).evicted_sessions == evicted


def test_a_client_cancelling_mid_stream_frees_the_session_on_draft_and_target(stubs):
    target, worker = stubs
    wait_for(lambda: open_sessions(target) == 0, IDLE_TIMEOUT_S + 5, "a clean target")
    started = worker.Stats(generation_pb2.WorkerStatsRequest(), timeout=5).started_sessions
    stream = worker.Generate(long_request(), timeout=60)
    next(stream)
    assert (open_sessions(target), active_sessions(worker)) == (1, 1)
    stream.cancel()
    cancelled_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        next(stream)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    # Freed by an explicit close, well before the idle timeout could have evicted it.
    wait_for(lambda: active_sessions(worker) == 0 and open_sessions(target) == 0, IDLE_TIMEOUT_S / 2,
             "both sides to free the session")
    assert time.monotonic() - cancelled_at < IDLE_TIMEOUT_S
    assert worker.Stats(generation_pb2.WorkerStatsRequest(), timeout=5).started_sessions == started + 1
