"""What every public request goes through, over gRPC or HTTP: admission, prompt resolution,
routing to a draft worker with retry, deadline propagation, text, metrics.

`Gateway.generate` is an async generator of dyspec.v1 GenerateResponse messages that raises
ServiceError with the status to return. Close it (contextlib.aclosing) when abandoning it early:
that cancels the worker call, which ends the worker's and the target's sessions.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import AsyncIterator

import grpc

from orchestrator.auth import OPEN
from orchestrator.config import OrchestratorConfig
from orchestrator.limits import RequestLimits
from orchestrator.metrics import Metrics
from orchestrator.tokenizer import encode
from orchestrator.workers import WorkerPool
from proto.dyspec.v1 import generation_pb2
from serving.errors import ServiceError
from serving.grpc_server import ActiveCalls
from serving.text import TextStream

log = logging.getLogger(__name__)
# Another worker may take a request that one refused before streaming anything: a worker that is
# down or draining (UNAVAILABLE) or full (RESOURCE_EXHAUSTED). Nothing was generated, so the retry
# cannot duplicate output.
_RETRY_ON_ANOTHER_WORKER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Gateway:
    def __init__(self, config: OrchestratorConfig, pool: WorkerPool, tokenizer, metrics: Metrics, calls: ActiveCalls):
        self.config, self.pool, self.tokenizer, self.metrics, self.calls = config, pool, tokenizer, metrics, calls
        self.limits = RequestLimits.resolve(config.max_context_tokens, config.max_prompt_chars, config.max_body_bytes,
                                            tokenizer)
        self.running = 0
        self.running_by_caller: Counter[str] = Counter()

    def resolve(self, request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
        """The request as a worker gets it: the model checked (workers serve the deployment's
        default), a text prompt tokenised here, so workers and the target see token ids only, and
        prompt + max_new_tokens checked against the context."""
        if request.model and request.model != self.config.model_name:
            raise ServiceError(grpc.StatusCode.NOT_FOUND,
                               f"model {request.model!r} is not served here; this server serves "
                               f"{self.config.model_name!r}")
        if request.max_new_tokens < 1:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be >= 1")
        resolved = generation_pb2.GenerateRequest()
        resolved.CopyFrom(request)
        resolved.model = ""
        which = request.WhichOneof("prompt")
        if which == "text":
            if self.tokenizer is None:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "this server has no tokenizer: send the prompt as token_ids")
            self.limits.check_prompt_chars(len(request.text))  # before the tokenizer spends seconds on it
            resolved.token_ids.ids[:] = encode(self.tokenizer, request.text)
        if not resolved.token_ids.ids:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        self.limits.fit(len(resolved.token_ids.ids), request.max_new_tokens)
        return resolved

    def _admit(self, caller: str) -> None:
        if self.calls.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry on another replica")
        if self.running >= self.config.max_concurrent:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server is at its limit of {self.config.max_concurrent} concurrent requests")
        per_key = self.config.max_concurrent_per_key
        if per_key and caller != OPEN and self.running_by_caller[caller] >= per_key:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"API key {caller} is at its limit of {per_key} concurrent requests")

    async def generate(self, request: generation_pb2.GenerateRequest, timeout_s: float | None,
                       caller: str = OPEN) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Stream the worker's messages (text deltas from this tokenizer when it has one).
        timeout_s: the caller's remaining deadline; None means the configured default. caller: the
        API key's name (orchestrator.auth), for the per-key limit."""
        self._admit(caller)
        record = self.metrics.request()
        self.running += 1
        self.running_by_caller[caller] += 1
        self.metrics.running.labels(self.metrics.model_name).inc()
        try:
            resolved = self.resolve(request)
            deadline = time.monotonic() + (self.config.default_timeout_s if timeout_s is None else timeout_s)
            async for response in self._route(resolved, deadline, record):
                yield response
        except ServiceError as exc:
            record.failed(exc.code.name)
            raise
        finally:
            self.running -= 1
            self.running_by_caller[caller] -= 1
            if not self.running_by_caller[caller]:
                del self.running_by_caller[caller]  # the counter stays as small as the keys in use
            self.metrics.running.labels(self.metrics.model_name).dec()

    async def _route(self, request: generation_pb2.GenerateRequest, deadline: float,
                     record) -> AsyncIterator[generation_pb2.GenerateResponse]:
        failures: list[str] = []
        last_code = grpc.StatusCode.UNAVAILABLE
        for worker in self.pool.order():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before a worker answered")
            # The worker gets the caller's remaining deadline, so it (and the target) stop with the caller.
            call = worker.stub.Generate(generation_pb2.WorkerGenerateRequest(request=request), timeout=remaining)
            streamed = False
            try:
                text = TextStream(self.tokenizer)
                async for response in call:
                    if response.HasField("tokens"):
                        streamed = True
                        record.tokens(len(response.tokens.token_ids))
                        if self.tokenizer is not None:
                            response.tokens.text_delta = text.push(list(response.tokens.token_ids))
                    else:
                        record.summary(response.summary)
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or exc.code().name
                if streamed or code not in _RETRY_ON_ANOTHER_WORKER:
                    raise ServiceError(code, details if code != grpc.StatusCode.DEADLINE_EXCEEDED
                                       else f"deadline exceeded: {details}") from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_down(worker)
                log.info("request %r: worker %s refused (%s: %s); trying the next", request.request_id,
                         worker.address, code.name, details)
                failures.append(f"{worker.address}: {code.name} {details}")
                last_code = code
            finally:
                call.cancel()  # a no-op after a clean end; frees the worker's session otherwise
        if not failures:
            raise ServiceError(last_code, f"no draft worker is known yet ({self.pool.describe()})")
        raise ServiceError(last_code, "no draft worker could take the request (" + "; ".join(failures) + ")")
