"""The target service in-process on a loopback port: every bad input gets its status code and a
message before any model call, the server keeps serving, and other sessions are unaffected."""
from __future__ import annotations

import math
import socket
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dyspec.decoding import LocalVerifier
from dyspec.coins import VERIFY_STREAM, TorchCoins, stream_seed
from dyspec.hf_runner import HFTargetSession
from dyspec.tree import ROOT, SparseDist, TokenTree
from dyspec.warp import SamplingParams
from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from serving.wire import tree_to_proto
from target_service.config import TargetConfig
from target_service.server import TargetServer
from tests.background_loop import BackgroundLoop
from tests.target_client import SessionStream, open_request
from tests.tiny_models import tiny_llama

VOCAB, MAX_NODES, MAX_CONTEXT = 64, 8, 32
PROMPT = [1, 2, 3]
Code = grpc.StatusCode


def small_tree() -> TokenTree:
    """root -> 5 -> 9, plus sibling 7 of 5; drawn without replacement."""
    tree = TokenTree()
    a = tree.add(ROOT, 5, 0.6)
    tree.add(ROOT, 7, 0.3)
    tree.add(a, 9, 0.5)
    tree.q = {ROOT: SparseDist(torch.tensor([5, 7, 11]), torch.tensor([0.6, 0.3, 0.1])),
              a: SparseDist(torch.tensor([9, 4]), torch.tensor([0.5, 0.5]))}
    return tree


def wire_tree(round_number: int = 1, tree: TokenTree | None = None) -> target_pb2.TargetRequest:
    return target_pb2.TargetRequest(tree=tree_to_proto(small_tree() if tree is None else tree, round_number))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def loop():
    background = BackgroundLoop()
    yield background
    background.close()


def start_server(loop: BackgroundLoop, model, **limits) -> TargetServer:
    config = TargetConfig(port=0, max_tree_nodes=MAX_NODES, max_context_tokens=MAX_CONTEXT, drain_grace_s=5, **limits)

    async def start():
        server = TargetServer(config, model, "tiny-llama")
        await server.start()
        return server

    return loop.run(start())


@pytest.fixture(scope="module")
def server(loop, model):
    server = start_server(loop, model)
    yield server
    loop.run(server.stop(grace_s=1))


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def stats(channel) -> target_pb2.TargetStatsResponse:
    return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)


def fresh(channel, name: str, prompt=PROMPT, resumable: bool = False, **sampling) -> SessionStream:
    stream = SessionStream(channel)
    opened = stream.send(open_request(f"{name}-{time.monotonic_ns()}", prompt, resumable=resumable, **sampling)).opened
    assert (opened.vocab_size, opened.max_tree_nodes, opened.max_context_tokens) == (VOCAB, MAX_NODES, MAX_CONTEXT)
    stream.session_id = opened.session_id
    return stream


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    for word in words:
        assert word in error.details(), error.details()


def reference_verdicts(model, trees: list[TokenTree], temperature: float, seed: int) -> list:
    """The same rounds verified in-process: what the service must answer."""
    verifier = LocalVerifier(HFTargetSession(model, PROMPT), SamplingParams(temperature),
                             TorchCoins(stream_seed(seed, VERIFY_STREAM)))
    return [verifier.verify(tree) for tree in trees]


def malformed(mutate) -> target_pb2.TargetRequest:
    request = wire_tree()
    mutate(request.tree)
    return request


MALFORMED = {
    "parent after child": (lambda t: t.parent_indices.__setitem__(0, 2), "parent"),
    "token outside vocabulary": (lambda t: t.token_ids.__setitem__(1, VOCAB), "vocabulary"),
    "length mismatch": (lambda t: t.parent_indices.append(-1), "parent_indices"),
    "draw mode unset": (lambda t: t.ClearField("draw_mode"), "draw_mode"),
    "probabilities do not sum to 1": (lambda t: t.distributions[0].probs.__setitem__(0, 0.9), "sum"),
    "child outside its distribution": (lambda t: t.distributions[1].token_ids.__setitem__(0, 3), "zero draft probability"),
    "missing distribution": (lambda t: t.distributions.pop(), "no draft distribution"),
    "distribution on a leaf": (lambda t: t.distributions.add(node_index=1, token_ids=[3], probs=[1.0]), "no children"),
    "duplicate distribution": (lambda t: t.distributions.append(t.distributions[0]), "two distributions"),
    "ids and probs differ in length": (lambda t: t.distributions[0].probs.append(0.0), "probs"),
    "oversize": (lambda t: (t.token_ids.extend([1] * MAX_NODES), t.parent_indices.extend([2] * MAX_NODES)), "limit"),
}


