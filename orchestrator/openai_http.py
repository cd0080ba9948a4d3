"""The OpenAI-compatible HTTP server (aiohttp): /v1/completions, /v1/chat/completions (both with
`stream`), /v1/models, /health and /metrics (Prometheus text).

Status codes: 400 invalid JSON or parameters (a prompt + max_tokens over the context included), 401
a missing or wrong API key (when keys are configured; /health never needs one, /metrics unless
--public-metrics), 404 unknown model or path, 413 a body over --max-body-bytes, 429 at capacity
(the server's or the key's), 503 no worker available or draining, 504 deadline passed; bodies in
OpenAI's error format. A streamed
response reports an error that happens after its first chunk as a `data: {"error": ...}` event.
Responses carry `usage` and, as an extension, `dyspec` (the request's speculative-decoding stats).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.auth import ApiKeys, Unauthenticated
from orchestrator.gateway import Gateway
from orchestrator.limits import LimitExceeded
from orchestrator.metrics import FINISH_REASONS
from orchestrator.openai_params import InvalidParam, OpenAIRequest, parse
from orchestrator.stop import StopMatcher
from proto.dyspec.v1 import generation_pb2
from serving.errors import ServiceError

log = logging.getLogger(__name__)
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def _error_response(exc: Exception) -> web.Response:
    if isinstance(exc, InvalidParam):
        return web.json_response(error_body(exc.message, exc.status, exc.param, exc.code), status=exc.status)
    if isinstance(exc, LimitExceeded):
        return web.json_response(error_body(exc.message, exc.http_status, exc.param, exc.openai_code),
                                 status=exc.http_status)
    if isinstance(exc, Unauthenticated):  # as OpenAI answers a bad key
        return web.json_response(error_body(exc.message, 401, code="invalid_api_key"), status=401,
                                 headers={"WWW-Authenticate": "Bearer"})
    status = _HTTP_STATUS.get(exc.code, 500)
    return web.json_response(error_body(exc.message, status, code=exc.code.name.lower()), status=status)


def stats_json(stats: generation_pb2.GenerationStats, wall_s: float) -> dict:
    """The per-request extension object: what speculation did for this request."""
    return {"method": stats.method, "seed": stats.seed, "steps": stats.steps,
            "accepted_tokens": stats.accepted_tokens, "drafted_tokens": stats.drafted_tokens,
            "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
            "acceptance_rate": round(stats.accepted_tokens / stats.drafted_tokens, 4) if stats.drafted_tokens else 0.0,
            "accepted_per_position": list(stats.accepted_per_position),
            "tokens_per_s": round(stats.generated_tokens / wall_s, 3) if wall_s > 0 else 0.0,
            "draft_s": stats.draft_ns / 1e9 + stats.build_ns / 1e9, "verify_s": stats.target_total_ns / 1e9,
            "network_s": stats.network_ns / 1e9, "total_s": stats.total_ns / 1e9}


class Completion:
    """One request's running state: text through the stop matcher, token count, finish, stats."""

    def __init__(self, parsed: OpenAIRequest, model_name: str):
        self.parsed, self.model_name = parsed, model_name
        self.id = f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.start = time.perf_counter()
        self.stop = StopMatcher(parsed.stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stats: dict | None = None

    def take(self, response: generation_pb2.GenerateResponse) -> str:
        """Text to send for one worker message ("" for none)."""
        if response.HasField("tokens"):
            self.completion_tokens += len(response.tokens.token_ids)
            text = self.stop.push(response.tokens.text_delta)
            if self.stop.stopped:
                self.finish_reason = "stop"
            return text
        self.finish_reason = FINISH_REASONS.get(response.summary.finish_reason, "length")
        self.stats = stats_json(response.summary.stats, time.perf_counter() - self.start)
        return self.stop.flush()

    @property
    def usage(self) -> dict:
        prompt = len(self.parsed.request.token_ids.ids)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.parsed.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def choice(self, text: str | None, finish_reason: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.parsed.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if chunk:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}


class OpenAIRoutes:
    def __init__(self, gateway: Gateway, tokenizer, keys: ApiKeys = ApiKeys()):
        self.gateway, self.tokenizer, self.keys = gateway, tokenizer, keys
        self.model_name = gateway.config.model_name
        self.created = int(time.time())

    async def health(self, request: web.Request) -> web.Response:
        if self.gateway.calls.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not self.gateway.pool.any_healthy():
            return web.json_response({"status": "no healthy draft worker"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.keys.caller(request.headers.get("Authorization"))
        except Unauthenticated as exc:
            return _error_response(exc)
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dyspec"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.gateway.config.public_metrics:
            try:
                self.keys.caller(request.headers.get("Authorization"))
            except Unauthenticated as exc:
                return _error_response(exc)
        body = generate_latest(self.gateway.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        with self.gateway.calls.track():
            try:
                caller = self.keys.caller(request.headers.get("Authorization"))  # before the body is read
                limits = self.gateway.limits
                limits.check_body(request.content_length)
                try:
                    body = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InvalidParam(f"the request body is not valid JSON: {exc}") from None
                except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the limit
                    raise LimitExceeded(f"the request body is larger than this server's {limits.max_body_bytes} bytes",
                                        http_status=413, openai_code="request_too_large") from None
                parsed = parse(body, chat, self.model_name, self.tokenizer, self.gateway.config.default_max_tokens,
                               limits)
                state = Completion(parsed, self.model_name)
                parsed.request.request_id = state.id
                async with contextlib.aclosing(self.gateway.generate(parsed.request, None, caller)) as stream:
                    if parsed.stream:
                        return await self._stream(request, state, stream)
                    return await self._collect(state, stream)
            except (InvalidParam, ServiceError) as exc:
                log.info("%s: %s", request.path, exc)
                return _error_response(exc)

    async def _collect(self, state: Completion, stream) -> web.Response:
        text = ""
        async for response in stream:
            text += state.take(response)
            if state.stop.stopped:
                break  # leaving the loop closes the stream: the worker stops generating
        body = state.envelope(chunk=False) | {"choices": [state.choice(text, state.finish_reason, chunk=False)],
                                              "usage": state.usage, "dyspec": state.stats}
        return web.json_response(body)

    async def _stream(self, request: web.Request, state: Completion, stream) -> web.StreamResponse:
        # The first message is awaited before the headers go out, so a request no worker can take
        # still gets its proper status code (503, 429, 504) instead of an error event.
        first = await anext(stream, None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(payload: dict) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        try:
            message, opening = first, True
            while message is not None:
                text = state.take(message)
                if text or opening and state.parsed.chat:
                    await send(state.envelope(chunk=True) | {"choices": [state.choice(text, None, True, opening)]})
                    opening = False
                if state.stop.stopped:
                    break
                message = await anext(stream, None)
            final = state.envelope(chunk=True) | {"choices": [state.choice("", state.finish_reason, True)]}
            await send(final | ({"dyspec": state.stats} if state.stats else {}))
            if state.parsed.include_usage:
                await send(state.envelope(chunk=True) | {"choices": [], "usage": state.usage})
        except ServiceError as exc:
            log.info("%s: %s (after streaming began)", request.path, exc)
            await send(error_body(exc.message, _HTTP_STATUS.get(exc.code, 500), code=exc.code.name.lower()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def build_app(gateway: Gateway, tokenizer, keys: ApiKeys = ApiKeys()) -> web.Application:
    routes = OpenAIRoutes(gateway, tokenizer, keys)
    # Bodies are bounded twice: Content-Length is checked before reading (413 at once), and aiohttp
    # stops reading a chunked body at the same size.
    app = web.Application(client_max_size=gateway.limits.max_body_bytes)
    app.add_routes([web.post("/v1/completions", routes.completions),
                    web.post("/v1/chat/completions", routes.chat_completions),
                    web.get("/v1/models", routes.models), web.get("/health", routes.health),
                    web.get("/metrics", routes.metrics)])
    return app
