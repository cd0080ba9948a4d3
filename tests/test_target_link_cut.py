"""A target cut off by the network, across processes: the draft worker reaches its target through a
loopback TCP proxy that can blackhole the link (both sockets stay open, no byte gets through either
way, as when a partition drops packets without a reset). A generation cut mid-stream must end with
UNAVAILABLE naming the target within 5 s, found by the worker's keepalive on its target channel,
not DEADLINE_EXCEEDED at the round deadline. And that keepalive must not cost long rounds: a round
that keeps the link silent for several ping intervals completes (the target accepts the pings).
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from tests.background_loop import BackgroundLoop
from tests.service_process import ServiceProcess

PROMPT = [3, 1, 4, 1, 5]
FAILED_WITHIN_S = 5.0
ROUND_DEADLINE_S = 30.0  # far beyond FAILED_WITHIN_S: only the keepalive can end the stream in time
LONG_FORWARD_S = 4.0  # a silent link for four ping intervals: a server that refused the pings would GOAWAY
pytestmark = pytest.mark.e2e


class BlackholeProxy:
    """A TCP proxy on 127.0.0.1 that forwards both ways until `cut()`; from then on it reads and
    drops every byte on every connection, new ones included, and closes nothing."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rsplit(":", 1)
        self.loop = BackgroundLoop()
        self.cut_off = False
        self.tasks: set[asyncio.Task] = set()
        self.server = self.loop.run(asyncio.start_server(self._connect, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def cut(self) -> None:
        self.loop.loop.call_soon_threadsafe(setattr, self, "cut_off", True)

    async def _connect(self, client_reader, client_writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        for reader, writer in ((client_reader, up_writer), (up_reader, client_writer)):
            task = asyncio.create_task(self._pump(reader, writer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                if not self.cut_off:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _close(self) -> None:
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def close(self) -> None:
        self.loop.run(self._close())
        self.loop.close()


def start_stack(logs, forward_s: float, name: str) -> tuple[list[ServiceProcess], BlackholeProxy]:
    """A slow target, the proxy in front of it, a draft worker dialling the proxy."""
    target = ServiceProcess.module("target_service", [
        "--no-warmup", "--model-factory", "tests.service_models:slow_target",
        "--model-kwargs", f'{{"forward_s": {forward_s}}}'], logs / f"{name}-target.log")
    target.wait_ready(120)
    proxy = BlackholeProxy(target.address)
    worker = ServiceProcess.module("draft_service", [
        "--no-warmup", "--target-address", proxy.address, "--deadline-s", str(ROUND_DEADLINE_S), "--budget", "4",
        "--model-factory", "tests.service_models:draft"], logs / f"{name}-worker.log")
    try:
        worker.wait_ready(120)
    except Exception:
        proxy.close()
        target.stop()
        raise
    return [target, worker], proxy


@pytest.fixture
def stack(tmp_path, request):
    processes, proxy = start_stack(tmp_path, request.param, request.node.name[:40])
    try:
        yield processes[1], proxy
    finally:
        for process in reversed(processes):
            process.stop()
        proxy.close()


def generate(worker: ServiceProcess, channel: grpc.Channel, max_new_tokens: int):
    request = generation_pb2.WorkerGenerateRequest(request=generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=max_new_tokens, ignore_eos=True,
        sampling=sampling_pb2.SamplingParams(temperature=1.0, seed=0)))
    return generation_pb2_grpc.DraftWorkerStub(channel).Generate(request, timeout=120)


def worker_active(channel: grpc.Channel) -> int:
    return generation_pb2_grpc.DraftWorkerStub(channel).Stats(generation_pb2.WorkerStatsRequest(),
                                                              timeout=5).active_sessions


@pytest.mark.parametrize("stack", [0.3], indirect=True)
def test_a_blackholed_target_link_fails_the_session_with_unavailable_within_5_s(stack):
    worker, proxy = stack
    with grpc.insecure_channel(worker.address) as channel:
        stream = generate(worker, channel, 200)
        assert next(stream).tokens.token_ids  # the session runs; its next round goes out now
        proxy.cut()
        cut_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            for _ in stream:
                pass
        waited = time.monotonic() - cut_at
        error = failed.value
        print(f"\ncut link: {error.code().name} after {waited:.2f} s: {error.details()}")
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        assert f"target {proxy.address}" in error.details(), error.details()
        assert waited < FAILED_WITHIN_S, f"the caller heard of the cut {waited:.2f} s after it: {error.details()}"
        assert worker_active(channel) == 0  # the failed session is not counted any more


@pytest.mark.parametrize("stack", [LONG_FORWARD_S], indirect=True)
def test_keepalive_does_not_break_a_long_silent_round(stack):
    worker, proxy = stack
    with grpc.insecure_channel(worker.address) as channel:
        start = time.monotonic()
        responses = list(generate(worker, channel, 2))  # the prefill and each round: LONG_FORWARD_S of silence
        took = time.monotonic() - start
    assert sum(len(r.tokens.token_ids) for r in responses if r.HasField("tokens")) == 2
    assert responses[-1].HasField("summary")
    assert took >= 2 * LONG_FORWARD_S, f"{took:.1f} s: the target forwards were not that slow"