def test_bad_requests_get_their_status_and_others_are_unaffected(model, server, channel):
    bystander = fresh(channel, "bystander", temperature=0.8, seed=11)
    trees = [small_tree(), small_tree()]
    expected = reference_verdicts(model, trees, temperature=0.8, seed=11)
    first = bystander.send(wire_tree(1, trees[0])).verdict
    assert (list(first.accepted_node_indices), first.next_token_id) == (expected[0].accepted, expected[0].next_token)

    for name, (mutate, word) in MALFORMED.items():
        error = fresh(channel, "malformed").expect_error(malformed(mutate))
        assert_status(error, Code.INVALID_ARGUMENT, word)

    full = fresh(channel, "full", prompt=list(range(MAX_CONTEXT - 2)))  # 30 committed + 3 nodes + 1 > 32
    assert_status(full.expect_error(wire_tree()), Code.INVALID_ARGUMENT, "context limit")
    assert_status(SessionStream(channel).expect_error(open_request("long", list(range(MAX_CONTEXT)))),
                  Code.INVALID_ARGUMENT, "context limit")
    bad_sampling = {"negative temperature": dict(temperature=-1.0), "NaN temperature": dict(temperature=math.nan),
                    "top_p above 1": dict(top_p=1.5), "negative top_k": dict(top_k=-1), "no seed": dict(seed=None)}
    for name, params in bad_sampling.items():
        error = SessionStream(channel).expect_error(open_request(f"bad-{name.replace(' ', '-')}", PROMPT, **params))
        assert_status(error, Code.INVALID_ARGUMENT, "sampling")
    assert_status(SessionStream(channel).expect_error(open_request("bad id!", PROMPT)), Code.INVALID_ARGUMENT, "session_id")
    assert_status(SessionStream(channel).expect_error(open_request("", [])), Code.INVALID_ARGUMENT)
    assert_status(SessionStream(channel).expect_error(open_request("oov", [VOCAB])), Code.INVALID_ARGUMENT, "vocabulary")
    assert_status(SessionStream(channel).expect_error(target_pb2.TargetRequest()), Code.INVALID_ARGUMENT, "empty")

    missing = target_pb2.TargetRequest(resume=target_pb2.ResumeSession(session_id="nobody"))
    assert_status(SessionStream(channel).expect_error(missing), Code.NOT_FOUND, "unknown")
    assert_status(SessionStream(channel).expect_error(wire_tree()), Code.FAILED_PRECONDITION, "open or resume")
    wrong_model = open_request("wrong-model", PROMPT)
    wrong_model.open.model = "llama-70b"
    assert_status(SessionStream(channel).expect_error(wrong_model), Code.FAILED_PRECONDITION, "tiny-llama")

    # Garbage: bytes that are no TargetRequest on a real call, and bytes that are no HTTP/2 at all.
    raw = channel.stream_stream("/dyspec.v1.TargetVerification/Session", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as garbage:
        list(raw(iter([b"\xff\xff\xff\x07garbage"]), timeout=5))
    assert_status(garbage.value, Code.INVALID_ARGUMENT, "not a dyspec.v1.TargetRequest")
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 8)
        sock.recv(1024)

    assert stats(channel).open_sessions == 1, "a session that ended in an error was not freed"
    second = bystander.send(wire_tree(2, trees[1])).verdict  # the bystander never noticed
    assert (list(second.accepted_node_indices), second.next_token_id) == (expected[1].accepted, expected[1].next_token)
    assert second.timings.tree_nodes == 3 and second.timings.forward_ns > 0
    assert second.timings.total_ns >= second.timings.forward_ns + second.timings.queue_ns
    assert bystander.send(target_pb2.TargetRequest(close=target_pb2.CloseSession())).closed.session_id


def test_rounds_are_numbered_replay_returns_the_cached_verdict(channel):
    stream = fresh(channel, "rounds")
    first = stream.send(wire_tree(1)).verdict
    replay = stream.send(wire_tree(1)).verdict
    assert replay.replayed and not first.replayed
    assert (replay.accepted_node_indices, replay.next_token_id, replay.timings) == (
        first.accepted_node_indices, first.next_token_id, first.timings)
    assert_status(stream.expect_error(wire_tree(3)), Code.FAILED_PRECONDITION, "expected round 2")

    conflicting = fresh(channel, "conflict")
    conflicting.send(wire_tree(1))
    other = small_tree()
    other.tokens[1] = 11  # same shape, a different drawn sibling
    assert_status(conflicting.expect_error(wire_tree(1, other)), Code.FAILED_PRECONDITION, "different tree")
    assert_status(fresh(channel, "zero").expect_error(wire_tree(0)), Code.FAILED_PRECONDITION, "expected round 1")


