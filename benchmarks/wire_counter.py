"""The project's delay proxy, counting bytes per direction: draft -> target (trees) and
target -> draft (verdicts). Bytes are what crossed the TCP connection (HTTP/2 frames, gRPC
headers and protobuf payloads), so dividing the draft -> target bytes of a request by the tree
nodes it sent gives bytes on the wire per tree node.

Usage: `proxy = CountingDelayProxy(target_address, rtt_s)`, point a draft worker at
`proxy.address`, read `proxy.counts()` before and after a request.
"""
from __future__ import annotations

import asyncio
import threading

from benchmarks.delay_proxy import BackgroundDelayProxy, DelayProxy


class _CountingWriter:
    """A StreamWriter stand-in that counts what is written through it."""

    def __init__(self, writer: asyncio.StreamWriter, counts: dict, direction: str):
        self.writer, self.counts, self.direction = writer, counts, direction

    def write(self, data: bytes) -> None:
        self.counts[self.direction] += len(data)
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class CountingDelay(DelayProxy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = {"to_target": 0, "to_draft": 0}

    async def _pump(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        to_target = peer is not None and peer[1] == self.upstream[1]
        await super()._pump(reader, _CountingWriter(writer, self.counts, "to_target" if to_target else "to_draft"))


class CountingDelayProxy(BackgroundDelayProxy):
    """BackgroundDelayProxy (set_rtt, address, close) with per-direction byte counts."""

    def __init__(self, upstream: str, rtt_s: float = 0.0):  # as BackgroundDelayProxy, with CountingDelay
        host, port = upstream.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = asyncio.run_coroutine_threadsafe(
            CountingDelay(host, int(port), rtt_s).start(), self.loop).result(timeout=10)

    def counts(self) -> dict:
        """A snapshot {'to_target': bytes, 'to_draft': bytes} (read on the proxy's loop)."""
        async def snap():
            return dict(self.proxy.counts)
        return asyncio.run_coroutine_threadsafe(snap(), self.loop).result(timeout=10)
