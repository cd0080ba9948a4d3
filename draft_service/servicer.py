"""gRPC servicer of dyspec.v1.DraftWorker: validates a request, runs its WorkerSession, streams
token chunks and the summary. Cancellation or a deadline ends the target session too."""
from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor

import grpc

from dyspec import METHODS
from draft_service.budget import BudgetPolicy, RequestShape
from draft_service.config import DraftConfig
from draft_service.decode import GenerationPlan, WorkerSession
from draft_service.draft_batcher import DraftForwardBatcher
from draft_service.remote_verifier import RemoteVerifier
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from serving.errors import ServiceError
from serving.grpc_server import ActiveCalls, target_link_options
from serving.text import TextStream
from serving.tls import aio_channel
from serving.wire import MAX_SEED, sampling_from_proto

log = logging.getLogger(__name__)
_CLOSE_GRACE_S = 5.0


def _invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


class DraftWorkerServicer(generation_pb2_grpc.DraftWorkerServicer):
    def __init__(self, config: DraftConfig, draft_model, tokenizer, budget_policy: BudgetPolicy, calls: ActiveCalls):
        self.config, self.draft_model, self.tokenizer, self.budget_policy, self.calls = (
            config, draft_model, tokenizer, budget_policy, calls)
        self.executor = ThreadPoolExecutor(max_workers=config.max_sessions, thread_name_prefix="draft")
        # one model thread for every session's draft forwards, batched (a single session still runs alone)
        self.batcher = DraftForwardBatcher(draft_model) if config.batch_drafting and config.max_sessions > 1 else None
        load = getattr(budget_policy, "load", None)  # a joint budget (TunedBudget): price drafting as batched
        if self.batcher is not None and load is not None:
            load.draft_batch_share = self.batcher.batch_share
        self.channels: dict[str, grpc.aio.Channel] = {}  # one per target address, shared by sessions
        self.active = 0
        self.started = 0

    def plan(self, request: generation_pb2.GenerateRequest) -> GenerationPlan:
        which = request.WhichOneof("prompt")
        if which == "text":
            if self.tokenizer is None:
                raise _invalid("this worker has no tokenizer: send prompt token_ids")
            prompt = list(self.tokenizer(request.text)["input_ids"])
        else:
            prompt = list(request.token_ids.ids) if which == "token_ids" else []
        if not prompt:
            raise _invalid("the prompt is empty")
        vocab = self.draft_model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise _invalid(f"prompt token {bad[0]} outside vocabulary [0, {vocab})")
        if request.max_new_tokens < 1:
            raise _invalid("max_new_tokens must be >= 1")
        method = request.method or self.config.method
        if method not in METHODS:
            raise _invalid(f"unknown method {method!r}; choose one of {list(METHODS)}")
        try:
            sampling, seed = sampling_from_proto(request.sampling)
        except ValueError as exc:
            raise _invalid(f"sampling: {exc}") from None
        return GenerationPlan(request.request_id, request.model, prompt, request.max_new_tokens, sampling,
                              secrets.randbelow(MAX_SEED + 1) if seed is None else seed, request.ignore_eos, method,
                              request.budget)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            # Mutual TLS when configured: this worker's certificate in, the target's checked against the CA.
            # Fast keepalive: a target the network cuts off fails its sessions as UNAVAILABLE in seconds.
            self.channels[address] = aio_channel(address, self.config.tls,
                                                 target_link_options(self.config.max_message_bytes),
                                                 self.config.tls_server_name)
        return self.channels[address]

    async def Generate(self, request: generation_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # context.write() rather than yield: a cancelled call raises here, so the target session is
        # closed at once (not when a suspended generator is collected).
        with self.calls.track():
            session = None
            try:
                if self.calls.draining:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE, "worker is draining; no new sessions")
                if self.active >= self.config.max_sessions:
                    raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"worker is at its session limit ({self.config.max_sessions})")
                plan = self.plan(request.request)
                # The target stream outlives the caller's deadline by a grace period: a session cut by that
                # deadline is then still closed on the target, not left there until its idle timeout.
                remaining = context.time_remaining()
                call_timeout_s = None if remaining is None else remaining + _CLOSE_GRACE_S
                address = request.target_address or self.config.target_address
                verifier = RemoteVerifier(self._channel(address), self.config.deadline_s, call_timeout_s,
                                          self.config.prefill_s_per_token, target_address=address)
                session = WorkerSession(plan, self.draft_model, self.config.draft_sampling, verifier,
                                        self.budget_policy(plan.sampling,
                                                           RequestShape(len(plan.prompt), plan.max_new_tokens)),
                                        self.executor,
                                        self.config.overlaps(address), self.batcher)
                self.active += 1
                self.started += 1
                text = TextStream(self.tokenizer)
                async for tokens in session.run():
                    await context.write(generation_pb2.GenerateResponse(
                        tokens=generation_pb2.TokenChunk(token_ids=tokens, text_delta=text.push(tokens))))
                await context.write(generation_pb2.GenerateResponse(summary=session.summary()))
            except ServiceError as exc:
                log.info("request %r: %s", request.request.request_id, exc)
                await context.abort(exc.code, exc.message)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # a bug (in a budget policy, a builder, ...), not a bad request: say so
                log.exception("request %r: unexpected error", request.request.request_id)
                await context.abort(grpc.StatusCode.INTERNAL, f"draft worker error: {type(exc).__name__}: {exc}")
            finally:
                if session is not None:
                    # Shielded: a caller that cancels while the session closes (e.g. right after the summary)
                    # must not leave the target session open or the slot counted.
                    await asyncio.shield(self._close(session))

    async def _close(self, session: WorkerSession) -> None:
        try:
            await session.aclose()
        finally:
            self.active -= 1

    async def Stats(self, request, context) -> generation_pb2.WorkerStatsResponse:
        return generation_pb2.WorkerStatsResponse(active_sessions=self.active, started_sessions=self.started,
                                                  draining=self.calls.draining)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.executor.shutdown(wait=True)
        if self.batcher is not None:
            self.batcher.close()
            stats = self.batcher.stats
            log.info("batched drafting: %d session forwards in %d draft forwards (%d over several sessions, "
                     "largest %d)", stats.session_forwards, stats.forwards, stats.batched_forwards, stats.largest_batch)
