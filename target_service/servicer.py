"""gRPC servicer of dyspec.v1.TargetVerification: translates the stream into engine calls.

Every engine call runs on the single model thread (`executor`), so the event loop stays free for
health checks, other streams and deadlines while a forward runs. A call whose client goes away
mid-round still finishes its round on the model thread, so session state never tears.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError

from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from serving.errors import ServiceError
from serving.grpc_server import ActiveCalls
from target_service.engine import VerificationEngine

log = logging.getLogger(__name__)


async def _read(context: grpc.aio.ServicerContext):
    try:
        return await context.read()
    except DecodeError as exc:  # otherwise it surfaces as UNKNOWN "unexpected error"
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a dyspec.v1.TargetRequest: {exc}") from None


class TargetServicer(target_pb2_grpc.TargetVerificationServicer):
    def __init__(self, engine: VerificationEngine, executor: ThreadPoolExecutor, calls: ActiveCalls, tp_size: int = 1):
        self.engine, self.executor, self.calls, self.tp_size = engine, executor, calls, tp_size

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def Session(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # context.read()/write() rather than iterating and yielding: on cancellation the CancelledError
        # lands here, so the bookkeeping below runs at once, not whenever the generator is collected.
        with self.calls.track():
            bound: str | None = None  # the session this stream is attached to
            try:
                while (request := await _read(context)) is not grpc.aio.EOF:
                    received_ns = time.perf_counter_ns()
                    kind = request.WhichOneof("kind")
                    if kind in ("open", "resume"):
                        if bound is not None:
                            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                               f"this stream is already attached to session {bound!r}")
                        if self.calls.draining:
                            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "target is draining; no new sessions")
                        if kind == "open":
                            opened = await self._run(self.engine.open, request.open)
                        else:
                            opened = await self._run(self.engine.resume, request.resume.session_id)
                        bound = opened.session_id
                        await context.write(target_pb2.TargetResponse(opened=opened))
                    elif kind == "tree":
                        if bound is None:
                            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                               "send open or resume before the first tree")
                        verdict = await self._run(self.engine.verify, bound, request.tree, received_ns)
                        await context.write(target_pb2.TargetResponse(verdict=verdict))
                    elif kind == "close":
                        if bound is not None:
                            await self._run(self.engine.close, bound)
                        await context.write(target_pb2.TargetResponse(closed=target_pb2.Closed(session_id=bound or "")))
                        return
                    else:
                        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                           "empty request: set open, resume, tree or close")
                # A clean half-close without `close` means the client is done. A cancelled stream can
                # also surface as EOF here; give the cancellation a moment to register so a broken
                # stream keeps its session for a resume instead of being closed as finished.
                await asyncio.sleep(0.05)
                if bound is not None and not context.cancelled():
                    await self._run(self.engine.close, bound)
            except ServiceError as exc:
                log.info("session %s: %s", bound, exc)
                if bound is not None:  # an error ends the session too: only a broken stream may resume
                    await self._run(self.engine.close, bound)
                await context.abort(exc.code, exc.message)

    async def Stats(self, request, context) -> target_pb2.TargetStatsResponse:
        store = self.engine.store  # plain int reads: no need to queue behind the model thread
        return target_pb2.TargetStatsResponse(
            open_sessions=len(store), cached_tokens=store.cached_tokens, max_sessions=store.max_sessions,
            max_cached_tokens=store.max_cached_tokens, rounds_verified=self.engine.rounds_verified,
            evicted_sessions=store.evicted_total, draining=self.calls.draining, tp_size=self.tp_size)
