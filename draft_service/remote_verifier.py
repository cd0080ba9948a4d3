"""A dyspec TreeVerifier whose target is a remote TargetVerification.Session stream.

The stream lives on the event loop. `verify` is called by dyspec.decoding.speculative_round on a
draft thread: it hands the round trip to the loop and blocks that thread (never the loop) until
the verdict arrives or the round deadline passes. A deadline cancels the stream and raises
DEADLINE_EXCEEDED; target errors come back as ServiceError with the target's code and message.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from dyspec.overlap import FuturePending
from dyspec.tree import TokenTree
from dyspec.verify import Verdict
from dyspec.warp import SamplingParams
from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from serving.errors import ServiceError
from serving.wire import sampling_to_proto, tree_to_proto, verdict_from_proto


class RemoteVerifier:
    def __init__(self, channel: grpc.aio.Channel, round_deadline_s: float, call_timeout_s: float | None,
                 prefill_s_per_token: float = 0.0):
        self.stub = target_pb2_grpc.TargetVerificationStub(channel)
        self.round_deadline_s, self.call_timeout_s = round_deadline_s, call_timeout_s
        # The first round carries the prompt's prefill on the target: its deadline grows with the
        # prompt, so a long prompt on a slow machine is not cut off by a deadline sized for one round.
        self.prefill_s_per_token = prefill_s_per_token
        self.prompt_tokens = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.call = None
        self.opened: target_pb2.Opened | None = None
        self.round = 0
        self.last_forward_s = 0.0  # TreeVerifier: the target's forward time of the last round
        self.last_timings = target_pb2.VerifyTimings()
        self.last_wire_s = 0.0  # last call: building the request and checking the verdict

    async def open(self, session_id: str, model: str, prompt: list[int], sampling: SamplingParams,
                   seed: int) -> target_pb2.Opened:
        self.loop = asyncio.get_running_loop()
        self.prompt_tokens = len(prompt)
        self.call = self.stub.Session(timeout=self.call_timeout_s)
        request = target_pb2.OpenSession(session_id=session_id, model=model, prompt_token_ids=prompt,
                                         sampling=sampling_to_proto(sampling, seed))
        response = await self._exchange(target_pb2.TargetRequest(open=request), "open", "opened")
        self.opened = response.opened
        return self.opened

    def verify(self, tree: TokenTree) -> Verdict:
        """Send one round and wait for its verdict (draft thread side)."""
        return self.submit(tree).result()

    def submit(self, tree: TokenTree) -> FuturePending:
        """Send one round; the verdict is awaited on the loop while the draft thread goes on
        (dyspec.overlap). The round deadline runs from here."""
        self.round += 1
        round_index = self.round
        start = time.perf_counter()
        request = target_pb2.TargetRequest(tree=tree_to_proto(tree, round_index))
        wire_s = time.perf_counter() - start
        deadline_s = self.round_deadline_s + (self.prefill_s_per_token * self.prompt_tokens if round_index == 1 else 0.0)
        future = asyncio.run_coroutine_threadsafe(
            self._exchange(request, f"round {round_index}", "verdict", deadline_s), self.loop)
        return FuturePending(future, lambda response: self._verdict(response.verdict, tree, round_index, wire_s))

    def _verdict(self, msg: target_pb2.Verdict, tree: TokenTree, round_index: int, wire_s: float) -> Verdict:
        start = time.perf_counter()
        try:
            if msg.round != round_index:
                raise ValueError(f"verdict for round {msg.round}, expected {round_index}")
            verdict = verdict_from_proto(msg, tree, self.opened.vocab_size)
        except ValueError as exc:
            self.loop.call_soon_threadsafe(self.call.cancel)
            raise ServiceError(grpc.StatusCode.INTERNAL, f"target sent an invalid verdict: {exc}") from None
        self.last_timings = msg.timings
        self.last_forward_s = msg.timings.forward_ns / 1e9
        self.last_wire_s = wire_s + time.perf_counter() - start
        return verdict

    def first_round_deadline_s(self) -> float:
        return self.round_deadline_s + self.prefill_s_per_token * self.prompt_tokens

    async def _exchange(self, request: target_pb2.TargetRequest, what: str, expect: str,
                        deadline_s: float | None = None) -> target_pb2.TargetResponse:
        deadline_s = self.round_deadline_s if deadline_s is None else deadline_s
        try:
            response = await asyncio.wait_for(self._write_read(request), deadline_s)
        except asyncio.TimeoutError:
            self.call.cancel()
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"target did not answer {what} within {deadline_s:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise ServiceError(exc.code(), f"target: {exc.details()}") from None
        if response.WhichOneof("kind") != expect:
            self.call.cancel()
            raise ServiceError(grpc.StatusCode.INTERNAL, f"target answered {what} with {response.WhichOneof('kind')}")
        return response

    async def _write_read(self, request: target_pb2.TargetRequest) -> target_pb2.TargetResponse:
        await self.call.write(request)
        response = await self.call.read()
        if response is grpc.aio.EOF:
            code, details = await self.call.code(), await self.call.details()
            if code == grpc.StatusCode.OK:
                code, details = grpc.StatusCode.INTERNAL, "stream ended without an answer"
            raise ServiceError(code, f"target: {details}")
        return response

    async def close(self, timeout_s: float) -> None:
        """End the session on the target (frees its cache); cancels the stream if that fails."""
        if self.call is None or self.call.done():
            return
        try:
            await asyncio.wait_for(self._write_read(target_pb2.TargetRequest(close=target_pb2.CloseSession())),
                                   timeout_s)
            await self.call.done_writing()
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, ServiceError, grpc.aio.UsageError):
            pass
        finally:
            self.call.cancel()  # no-op once the target ended the stream
