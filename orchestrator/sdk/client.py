"""The synchronous client of the public Generation service."""
from __future__ import annotations

import random
import time
from typing import Iterator

import grpc

from orchestrator.sdk.credentials import call_metadata, resolve_api_key
from orchestrator.sdk.errors import from_rpc_error
from orchestrator.sdk.results import Chunk, Generation, GenerationCollector, build_request, to_chunk
from orchestrator.sdk.retry import RetryPolicy
from orchestrator.sdk.tls import channel_credentials, server_name_options
from proto.dyspec.v1 import generation_pb2_grpc
from serving.grpc_server import channel_options

DEFAULT_TIMEOUT_S = 120.0
# Reconnect quickly after a server restart instead of gRPC's default backoff (up to two minutes).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


class Client:
    """`Client("host:port")`: generate() returns a whole Generation, stream() yields Chunks.

    Every call has a deadline (`timeout` seconds, else the client's default) that covers its
    retries. UNAVAILABLE is retried with backoff (see RetryPolicy) until the first message arrives;
    errors are raised as orchestrator.sdk.errors types. Use as a context manager, or close().

    TLS (orchestrator.sdk.tls): `tls_ca=` the CA bundle of the server's certificate (path or PEM
    bytes), or `tls=True` for the system's roots; `tls_server_name=` when the certificate names
    another host than `address`. Without them the channel is plaintext."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy = RetryPolicy(),
                 rng: random.Random | None = None, api_key: str | None = None, *, tls: bool = False,
                 tls_ca: str | bytes | None = None, tls_server_name: str = ""):
        self.timeout, self.retry = timeout, retry
        # authorization: Bearer <key> on every call (orchestrator.sdk.credentials says where it comes from)
        self.metadata = call_metadata(resolve_api_key(api_key))
        self.rng = rng or random.Random()
        credentials = channel_credentials(tls, tls_ca)
        options = channel_options() + RECONNECT_OPTIONS
        self.channel = (grpc.insecure_channel(address, options=options) if credentials is None else
                        grpc.secure_channel(address, credentials, options=options + server_name_options(tls_server_name)))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.attempts = 0  # calls sent, retries included (for tests and debugging)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, method: str = "", budget: int = 0,
               ignore_eos: bool = False, model: str = "", request_id: str = "",
               timeout: float | None = None) -> Iterator[Chunk]:
        """Yield the tokens as they are verified, then a last Chunk with finish_reason and stats.
        prompt: text (tokenised by the server) or token ids; temperature 0 is greedy."""
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
                for response in call:
                    received = True
                    yield to_chunk(response)
                return
            except grpc.RpcError as error:
                delay = self.retry.delay_s(attempt, self.rng)
                if not self.retry.should_retry(error.code(), attempt, received, deadline - time.monotonic(), delay):
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()  # a no-op after the end; stops the generation if the caller left early
            time.sleep(delay)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, **options) -> Generation:
        """The whole generation (same arguments as stream())."""
        collector = GenerationCollector()
        for chunk in self.stream(prompt, max_new_tokens, **options):
            collector.add(chunk)
        return collector.result()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
