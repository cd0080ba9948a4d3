"""A TCP proxy that adds a fixed round-trip delay, for budget-tuning experiments and fault tests.

`tc netem` is unavailable on these kernels, so latency between the draft worker and the target is
injected here: each chunk read from either side is forwarded `rtt_s / 2` later, in order. The
delay can be changed while connections are open (`proxy.rtt_s = ...`), to measure how fast the
budget policy re-converges. Loopback only by default.

    python -m benchmarks.delay_proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:50061 --rtt-ms 20
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time


class DelayProxy:
    def __init__(self, upstream_host: str, upstream_port: int, rtt_s: float = 0.0,
                 listen_host: str = "127.0.0.1", listen_port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.listen = (listen_host, listen_port)
        self.rtt_s = rtt_s
        self.bytes_forwarded = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> "DelayProxy":
        self._server = await asyncio.start_server(self._handle, *self.listen)
        return self

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), timeout=5)
        except (OSError, asyncio.TimeoutError):
            client_writer.close()
            return
        for src, dst in ((client_reader, up_writer), (up_reader, client_writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(1 << 16)
                await queue.put((time.monotonic() + self.rtt_s / 2, data or None))
                if not data:
                    break
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
        finally:
            try:
                writer.close()
            except Exception:  # the peer may be gone already
                pass


class BackgroundDelayProxy:
    """A DelayProxy on its own event-loop thread, for synchronous benchmark code."""

    def __init__(self, upstream: str, rtt_s: float = 0.0):
        host, port = upstream.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = asyncio.run_coroutine_threadsafe(
            DelayProxy(host, int(port), rtt_s).start(), self.loop).result(timeout=10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def set_rtt(self, rtt_s: float) -> None:
        self.loop.call_soon_threadsafe(setattr, self.proxy, "rtt_s", rtt_s)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="TCP proxy adding a fixed round-trip delay")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--upstream", required=True)
    p.add_argument("--rtt-ms", type=float, default=0.0)
    args = p.parse_args(argv)

    async def serve():
        lh, lp = args.listen.rsplit(":", 1)
        uh, up = args.upstream.rsplit(":", 1)
        proxy = await DelayProxy(uh, int(up), args.rtt_ms / 1000, lh, int(lp)).start()
        print(f"READY {lh}:{proxy.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
