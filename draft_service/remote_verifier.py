"""A dyspec TreeVerifier whose target is a remote TargetVerification.Session stream.

The stream lives on the event loop. `verify` is called by dyspec.decoding.speculative_round on a
draft thread: it hands the round trip to the loop and blocks that thread (never the loop) until
the verdict arrives or the round deadline passes. A deadline cancels the stream and raises
DEADLINE_EXCEEDED; the target's answers to a bad request come back as ServiceError with the
target's code and message. Every way the stream can fail (the target dying or failing internally,
the connection dropping, a link the network cut off, a stream that ended or was cancelled) reaches
the draft thread as a ServiceError naming the target's address, UNAVAILABLE unless the target
itself refused the request, never as a gRPC usage error.

A link that stops carrying bytes is found by the channel's keepalive (serving.grpc_server.
target_link_options), which fails the stream as UNAVAILABLE within seconds. A target whose process
is alive but whose model thread hangs still answers those pings: its round ends at the round
deadline as DEADLINE_EXCEEDED, which is right, since the target is there but did not answer in time.

Sessions are opened non-resumable (this worker never resumes): cancelling the stream ends the
target session right after the round the target is running, so `cancel` is how a caller that
left mid-round frees the target at once.
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

# Statuses the target answers a request with (target.proto), passed through unchanged, as is the
# stream's own deadline. Anything else (a stream that ended or was dropped without an answer,
# UNKNOWN, a transport error, a keepalive timeout, a draining target, the target's own INTERNAL
# error) means the target or the link failed, which callers (SDK, orchestrator) must see as
# UNAVAILABLE: a request another target (or this one, restarted) may well serve.
_TARGET_ANSWERS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
})


class RemoteVerifier:
    def __init__(self, channel: grpc.aio.Channel, round_deadline_s: float, call_timeout_s: float | None,
                 prefill_s_per_token: float = 0.0, *, target_address: str):
        self.stub = target_pb2_grpc.TargetVerificationStub(channel)
        self.target_address = target_address  # named in every error, so a caller knows which target failed
        self.round_deadline_s, self.call_timeout_s = round_deadline_s, call_timeout_s
        # The first round carries the prompt's prefill on the target: its deadline grows with the
        # prompt, so a long prompt on a slow machine is not cut off by a deadline sized for one round.
        self.prefill_s_per_token = prefill_s_per_token
        self.prompt_tokens = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.call = None
        self.cancelled = False  # this side cancelled the stream (cancel, a deadline, a bad answer)
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
                                         sampling=sampling_to_proto(sampling, seed), resumable=False)
        response = await self._exchange(target_pb2.TargetRequest(open=request), "open", "opened")
        self.opened = response.opened
        return self.opened

    def verify(self, tree: TokenTree) -> Verdict:
        """Send one round and wait for its verdict (draft thread side)."""
        return self.submit(tree).result()

    def submit(self, tree: TokenTree) -> FuturePending:
        """Send one round; the verdict is awaited on the loop while the draft thread goes on
        (dyspec.overlap). The round deadline runs from here. The future fails only with ServiceError."""
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
            self.loop.call_soon_threadsafe(self._cancel)
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               f"target {self.target_address} sent an invalid verdict: {exc}") from None
        self.last_timings = msg.timings
        self.last_forward_s = msg.timings.forward_ns / 1e9
        self.last_wire_s = wire_s + time.perf_counter() - start
        return verdict

    def first_round_deadline_s(self) -> float:
        return self.round_deadline_s + self.prefill_s_per_token * self.prompt_tokens

    def _cancel(self) -> None:
        self.cancelled = True
        self.call.cancel()

    def cancel(self) -> None:
        """Loop side: drop the stream now. The target ends the session after the round it is
        running; a round awaited here fails at once (CANCELLED), instead of at its deadline."""
        if self.call is not None:
            self._cancel()

    async def _exchange(self, request: target_pb2.TargetRequest, what: str, expect: str,
                        deadline_s: float | None = None) -> target_pb2.TargetResponse:
        deadline_s = self.round_deadline_s if deadline_s is None else deadline_s
        try:
            response = await asyncio.wait_for(self._write_read(request, what), deadline_s)
        except asyncio.TimeoutError:  # the link answers pings (keepalive finds a dead one first): a hung target
            self._cancel()
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"target {self.target_address} did not answer {what} within {deadline_s:g} s") from None
        except asyncio.CancelledError:
            # A read on a stream cancelled here raises CancelledError too; only a cancellation of this
            # task itself (its caller went away) is one: anything else is this stream's failure.
            if asyncio.current_task().cancelling() or not self.cancelled:
                raise
            raise self._stream_failed(grpc.StatusCode.CANCELLED, None, what) from None
        if response.WhichOneof("kind") != expect:
            self._cancel()
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               f"target {self.target_address} answered {what} with {response.WhichOneof('kind')}")
        return response

    async def _write_read(self, request: target_pb2.TargetRequest, what: str) -> target_pb2.TargetResponse:
        try:
            await self.call.write(request)
            response = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._stream_failed(exc.code(), exc.details(), what) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            # Writing to a stream that already ended (the target died between rounds): its status says why.
            raise self._stream_failed(await self.call.code(), await self.call.details(), what) from None
        if response is grpc.aio.EOF:
            raise self._stream_failed(await self.call.code(), await self.call.details(), what)
        return response

    def _stream_failed(self, code: grpc.StatusCode, details: str | None, what: str) -> ServiceError:
        """The ServiceError for a stream that ended with `code` instead of answering `what`."""
        if self.cancelled:  # this side dropped the stream (and already reported why, if it was an error)
            return ServiceError(grpc.StatusCode.CANCELLED,
                                f"the stream to target {self.target_address} was cancelled before it answered {what}")
        if code in _TARGET_ANSWERS:
            return ServiceError(code, f"target {self.target_address}: {details}")
        if code == grpc.StatusCode.INTERNAL:  # the target failed on a request it took: keep its own words
            return ServiceError(grpc.StatusCode.UNAVAILABLE,
                                f"target {self.target_address} failed: INTERNAL: {details} (while answering {what})")
        why = "ended the stream" if code == grpc.StatusCode.OK else f"is unavailable ({code.name}: {details})"
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"target {self.target_address} {why} before answering {what}")

    async def close(self, timeout_s: float) -> None:
        """End the session on the target (frees its cache); cancels the stream if that fails.
        Either way the target frees the session: it was opened non-resumable."""
        if self.call is None or self.call.done():
            return
        try:
            await asyncio.wait_for(self._write_read(target_pb2.TargetRequest(close=target_pb2.CloseSession()),
                                                    "close"), timeout_s)
            await self.call.done_writing()
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, ServiceError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass
        finally:
            self.call.cancel()  # no-op once the target ended the stream
