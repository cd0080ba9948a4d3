"""How the draft worker's RemoteVerifier reports the way a target stream ended. The target's
refusals of a request (INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, ALREADY_EXISTS,
RESOURCE_EXHAUSTED) reach the caller with their own code; every failure of the target or the link
(its INTERNAL error, UNKNOWN, a transport error, a stream that ended without an answer) reaches it
as UNAVAILABLE naming the target, so the SDK and the orchestrator treat the target as unavailable.
An INTERNAL error keeps the target's own message."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from draft_service.remote_verifier import RemoteVerifier
from dyspec.tree import ROOT, TokenTree
from dyspec.warp import SamplingParams
from serving.errors import ServiceError
from target_service.config import TargetConfig
from tests.background_loop import BackgroundLoop
from tests.service_models import target as tiny_target
from tests.target_client import served_target

ADDRESS = "127.0.0.1:9"
PROMPT = [3, 1, 4, 1, 5]


class EndedCall:
    """A target stream that takes every request and ends with `code` instead of answering."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code_, self.details_ = code, details

    async def write(self, request):
        pass

    async def read(self):
        if self.code_ == grpc.StatusCode.OK:
            return grpc.aio.EOF
        raise grpc.aio.AioRpcError(self.code_, grpc.aio.Metadata(), grpc.aio.Metadata(), self.details_)

    async def code(self):
        return self.code_

    async def details(self):
        return self.details_

    def cancel(self):
        pass


def tree() -> TokenTree:
    t = TokenTree()
    t.add(ROOT, 3, 0.5)
    return t


@pytest.fixture(scope="module")
def loop():
    loop = BackgroundLoop()
    yield loop
    loop.close()


def round_error(loop: BackgroundLoop, call) -> ServiceError:
    """The ServiceError a round on `call` fails with, as the draft thread gets it."""
    async def channel():  # an aio channel belongs to the loop it is made on; nothing is sent on it
        return grpc.aio.insecure_channel(ADDRESS)

    verifier = RemoteVerifier(loop.run(channel()), 5.0, None, target_address=ADDRESS)
    verifier.loop, verifier.call = loop.loop, call
    with pytest.raises(ServiceError) as error:
        verifier.verify(tree())
    return error.value


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_targets_refusal_keeps_its_code_and_message(loop, code):
    error = round_error(loop, EndedCall(code, "the target says no"))
    assert (error.code, error.message) == (code, f"target {ADDRESS}: the target says no")


@pytest.mark.parametrize("code, expected", [
    (grpc.StatusCode.INTERNAL, f"target {ADDRESS} failed: INTERNAL: target error: RuntimeError: boom"),
    (grpc.StatusCode.UNKNOWN, f"target {ADDRESS} is unavailable (UNKNOWN: target error: RuntimeError: boom)"),
    (grpc.StatusCode.UNAVAILABLE, f"target {ADDRESS} is unavailable (UNAVAILABLE: target error: RuntimeError: boom)"),
    (grpc.StatusCode.OK, f"target {ADDRESS} ended the stream before answering round 1"),
])
def test_a_failure_of_the_target_or_its_link_is_unavailable_naming_it(loop, code, expected):
    error = round_error(loop, EndedCall(code, "target error: RuntimeError: boom"))
    assert error.code == grpc.StatusCode.UNAVAILABLE, (error.code, error.message)
    assert error.message.startswith(expected), error.message


def test_a_real_targets_internal_error_in_a_round_is_unavailable_with_its_message(loop):
    """Through a real target server: its model fails in round 1's forward, the target answers
    INTERNAL, and the worker's verifier reports UNAVAILABLE with the target's address and words."""
    model = tiny_target()
    broken = []

    def forward(module, args):
        if broken:
            raise RuntimeError("the model broke")

    model.register_forward_pre_hook(forward)
    config = TargetConfig(port=0, drain_grace_s=1, warmup=False, prefill_at_open=False)
    with served_target(config, model, "tiny") as (server, _):
        async def open_verifier():
            channel = grpc.aio.insecure_channel(server.address)
            verifier = RemoteVerifier(channel, 10.0, 30.0, target_address=server.address)
            await verifier.open("broken-round", "tiny", PROMPT, SamplingParams(0.0), 0)
            return verifier, channel

        verifier, channel = loop.run(open_verifier())
        try:
            broken.append(True)
            with pytest.raises(ServiceError) as error:
                verifier.verify(TokenTree())  # the root alone: a valid round, which only the forward fails
        finally:
            loop.run(channel.close())
    assert error.value.code == grpc.StatusCode.UNAVAILABLE, (error.value.code, error.value.message)
    assert error.value.message.startswith(f"target {server.address} failed: INTERNAL: "), error.value.message
    assert "RuntimeError: the model broke" in error.value.message, error.value.message
