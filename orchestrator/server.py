"""A running orchestrator: the public gRPC Generation service and the OpenAI-compatible HTTP
server over one Gateway, with health, reflection and drain. Used by the entry point and tests."""
from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from orchestrator.auth import ApiKeys
from orchestrator.config import OrchestratorConfig
from orchestrator.gateway import Gateway
from orchestrator.metrics import Metrics, summary_line
from orchestrator.openai_http import build_app
from orchestrator.servicer import GenerationServicer
from orchestrator.workers import WorkerPool
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from serving.grpc_server import ActiveCalls, GrpcServer
from serving.tls import warn_if_plaintext

log = logging.getLogger(__name__)
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class OrchestratorServer:
    def __init__(self, config: OrchestratorConfig, tokenizer=None):
        self.config = config
        self.calls = ActiveCalls()  # gRPC and HTTP requests together, so drain waits for both
        self.metrics = Metrics(config.model_name)
        self.pool = WorkerPool(config.workers, config.health_interval_s, config.health_timeout_s,
                               config.max_message_bytes, close_grace_s=config.drain_grace_s,
                               tls=config.worker_tls, tls_server_name=config.worker_tls_server_name)
        self.metrics.track_workers(self.pool)
        self.gateway = Gateway(config, self.pool, tokenizer, self.metrics, self.calls)
        self.grpc = GrpcServer(config.host, config.port, [SERVICE_NAME], self.calls, config.max_message_bytes,
                               config.tls, config.health_port)
        keys = ApiKeys(config.api_keys)
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.gateway, self.calls, keys),
                                                              self.grpc.server)
        # handler_cancellation: an HTTP client that disconnects cancels its handler, hence the worker call.
        self.http = web.AppRunner(build_app(self.gateway, tokenizer, keys), handler_cancellation=True, access_log=None)
        self.http_address = ""
        self._log_task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return self.grpc.address

    @property
    def http_url(self) -> str:
        return f"{'https' if self.config.tls else 'http'}://{self.http_address}"

    async def _log_forever(self) -> None:
        """A periodic summary line in the log, as vLLM prints one (only for intervals with traffic)."""
        before, since = self.metrics.totals(), time.monotonic()
        while True:
            await asyncio.sleep(self.config.log_interval_s)
            after, now = self.metrics.totals(), time.monotonic()
            line = summary_line(before, after, now - since)
            if line:
                log.info("%s", line)
            before, since = after, now

    async def start(self) -> None:
        limits = self.gateway.limits
        log.info("API keys: %s; limits: context %s tokens, prompt %d characters, body %d bytes",
                 f"{len(self.config.api_keys)} configured, required" if self.config.api_keys else "none (open API)",
                 limits.max_context_tokens or "unknown (the target's applies)", limits.max_prompt_chars,
                 limits.max_body_bytes)
        self._log_task = asyncio.create_task(self._log_forever())
        await self.pool.start()
        await self.grpc.start()
        await self.http.setup()
        if self.config.tls is None:
            warn_if_plaintext(self.config.http_host, "HTTP")
        site = web.TCPSite(self.http, self.config.http_host, self.config.http_port,
                           ssl_context=self.config.tls.server_ssl_context() if self.config.tls else None)
        await site.start()
        host, port = self.http.addresses[0][:2]  # the bound port when 0 was asked for
        self.http_address = f"{host}:{port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING and refuse new requests, let in-flight ones finish (up to grace_s), stop."""
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        await self.grpc.drain(grace_s)  # sets calls.draining, which the HTTP side also honours
        await self.http.cleanup()
        await self.pool.close()
        if self._log_task is not None:
            self._log_task.cancel()

    async def serve_until_signalled(self) -> None:
        """Start, print `READY <grpc host:port> <http url>` (launchers and tests wait for it), drain
        on SIGTERM/SIGINT."""
        await self.start()
        print(f"READY {self.address} {self.http_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining (grace %.1f s)", self.config.drain_grace_s)
        await self.stop()