def wait_for_open_sessions(channel, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while stats(channel).open_sessions != count:
        assert time.monotonic() < deadline, f"open sessions stayed {stats(channel).open_sessions}, expected {count}"
        time.sleep(0.02)


def test_a_broken_stream_can_resume_and_replay(channel):
    before = stats(channel).open_sessions
    stream = fresh(channel, "resumable", resumable=True)
    first = stream.send(wire_tree(1)).verdict
    stream.cancel()  # as if the verdict was lost on the way: a resumable session stays for a resume
    resumed = SessionStream(channel)
    opened = resumed.send(target_pb2.TargetRequest(resume=target_pb2.ResumeSession(session_id=stream.session_id))).opened
    assert (opened.last_round, opened.committed_tokens) == (1, len(PROMPT) + len(first.accepted_node_indices) + 1)
    replay = resumed.send(wire_tree(1)).verdict
    assert replay.replayed and replay.next_token_id == first.next_token_id
    assert resumed.send(wire_tree(2)).verdict.round == 2
    resumed.half_close()  # a clean end without `close` frees the session too
    with pytest.raises(StopIteration):
        next(resumed.call)
    gone = SessionStream(channel).expect_error(
        target_pb2.TargetRequest(resume=target_pb2.ResumeSession(session_id=stream.session_id)))
    assert_status(gone, Code.NOT_FOUND, "closed")
    assert stats(channel).open_sessions == before


def test_a_session_not_opened_resumable_ends_with_its_stream(channel):
    before = stats(channel).open_sessions
    owned = fresh(channel, "owned")
    owned.send(wire_tree(1))
    taken = SessionStream(channel).expect_error(  # no other stream may take it over while it runs
        target_pb2.TargetRequest(resume=target_pb2.ResumeSession(session_id=owned.session_id)))
    assert_status(taken, Code.FAILED_PRECONDITION, "resumable")
    assert owned.send(wire_tree(2)).verdict.round == 2  # and the refused resume did not disturb it
    owned.cancel()  # a client that goes away: the session goes with it, no idle timeout needed
    wait_for_open_sessions(channel, before, timeout=2.0)
    gone = SessionStream(channel).expect_error(
        target_pb2.TargetRequest(resume=target_pb2.ResumeSession(session_id=owned.session_id)))
    assert_status(gone, Code.NOT_FOUND, "closed")


def test_session_and_token_limits_are_resource_exhausted(loop, model):
    server = start_server(loop, model, max_sessions=2, max_cached_tokens=20)
    try:
        with grpc.insecure_channel(server.address) as channel:
            first, second = fresh(channel, "a"), fresh(channel, "b")
            error = SessionStream(channel).expect_error(open_request("c", PROMPT))
            assert_status(error, Code.RESOURCE_EXHAUSTED, "session limit")
            first.send(target_pb2.TargetRequest(close=target_pb2.CloseSession()))
            big = SessionStream(channel).expect_error(open_request("big", list(range(18))))  # 3 + 18 > 20
            assert_status(big, Code.RESOURCE_EXHAUSTED, "cached-token limit")
            third = fresh(channel, "c", prompt=list(range(14)))  # 3 + 14 = 17 cached tokens
            assert_status(third.expect_error(wire_tree(1)), Code.RESOURCE_EXHAUSTED, "cached-token limit")  # 17 + 3 + 1
            assert second.send(wire_tree(1, TokenTree())).verdict.round == 1
            assert (stats(channel).open_sessions, stats(channel).cached_tokens) == (1, 4)  # the error closed c
    finally:
        loop.run(server.stop(grace_s=1))


def test_idle_sessions_are_evicted_with_a_clear_status(loop, model):
    server = start_server(loop, model, idle_timeout_s=0.4)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stream = fresh(channel, "idle")
            time.sleep(1.5)  # eviction runs every idle_timeout / 4
            assert_status(stream.expect_error(wire_tree(1)), Code.NOT_FOUND, "evicted")
            assert stats(channel).evicted_sessions == 1 and stats(channel).open_sessions == 0
    finally:
        loop.run(server.stop(grace_s=1))


def test_drain_refuses_new_sessions_and_lets_open_ones_finish(loop, model):
    server = start_server(loop, model)
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        running = fresh(channel, "running")
        drained = __import__("asyncio").run_coroutine_threadsafe(server.stop(grace_s=10), loop.loop)
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.05)
        assert_status(SessionStream(channel).expect_error(open_request("late", PROMPT)), Code.UNAVAILABLE, "draining")
        assert stats(channel).draining
        assert running.send(wire_tree(1)).verdict.round == 1  # in-flight sessions keep going
        assert not drained.done()
        running.send(target_pb2.TargetRequest(close=target_pb2.CloseSession()))
        drained.result(timeout=10)  # the last session ended: the server stops well before the grace period
