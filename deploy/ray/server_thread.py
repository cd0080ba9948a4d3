"""A service's gRPC server on an event-loop thread inside a Ray actor.

Ray owns an actor's main thread (it runs the actor's method calls there), so the services'
`serve_until_signalled` (signal handlers need the main thread) cannot run in an actor. Instead the
server object the entry point would build (TargetServer, DraftServer: `start()`, `stop(grace_s)`,
`address`) runs on its own loop, and an actor method stands in for SIGTERM.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable


class ServerThread:
    def __init__(self, build: Callable[[], object], name: str):
        """`build` is called on the new loop: grpc.aio servers must be built inside the loop that runs them."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.server = self._call(self._start(build))

    @staticmethod
    async def _start(build: Callable[[], object]):
        server = build()
        await server.start()
        return server

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace_s: float) -> None:
        """The service's drain (NOT_SERVING, refuse new work, wait up to grace_s), then end the loop."""
        try:
            self._call(self.server.stop(grace_s))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
