"""The draft workers a request can go to: one channel each, health from grpc.health.v1, round-robin.

A background task checks every worker's DraftWorker health each interval; a call that fails with
UNAVAILABLE marks its worker down at once. Routing prefers the healthy workers (round-robin) and
tries the others last, since a worker may have come back between two checks.

Workers given as `dns:///NAME:PORT` (orchestrator.discovery) are the name's addresses, resolved again
before each round of checks: new addresses join (after their first health check), addresses that are
gone leave the rotation and their channels close once their in-flight calls end (within the drain
grace). A failed lookup keeps the addresses of the last good one: a DNS blip must not empty the pool.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.discovery import parse_worker, resolve
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from serving.grpc_server import channel_options
from serving.tls import TlsFiles, aio_channel

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
    def __init__(self, addresses: tuple[str, ...], interval_s: float, timeout_s: float, max_message_bytes: int,
                 close_grace_s: float = 30.0, resolver=resolve, tls: TlsFiles | None = None, tls_server_name: str = ""):
        self.interval_s, self.timeout_s, self.close_grace_s = interval_s, timeout_s, close_grace_s
        self.tls, self.tls_server_name = tls, tls_server_name  # mutual TLS to every worker; None: plaintext
        self.max_message_bytes, self.resolver = max_message_bytes, resolver
        specs = [parse_worker(a) for a in addresses]
        self.discovered = [s for s in specs if s.discover]
        self.resolved: dict[str, list[str]] = {s.text: [] for s in self.discovered}  # last good answer per name
        self.workers: list[Worker] = []
        for spec in specs:
            if not spec.discover and spec.text not in self.addresses():
                self.workers.append(self._connect(spec.text, healthy=True))
        self.static = set(self.addresses())
        self._next = 0
        self._task: asyncio.Task | None = None
        self._retired: dict[int, Worker] = {}  # no longer resolved; channels closing once their calls end

    def _connect(self, address: str, healthy: bool) -> Worker:
        channel = aio_channel(address, self.tls, channel_options(self.max_message_bytes) + _RECONNECT_OPTIONS,
                              self.tls_server_name)
        return Worker(address, channel, generation_pb2_grpc.DraftWorkerStub(channel), health_pb2_grpc.HealthStub(channel),
                      healthy)

    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    async def start(self) -> None:
        await self.refresh()
        await self.check_all()
        self._task = asyncio.create_task(self._check_forever())

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()
            await self.check_all()

    async def refresh(self) -> None:
        """Resolve the dns:/// names again and add or retire workers to match."""
        if not self.discovered:
            return
        for spec in self.discovered:
            try:
                self.resolved[spec.text] = await asyncio.wait_for(self.resolver(spec.host, spec.port), self.timeout_s)
            except Exception as exc:  # gaierror, timeout, a name the resolver rejects: never stop the checks
                log.warning("could not resolve %s (%s); keeping its %d known addresses", spec.text, exc,
                            len(self.resolved[spec.text]))
        wanted = self.static | {a for found in self.resolved.values() for a in found}
        for address in sorted(wanted - set(self.addresses())):
            log.info("worker %s discovered", address)
            self.workers.append(self._connect(address, healthy=False))  # routed once a health check passes
        for worker in [w for w in self.workers if w.address not in wanted]:
            log.info("worker %s is no longer resolved; closing its channel once its calls end", worker.address)
            self.workers.remove(worker)
            self._retired[id(worker)] = worker  # by identity: the address may come back while this one closes
            task = asyncio.create_task(worker.channel.close(grace=self.close_grace_s))
            task.add_done_callback(lambda _, key=id(worker): self._retired.pop(key, None))

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
        if n == 0:  # every worker is discovered and none was found
            return []
        rotated = [self.workers[(self._next + i) % n] for i in range(n)]
        self._next = (self._next + 1) % n
        return [w for w in rotated if w.healthy] + [w for w in rotated if not w.healthy]

    def mark_down(self, worker: Worker) -> None:
        if worker.healthy:
            log.info("worker %s is down (a call failed with UNAVAILABLE)", worker.address)
        worker.healthy = False

    def describe(self) -> str:
        names = ", ".join(f"{name} -> {len(found)} addresses" for name, found in self.resolved.items())
        return f"{len(self.workers)} known workers" + (f" ({names})" if names else "")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for worker in self.workers + list(self._retired.values()):
            await worker.channel.close()  # cancels what is still in flight: the server is stopping
