"""Cancellation while the target is busy, across processes: a target whose rounds are slow, a
draft worker and an orchestrator, reached through the client SDK.

Clients that leave right after their first chunk free the target's sessions within 2 s, while
rounds are still running for them (the worker cancels its target stream, and the target closes a
session opened non-resumable right after the round running on its model thread). A session opened
`resumable` is the exception: the same mid-round cancel keeps it for a resume, with the round that
was running committed."""
from __future__ import annotations

import time

import grpc
import pytest

from orchestrator.sdk import Client
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, target_pb2, target_pb2_grpc
from tests.service_process import ServiceProcess
from tests.target_client import SessionStream, open_request

FORWARD_S = 0.5  # every target forward takes this much longer: each round is mid-flight for a while
FREED_WITHIN_S = 2.0
PROMPT = [3, 1, 4, 1, 5]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(target, worker, orchestrator) processes."""
    logs = tmp_path_factory.mktemp("logs")
    started = []
    try:
        target = ServiceProcess.module("target_service", [
            # no prefill forwards at open: each slow forward here is a round, timed against the cancels
            "--no-warmup", "--no-prefill-at-open", "--model-factory", "tests.service_models:slow_target",
            "--model-kwargs", f'{{"forward_s": {FORWARD_S}}}'], logs / "target.log")
        started.append(target)
        target.wait_ready(120)
        worker = ServiceProcess.module("draft_service", [
            "--no-warmup", "--target-address", target.address, "--budget", "4",
            "--model-factory", "tests.service_models:draft"], logs / "worker.log")
        started.append(worker)
        worker.wait_ready(120)
        front = ServiceProcess.module("orchestrator", ["--worker", worker.address, "--http-port", "0",
                                                       "--health-interval-s", "0.5"], logs / "orchestrator.log")
        started.append(front)
        front.wait_ready(60)
        yield target, worker, front
    finally:
        for process in reversed(started):
            process.stop()


@pytest.fixture(scope="module")
def target(stack):
    with grpc.insecure_channel(stack[0].address) as channel:
        yield channel


def target_stats(channel) -> target_pb2.TargetStatsResponse:
    return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)


def worker_active(worker) -> int:
    with grpc.insecure_channel(worker.address) as channel:
        return generation_pb2_grpc.DraftWorkerStub(channel).Stats(generation_pb2.WorkerStatsRequest(),
                                                                  timeout=5).active_sessions


def seconds_until(condition, timeout: float) -> float:
    """Seconds until `condition()` holds, polled every 20 ms; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout + 5, "condition never held"
        time.sleep(0.02)
    return time.monotonic() - start


def test_clients_cancelling_after_their_first_chunk_free_the_target_within_2_s(stack, target):
    assert target_stats(target).open_sessions == 0
    with Client(stack[2].address, timeout=120) as client:
        streams = [client.stream(PROMPT, max_new_tokens=200, temperature=1.0, seed=seed, ignore_eos=True)
                   for seed in range(3)]
        for stream in streams:
            assert next(stream).token_ids  # the session runs, and its next round is on the way
        busy = target_stats(target)
        assert busy.open_sessions == 3
        for stream in streams:
            stream.close()  # the SDK cancels the call: the client is gone
        freed_s = seconds_until(lambda: target_stats(target).open_sessions == 0, FREED_WITHIN_S)
    after = target_stats(target)
    assert freed_s < FREED_WITHIN_S, f"the target held sessions {freed_s:.2f} s after the cancels"
    assert after.evicted_sessions == busy.evicted_sessions == 0, "freed by the idle timeout, not by the cancels"
    assert after.cached_tokens == 0
    assert seconds_until(lambda: worker_active(stack[1]) == 0, FREED_WITHIN_S) < FREED_WITHIN_S
    with Client(stack[2].address, timeout=120) as client:  # and the stack serves the next request
        assert len(client.generate(PROMPT, 3, ignore_eos=True).token_ids) == 3
    assert target_stats(target).open_sessions == 0


def test_a_mid_round_cancel_frees_a_plain_session_and_keeps_a_resumable_one(target):
    rounds = target_stats(target).rounds_verified
    kept = SessionStream(target)
    kept.send(open_request("kept", PROMPT, resumable=True))
    plain = SessionStream(target)
    plain.send(open_request("plain", PROMPT))
    tree = target_pb2.TargetRequest(tree=target_pb2.Tree(round=1, draw_mode=target_pb2.DRAW_MODE_DETERMINISTIC))
    kept.post(tree)
    time.sleep(FORWARD_S / 4)  # its round is running on the model thread now
    kept.cancel()  # the link breaks mid-round
    time.sleep(2 * FORWARD_S)  # well past that round
    assert target_stats(target).open_sessions == 2, "a resumable session went with its broken stream"

    plain.post(tree)
    time.sleep(FORWARD_S / 4)
    plain.cancel()
    freed_s = seconds_until(lambda: target_stats(target).open_sessions == 1, FREED_WITHIN_S)
    assert freed_s < FREED_WITHIN_S, f"the target held the plain session {freed_s:.2f} s after the cancel"
    stats = target_stats(target)
    assert stats.rounds_verified == rounds + 2, "both rounds that were running when their streams broke completed"
    time.sleep(FORWARD_S)
    assert target_stats(target).open_sessions == 1

    resumed = SessionStream(target)
    opened = resumed.send(target_pb2.TargetRequest(resume=target_pb2.ResumeSession(session_id="kept"))).opened
    assert (opened.last_round, opened.committed_tokens) == (1, len(PROMPT) + 1)  # the running round was committed
    assert resumed.send(tree).verdict.replayed
    assert resumed.send(target_pb2.TargetRequest(close=target_pb2.CloseSession())).closed.session_id == "kept"
    gone = SessionStream(target).expect_error(target_pb2.TargetRequest(resume=target_pb2.ResumeSession(session_id="plain")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "closed" in gone.details()
    assert target_stats(target).open_sessions == 0
