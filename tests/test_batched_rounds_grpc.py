"""Deadlines inside a batch, on a real target server in-process (loopback gRPC) whose forwards are
slow: a round whose stream's deadline passes while it queues is skipped, one whose deadline passes
during the batched forward still commits for the batch, and either way its batch-mates get exactly
the verdicts they get alone, and the expired sessions are closed."""
from __future__ import annotations

import random
import time

import grpc
import pytest

from dyspec.coins import VERIFY_STREAM, TorchCoins, stream_seed
from dyspec.decoding import LocalVerifier
from dyspec.hf_runner import HFTargetSession
from dyspec.warp import SamplingParams
from engine.prepack import prepack_linears
from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from serving.wire import tree_from_proto
from target_service.config import TargetConfig
from tests.service_models import slow_target, target as tiny_target
from tests.target_client import SessionStream, open_request, served_target
from tests.target_fuzz_cases import Limits, valid_tree

FORWARD_S = 0.8  # every forward sleeps this long first: the queue and the batch are long enough to aim at
VOCAB, MAX_NODES = 64, 8
PROMPTS = {"x": [1, 2, 3], "a": [4, 5], "b": [6, 7, 8, 9], "c": [10], "d": [11, 12]}
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def served():
    model = slow_target(forward_s=FORWARD_S)
    prepack_linears(model, "packed")
    # no prefill forwards at open: the queue is timed in slow forwards, one per batch of rounds
    config = TargetConfig(port=0, max_tree_nodes=MAX_NODES, drain_grace_s=1, warmup=False, prefill_at_open=False)
    with served_target(config, model) as served:
        yield served


def stats(channel) -> target_pb2.TargetStatsResponse:
    return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)


def alone(tree: target_pb2.Tree, prompt: list[int], seed: int) -> tuple[list[int], int]:
    verifier = LocalVerifier(HFTargetSession(packed_reference(), prompt), SamplingParams(1.0),
                             TorchCoins(stream_seed(seed, VERIFY_STREAM)))
    verdict = verifier.verify(tree_from_proto(tree))
    return verdict.accepted, verdict.next_token


_REFERENCE = []


def packed_reference():
    if not _REFERENCE:
        model = tiny_target()
        prepack_linears(model, "packed")
        _REFERENCE.append(model)
    return _REFERENCE[0]


def test_deadlines_that_pass_in_the_queue_or_in_the_forward_never_fail_the_batch_mates(served):
    server, channel = served
    rng = random.Random(3)
    trees = {name: valid_tree(rng, Limits(VOCAB, MAX_NODES, 256, "tiny"), nodes=5) for name in PROMPTS}
    seeds = {name: 40 + i for i, name in enumerate(PROMPTS)}
    streams = {}
    for name in ("x", "b", "c"):
        streams[name] = SessionStream(channel, timeout=60)
    before = stats(channel)
    for name in ("x", "b", "c"):
        streams[name].send(open_request(f"{name}-{time.monotonic_ns()}", PROMPTS[name], temperature=1.0,
                                        seed=seeds[name]))
    started = time.monotonic()
    streams["a"] = SessionStream(channel, timeout=0.5)  # its deadline passes while its round queues behind x's
    streams["d"] = SessionStream(channel, timeout=1.3)  # its deadline passes during the batched forward
    for name in ("a", "d"):
        streams[name].send(open_request(f"{name}-{time.monotonic_ns()}", PROMPTS[name], temperature=1.0,
                                        seed=seeds[name]))
    request = {name: target_pb2.TargetRequest(tree=tree) for name, tree in trees.items()}
    streams["x"].post(request["x"])  # the model thread is busy with x's round for FORWARD_S
    time.sleep(0.1)  # x's forward has started: the others queue behind it
    for name in ("a", "b", "c", "d"):
        streams[name].post(request[name])
    assert time.monotonic() - started < 0.4, "the test's timing plan holds (rounds posted before a's deadline)"

    answers = {}
    for name in ("x", "a", "b", "c", "d"):
        try:
            answers[name] = next(streams[name].call).verdict
        except grpc.RpcError as error:
            answers[name] = error.code()
    assert answers["a"] == Code.DEADLINE_EXCEEDED and answers["d"] == Code.DEADLINE_EXCEEDED, answers
    for name in ("x", "b", "c"):
        verdict = answers[name]
        assert (list(verdict.accepted_node_indices), verdict.next_token_id) == alone(trees[name], PROMPTS[name],
                                                                                      seeds[name]), name
    assert answers["x"].timings.batch_sessions == 1
    assert answers["b"].timings.batch_sessions == answers["c"].timings.batch_sessions == 3, \
        "b, c and d shared a forward; a, expired in the queue, was skipped"
    assert answers["b"].timings.queue_ns > 0.5 * FORWARD_S * 1e9, "the queue wait is reported as such"

    deadline = time.monotonic() + 3
    while stats(channel).open_sessions != before.open_sessions + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = stats(channel)
    assert after.open_sessions == before.open_sessions + 3, "a and d were closed with their streams"
    assert after.rounds_verified == before.rounds_verified + 4, "x, then b, c and d (d's round ran for the batch)"
    assert after.forwards == before.forwards + 2 and after.batched_rounds == before.batched_rounds + 3
    for name in ("x", "b", "c"):
        streams[name].half_close()
