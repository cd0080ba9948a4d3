"""The draft workers a request can go to: one channel each, health from grpc.health.v1, round-robin.

A background task checks every worker's DraftWorker health each interval; a call that fails with
UNAVAILABLE marks its worker down at once. Routing prefers the healthy workers (round-robin) and
tries the others last, since a worker may have come back between two checks.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from serving.grpc_server import channel_options

log = logging.getLogger(__name__)
WORKER_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["DraftWorker"].full_name
# A restarted worker is found within a health interval or two, not after gRPC's default reconnect
# backoff (which grows to two minutes).
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                      ("grpc.max_reconnect_backoff_ms", 2000)]


@dataclass
class Worker:
    address: str
    channel: grpc.aio.Channel = field(repr=False)
    stub: generation_pb2_grpc.DraftWorkerStub = field(repr=False)
    health: health_pb2_grpc.HealthStub = field(repr=False)
    healthy: bool = True  # optimistic until the first check: a request may race the first check


class WorkerPool:
    def __init__(self, addresses: tuple[str, ...], interval_s: float, timeout_s: float, max_message_bytes: int):
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.workers: list[Worker] = []
        for address in addresses:
            options = channel_options(max_message_bytes) + _RECONNECT_OPTIONS
            channel = grpc.aio.insecure_channel(address, options=options)
            self.workers.append(Worker(address, channel, generation_pb2_grpc.DraftWorkerStub(channel),
                                       health_pb2_grpc.HealthStub(channel)))
        self._next = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._check_forever())

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(worker) for worker in self.workers))

    async def _check(self, worker: Worker) -> None:
        try:
            response = await worker.health.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE),
                                                 timeout=self.timeout_s)
            healthy = response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        if healthy != worker.healthy:
            log.info("worker %s is %s", worker.address, "healthy" if healthy else "down")
        worker.healthy = healthy

    def any_healthy(self) -> bool:
        return any(worker.healthy for worker in self.workers)

    def order(self) -> list[Worker]:
        """Every worker once: the healthy ones from the round-robin position, then the rest."""
        n = len(self.workers)
        rotated = [self.workers[(self._next + i) % n] for i in range(n)]
        self._next = (self._next + 1) % n
        return [w for w in rotated if w.healthy] + [w for w in rotated if not w.healthy]

    def mark_down(self, worker: Worker) -> None:
        if worker.healthy:
            log.info("worker %s is down (a call failed with UNAVAILABLE)", worker.address)
        worker.healthy = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for worker in self.workers:
            await worker.channel.close()
