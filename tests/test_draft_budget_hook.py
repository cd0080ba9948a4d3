"""The draft worker's budget hook, in-process on loopback: the policy sees every finished round
with the target's timings, its answer is capped by the target's limits, and the output stays the
target's greedy output whatever budgets it picks."""
from __future__ import annotations

from contextlib import contextmanager

import grpc
import pytest

from draft_service.budget import RoundRecord
from draft_service.config import DraftConfig
from draft_service.server import DraftServer
from dyspec import generate
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from serving.text import TextStream
from target_service.config import TargetConfig
from target_service.server import TargetServer
from tests import service_models
from tests.background_loop import BackgroundLoop
from tests.worker_responses import streamed_tokens

PROMPT = [2, 7, 1, 8]
MAX_TREE_NODES = 6


class RecordingPolicy:
    """Budgets 1, 20, 3, 20, ...; remembers what it was shown."""

    def __init__(self):
        self.seen: list[list[RoundRecord]] = []
        self.closed = 0

    def __call__(self, history):
        assert not self.closed, "asked for a budget after the session ended"
        self.seen.append(list(history))
        return (1, 20, 3)[len(history) % 3]

    def close(self):  # the optional end hook: called once, when the session ends
        self.closed += 1


@pytest.fixture(scope="module")
def models():
    return service_models.target(), service_models.draft()


@contextmanager
def running_services(models, budget_policy):
    """A tiny target and a draft worker asking `budget_policy`, on loopback; yields the worker's
    address and stops both on exit."""
    loop = BackgroundLoop()

    async def start():
        target = TargetServer(TargetConfig(port=0, max_tree_nodes=MAX_TREE_NODES), models[0], "tiny")
        await target.start()
        draft = DraftServer(DraftConfig(target_address=target.address, port=0), models[1], budget_policy=budget_policy)
        await draft.start()
        return target, draft

    target, draft = loop.run(start())
    try:
        yield draft.address
    finally:
        loop.run(draft.stop(grace_s=1))
        loop.run(target.stop(grace_s=1))
        loop.close()


def generate_through(channel, max_new_tokens: int, budget: int = 0) -> list:
    """The worker's responses to one dyspec request for PROMPT (budget 0: the worker's policy decides)."""
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=PROMPT),
                                             max_new_tokens=max_new_tokens, method="dyspec", budget=budget)
    return list(generation_pb2_grpc.DraftWorkerStub(channel).Generate(
        generation_pb2.WorkerGenerateRequest(request=request), timeout=60))



def test_budget_policy_sees_each_round_and_is_capped(models):
    policy = RecordingPolicy()
    with running_services(models, lambda sampling, shape: policy) as address, grpc.insecure_channel(address) as channel:
        responses = generate_through(channel, 20)
    assert streamed_tokens(responses) == generate(*models, PROMPT, max_new_tokens=20, method="autoregressive").tokens
    assert policy.closed == 1
    steps = responses[-1].summary.stats.steps
    # Overlapped rounds ask for round k's budget once round k-1 is sent (from rounds <= k-2), and
    # once more after the last round is sent (for a round the stop rule then never starts)
    assert [len(h) for h in policy.seen] == [0] + list(range(steps))
    final = policy.seen[-1]
    assert [r.budget for r in final] == [min((1, 20, 3)[max(0, i - 1) % 3], MAX_TREE_NODES)
                                         for i in range(len(final))]
    for record in final:
        assert len(record.result.tree) <= record.budget
        assert record.target_total_s >= record.target_forward_s > 0 and record.network_s >= 0
        assert record.round_s >= record.result.stats.verify_s and record.wire_s > 0


class BytewiseTokenizer:
    """Token i is byte i: multi-byte characters span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_deltas_hold_back_incomplete_characters():
    stream = TextStream(BytewiseTokenizer())
    euro = list("€".encode())  # three bytes
    assert stream.push([ord("a")]) == "a"
    assert stream.push(euro[:2]) == ""
    assert stream.push(euro[2:] + [ord("b")]) == "€b"
    assert TextStream(None).push([1, 2]) == ""


class _BrokenPolicy:
    def __call__(self, history):
        raise ZeroDivisionError("the policy divided by zero")


def test_a_failing_budget_policy_is_an_internal_error_with_its_message(models):
    """A bug behind the worker (here its budget policy) reaches the caller as INTERNAL naming it, not
    as gRPC's UNKNOWN, and the worker serves the next request."""
    with running_services(models, lambda sampling, shape: _BrokenPolicy()) as address, \
            grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            generate_through(channel, 5)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "ZeroDivisionError" in failed.value.details() and "divided by zero" in failed.value.details()
        responses = generate_through(channel, 5, budget=4)  # a request's own budget skips the policy
        assert responses[-1].HasField("summary")
        stats = generation_pb2_grpc.DraftWorkerStub(channel).Stats(generation_pb2.WorkerStatsRequest(), timeout=5)
        assert stats.active_sessions == 0


def test_a_policy_of_the_sampling_parameters_alone_still_serves(models):
    """The seam once passed the sampling parameters only: such a policy is adapted when the worker is
    built (not an INTERNAL error on every request), and a callable of neither form is refused there."""
    policy = RecordingPolicy()
    asked = []

    def sampling_only(sampling):
        asked.append(sampling)
        return policy

    with running_services(models, sampling_only) as address, grpc.insecure_channel(address) as channel:
        responses = generate_through(channel, 6)
    assert streamed_tokens(responses) == generate(*models, PROMPT, max_new_tokens=6, method="autoregressive").tokens
    assert len(asked) == 1 and asked[0].temperature == 0 and policy.seen and policy.closed == 1
    with pytest.raises(TypeError, match=r"policy\(sampling, shape\)"):
        DraftServer(DraftConfig(target_address="127.0.0.1:1", port=0), models[1],
                    budget_policy=lambda sampling, shape, extra: policy)
