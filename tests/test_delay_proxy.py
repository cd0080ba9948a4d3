"""The delay proxy forwards bytes intact and in order, adds the configured round trip, and can
change it while a connection is open."""
from __future__ import annotations

import asyncio
import time

from benchmarks.delay_proxy import DelayProxy


async def _echo_server():
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _round_trip(reader, writer, payload: bytes) -> tuple[bytes, float]:
    start = time.monotonic()
    writer.write(payload)
    await writer.drain()
    got = b""
    while len(got) < len(payload):
        got += await asyncio.wait_for(reader.read(65536), timeout=5)
    return got, time.monotonic() - start


def test_delay_is_added_and_adjustable():
    async def scenario():
        server = await _echo_server()
        proxy = await DelayProxy("127.0.0.1", server.sockets[0].getsockname()[1], rtt_s=0.1).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        payload = bytes(range(256)) * 1000  # 256 kB: several chunks, order must hold
        got, slow = await _round_trip(reader, writer, payload)
        assert got == payload
        assert 0.1 <= slow < 0.6
        proxy.rtt_s = 0.0
        await asyncio.sleep(0.1)  # chunks already queued keep their old delay
        got, fast = await _round_trip(reader, writer, b"ping")
        assert got == b"ping" and fast < 0.05
        writer.close()
        await proxy.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
