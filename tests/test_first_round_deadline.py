"""Round 1 carries the target's prefill of the whole prompt: its deadline grows with the prompt
(DraftConfig.prefill_s_per_token), later rounds keep the plain round deadline."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from draft_service.remote_verifier import RemoteVerifier
from dyspec.tree import ROOT, TokenTree
from serving.errors import ServiceError
from tests.background_loop import BackgroundLoop

ROUND_DEADLINE_S = 0.3
PER_TOKEN_S = 0.01
PROMPT_TOKENS = 40  # round 1 may take 0.3 + 0.4 s


class SilentCall:
    """A target stream that takes every request and never answers."""

    def __init__(self):
        self.cancelled = False

    async def write(self, request):
        pass

    async def read(self):
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


def tree() -> TokenTree:
    t = TokenTree()
    t.add(ROOT, 3, 0.5)
    return t


@pytest.mark.parametrize("round_index, expected_s", [(1, ROUND_DEADLINE_S + PER_TOKEN_S * PROMPT_TOKENS),
                                                     (2, ROUND_DEADLINE_S)])
def test_the_first_round_deadline_covers_the_prefill(round_index, expected_s):
    loop = BackgroundLoop()
    try:
        async def channel():  # an aio channel belongs to the loop it is made on; nothing is sent on it
            return grpc.aio.insecure_channel("127.0.0.1:9")

        verifier = RemoteVerifier(loop.run(channel()), ROUND_DEADLINE_S, None, prefill_s_per_token=PER_TOKEN_S,
                                  target_address="127.0.0.1:9")
        verifier.loop, verifier.call, verifier.prompt_tokens = loop.loop, SilentCall(), PROMPT_TOKENS
        verifier.round = round_index - 1
        start = time.monotonic()
        with pytest.raises(ServiceError) as error:
            verifier.submit(tree()).result()
        waited = time.monotonic() - start
        assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"target 127.0.0.1:9 did not answer round {round_index} within {expected_s:g} s" in error.value.message
        assert expected_s - 0.05 <= waited <= expected_s + 0.5, waited
        assert verifier.call.cancelled
        assert verifier.first_round_deadline_s() == pytest.approx(ROUND_DEADLINE_S + PER_TOKEN_S * PROMPT_TOKENS)
    finally:
        loop.close()
