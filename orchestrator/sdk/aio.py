"""The asyncio client of the public Generation service (same behaviour as the sync Client)."""
from __future__ import annotations

import asyncio
import random
import time
from typing import AsyncIterator

import grpc

from orchestrator.sdk.client import DEFAULT_TIMEOUT_S, RECONNECT_OPTIONS
from orchestrator.sdk.credentials import call_metadata, resolve_api_key
from orchestrator.sdk.errors import from_rpc_error
from orchestrator.sdk.results import Chunk, Generation, GenerationCollector, build_request, to_chunk
from orchestrator.sdk.retry import RetryPolicy
from orchestrator.sdk.tls import channel_credentials, server_name_options
from proto.dyspec.v1 import generation_pb2_grpc
from serving.grpc_server import channel_options


class AsyncClient:
    """`async with AsyncClient("host:port") as client: await client.generate(...)`; see Client.
    Create it inside the event loop that uses it. TLS: `tls`, `tls_ca`, `tls_server_name` as Client's."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy = RetryPolicy(),
                 rng: random.Random | None = None, api_key: str | None = None, *, tls: bool = False,
                 tls_ca: str | bytes | None = None, tls_server_name: str = ""):
        self.timeout, self.retry = timeout, retry
        # authorization: Bearer <key> on every call (orchestrator.sdk.credentials says where it comes from)
        self.metadata = call_metadata(resolve_api_key(api_key))
        self.rng = rng or random.Random()
        credentials = channel_credentials(tls, tls_ca)
        options = channel_options() + RECONNECT_OPTIONS
        self.channel = (grpc.aio.insecure_channel(address, options=options) if credentials is None else
                        grpc.aio.secure_channel(address, credentials,
                                                options=options + server_name_options(tls_server_name)))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.attempts = 0

    async def stream(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int | None = None, method: str = "", budget: int = 0,
                     ignore_eos: bool = False, model: str = "", request_id: str = "",
                     timeout: float | None = None) -> AsyncIterator[Chunk]:
        """As Client.stream. Close the iterator (contextlib.aclosing) to stop early at once."""
        request = build_request(prompt, max_new_tokens, temperature, top_p, top_k, seed, method, budget, ignore_eos,
                                model, request_id)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            self.attempts += 1
            received = False
            call = self.stub.Generate(request, timeout=max(0.0, deadline - time.monotonic()),
                                     metadata=self.metadata)
            try:
                async for response in call:
                    received = True
                    yield to_chunk(response)
                return
            except grpc.aio.AioRpcError as error:
                delay = self.retry.delay_s(attempt, self.rng)
                if not self.retry.should_retry(error.code(), attempt, received, deadline - time.monotonic(), delay):
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def generate(self, prompt: str | list[int], max_new_tokens: int = 64, **options) -> Generation:
        collector = GenerationCollector()
        async for chunk in self.stream(prompt, max_new_tokens, **options):
            collector.add(chunk)
        return collector.result()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
