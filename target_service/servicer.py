"""gRPC servicer of dyspec.v1.TargetVerification: translates the stream into engine calls.

Every engine call runs on the single model thread (`executor`), so the event loop stays free for
health checks, other streams and deadlines while a forward runs. A call whose client goes away
mid-round still finishes its round on the model thread, so session state never tears; the session
is then closed right after that round (the close queues behind it on the same thread), unless it
was opened `resumable`, when it stays for a resume until the idle timeout.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError

from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from serving.errors import ServiceError
from serving.grpc_server import ActiveCalls
from target_service.batcher import RoundBatcher
from target_service.engine import VerificationEngine

log = logging.getLogger(__name__)


async def _read(context: grpc.aio.ServicerContext):
    try:
        return await context.read()
    except DecodeError as exc:  # otherwise it surfaces as UNKNOWN "unexpected error"
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a dyspec.v1.TargetRequest: {exc}") from None


class _Attachment:
    """The session one stream is attached to (or is opening), for the cleanup when it ends."""

    def __init__(self):
        self.session_id: str | None = None
        self.resumable = False
        self.opening: Future | None = None  # the open on the model thread, until its answer is back


class TargetServicer(target_pb2_grpc.TargetVerificationServicer):
    def __init__(self, engine: VerificationEngine, executor: ThreadPoolExecutor, calls: ActiveCalls,
                 batcher: RoundBatcher, tp_size: int = 1, prefill_at_open: bool = True):
        self.engine, self.executor, self.calls, self.tp_size = engine, executor, calls, tp_size
        self.prefill_at_open = prefill_at_open
        self.batcher = batcher  # rounds go through it: batched with other sessions' on the model thread

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _close(self, stream: _Attachment) -> str | None:
        """Close the stream's session (if any) on the model thread; returns its id. Shielded: a
        cancellation while the close waits behind a round must not drop it from the queue."""
        closing, stream.session_id = stream.session_id, None
        if closing is not None:
            await asyncio.shield(asyncio.wrap_future(self.executor.submit(self.engine.close, closing)))
        return closing

    async def Session(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # context.read()/write() rather than iterating and yielding: on cancellation the CancelledError
        # lands here, so the bookkeeping below runs at once, not whenever the generator is collected.
        with self.calls.track():
            stream = _Attachment()
            try:
                while (request := await _read(context)) is not grpc.aio.EOF:
                    received_ns = time.perf_counter_ns()
                    kind = request.WhichOneof("kind")
                    if kind in ("open", "resume"):
                        if stream.session_id is not None:
                            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                               f"this stream is already attached to session {stream.session_id!r}")
                        if self.calls.draining:
                            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "target is draining; no new sessions")
                        if kind == "open":
                            # Kept as the executor's own future: if the stream goes away while the open
                            # runs, the cleanup can still tell whether it made a session.
                            stream.resumable = request.open.resumable
                            stream.opening = self.executor.submit(self.engine.open, request.open)
                            opened = await asyncio.wrap_future(stream.opening)
                        else:
                            opened = await self._run(self.engine.resume, request.resume.session_id)
                            stream.resumable = True  # only a resumable session can be resumed
                        stream.session_id, stream.opening = opened.session_id, None
                        await context.write(target_pb2.TargetResponse(opened=opened))
                        if kind == "open" and self.prefill_at_open:
                            # queued on the model thread: it runs while the draft drafts tree 1, and
                            # round 1 (queued after it) then forwards only root and tree; prompts
                            # queued meanwhile (a burst's) go in the same forward
                            self.engine.queue_prefill(opened.session_id)
                            self.executor.submit(self.engine.prefill_queued)
                    elif kind == "tree":
                        if stream.session_id is None:
                            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                               "send open or resume before the first tree")
                        verdict = await asyncio.wrap_future(
                            self.batcher.submit(stream.session_id, request.tree, received_ns))
                        await context.write(target_pb2.TargetResponse(verdict=verdict))
                    elif kind == "close":
                        closed = await self._close(stream)
                        await context.write(target_pb2.TargetResponse(closed=target_pb2.Closed(session_id=closed or "")))
                        return
                    else:
                        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                           "empty request: set open, resume, tree or close")
                # A clean half-close without `close` means the client is done. A cancelled stream can
                # also surface as EOF here; for a resumable session give the cancellation a moment to
                # register, so a broken stream keeps its session for a resume instead of being closed.
                if stream.resumable and stream.session_id is not None:
                    await asyncio.sleep(0.05)
                    if context.cancelled():
                        log.info("session %s: stream broken; kept for a resume", stream.session_id)
                        return
                await self._close(stream)
            except ServiceError as exc:
                log.info("session %s: %s", stream.session_id, exc)
                await self._close(stream)  # an error ends the session too: only a broken stream may resume
                await context.abort(exc.code, exc.message)
            except asyncio.CancelledError:  # the client cancelled, or the link broke
                self._left(stream)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # a bug, not a bad request: say so, and drop the state it may have torn
                log.exception("session %s: unexpected error", stream.session_id)
                await self._close(stream)
                await context.abort(grpc.StatusCode.INTERNAL, f"target error: {type(exc).__name__}: {exc}")

    def _left(self, stream: _Attachment) -> None:
        """The stream went away without a close: end its session unless it is resumable. Not
        awaited (this task is being cancelled): queued on the model thread, so it runs right after
        the round that thread may still be running for this session."""
        if stream.session_id is None and stream.opening is None:
            return
        if stream.resumable:
            log.info("session %s: stream broken; kept for a resume", stream.session_id)
            return
        try:
            self.executor.submit(self._close_left, stream.session_id, stream.opening)
        except RuntimeError:  # the model thread already shut down (server stopping): nothing left to free
            pass

    def _close_left(self, session_id: str | None, opening: Future | None) -> None:
        """Model thread. `opening` ran (or was dropped) before this, the thread taking its work in
        order: a session it made, whose answer the stream never got, goes too."""
        if session_id is None and opening is not None and not opening.cancelled() and opening.exception() is None:
            session_id = opening.result().session_id
        if session_id is not None:
            log.info("session %s: stream ended without close; closed", session_id)
            self.engine.close(session_id)

    async def Stats(self, request, context) -> target_pb2.TargetStatsResponse:
        store = self.engine.store  # plain int reads: no need to queue behind the model thread
        return target_pb2.TargetStatsResponse(
            open_sessions=len(store), cached_tokens=store.cached_tokens, max_sessions=store.max_sessions,
            max_cached_tokens=store.max_cached_tokens, rounds_verified=self.engine.rounds_verified,
            evicted_sessions=store.evicted_total, draining=self.calls.draining, tp_size=self.tp_size,
            forwards=self.engine.forwards, rows_forwarded=self.engine.rows_forwarded,
            prefilled_tokens=self.engine.prefilled_tokens,
            batched_rounds=self.engine.batched_rounds, queued_rounds=self.batcher.queued)
