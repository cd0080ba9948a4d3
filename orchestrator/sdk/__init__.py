"""Client SDK of the public dyspec.v1.Generation service: sync `Client`, asyncio `AsyncClient`.

    from orchestrator.sdk import Client
    with Client("127.0.0.1:50051") as client:  # api_key="..." (or $DYSPEC_API_KEY) where keys are required
        result = client.generate("def fib(n):", max_new_tokens=64)
        print(result.text, result.tokens_per_s, result.tokens_per_step)
"""
from orchestrator.sdk.aio import AsyncClient
from orchestrator.sdk.client import Client
from orchestrator.sdk.errors import (Cancelled, DeadlineExceeded, DySpecError, InvalidRequest, NotFound, Overloaded,
                                     ServerError, Unauthenticated, Unavailable)
from orchestrator.sdk.results import Chunk, Generation
from orchestrator.sdk.retry import RetryPolicy

__all__ = ["AsyncClient", "Cancelled", "Chunk", "Client", "DeadlineExceeded", "DySpecError", "Generation",
           "InvalidRequest", "NotFound", "Overloaded", "RetryPolicy", "ServerError", "Unauthenticated", "Unavailable"]
