"""The gRPC frame both services run in: explicit message limits, keepalive, health, reflection,
and a drain sequence (NOT_SERVING, refuse new work, let in-flight calls finish, stop).

Health and reflection are registered for every served service, so Kubernetes' native gRPC probes
and grpcurl work against either service unchanged. With TLS (serving.tls) the port is TLS, mutual
when a CA is given; native probes speak no TLS, so a health port can serve grpc.health.v1 alone in
plaintext beside it (the same health status, nothing else on that port).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.tls import TlsFiles, warn_if_plaintext

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # a 1024-node tree with wide draft supports; gRPC's 4 MiB default is too small


# A draft worker's link to its target (target_link_options) pings every second and counts a ping
# unanswered for 2 s as a dead link: a target cut off by the network fails its sessions within
# about 3 s (UNAVAILABLE), inside the 5 s the issue allows and well before the round deadline.
TARGET_KEEPALIVE_TIME_MS = 1_000
TARGET_KEEPALIVE_TIMEOUT_MS = 2_000
# The closest pings a server accepts without data between them: half the target link's interval,
# so timer jitter never turns its pings into strikes (a third strike in a row is answered with
# GOAWAY too_many_pings, which would break every stream on the link mid-round).
MIN_RECV_PING_INTERVAL_MS = TARGET_KEEPALIVE_TIME_MS // 2


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for servers and clients alike: both ends must agree on the size limit, and
    long-lived session streams need keepalive pings the server permits (with no data flowing:
    a long target round sends nothing until its verdict; with no calls: a worker's idle link)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_RECV_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def target_link_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """channel_options for a draft worker's channel to its target, with fast keepalive. A link that
    stops carrying bytes while its TCP connection stays up (a blackholed network, a partition that
    sends no reset) is otherwise only noticed by the round deadline, as DEADLINE_EXCEEDED; an
    unanswered ping closes it as UNAVAILABLE within keepalive time + timeout. A target whose model
    thread hangs still answers pings (gRPC's own threads do): that stays the round deadline's case.
    Pings go on without calls and without data (max_pings_without_data 0: no cap on pings before
    data is sent), so a long round and an idle link are watched alike."""
    options = dict(channel_options(max_message_bytes))
    options.update({
        "grpc.keepalive_time_ms": TARGET_KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": TARGET_KEEPALIVE_TIMEOUT_MS,
        # gRPC core (1.85) arms keepalive_timeout only in some transport states; the timeout of every
        # ping (1 min by default) is what fires on a blackholed link, so it gets the same bound.
        "grpc.http2.ping_timeout_ms": TARGET_KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    })
    return list(options.items())


class ActiveCalls:
    """Counts a servicer's in-flight calls and carries its draining flag, so drain can wait for
    the calls to end. Event-loop side only."""

    def __init__(self):
        self.draining = False
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class GrpcServer:
    """A grpc.aio server bound to host:port (port 0 picks a free one: see `.port`). `tls`: serve
    TLS (mutual when it has a CA); None: plaintext. `health_port`: also serve grpc.health.v1 alone,
    in plaintext, on host:health_port (0 picks one: see `.health_address`), for probes that cannot
    speak TLS."""

    def __init__(self, host: str, port: int, service_names: list[str], calls: ActiveCalls,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TlsFiles | None = None,
                 health_port: int | None = None):
        self.server = grpc.aio.server(options=channel_options(max_message_bytes))
        self.calls = calls
        self.service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([*self.service_names, health_name, reflection.SERVICE_NAME], self.server)
        if tls is None:
            warn_if_plaintext(host, f"gRPC ({', '.join(self.service_names)})")
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{host}:{port}", tls.server_credentials())
        if self.port == 0:
            raise RuntimeError(f"could not bind {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.health_server, self.health_address = None, ""
        if health_port is not None:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            bound = self.health_server.add_insecure_port(f"{host}:{health_port}")
            if bound == 0:
                raise RuntimeError(f"could not bind the health port {host}:{health_port}")
            self.health_address = f"{host}:{bound}"

    async def start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
            log.info("health (grpc.health.v1 only, plaintext) on %s", self.health_address)
        for name in ["", *self.service_names]:  # "" is the whole server, as probes ask by default
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float) -> None:
        """NOT_SERVING and refuse new work at once; wait up to grace_s for in-flight calls; stop."""
        self.calls.draining = True
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.calls.wait_idle(), grace_s)
        except asyncio.TimeoutError:
            log.warning("drain: %d call(s) still running after %.1f s; cancelling them", self.calls.count, grace_s)
        await self.server.stop(grace=1.0)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)

    async def serve_until_signalled(self, grace_s: float) -> None:
        """Start, print the ready line (tests and launchers wait for it), drain on SIGTERM/SIGINT."""
        await self.start()
        print(f"READY {self.address}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining (grace %.1f s)", grace_s)
        await self.drain(grace_s)
