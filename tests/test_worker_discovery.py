"""Draft workers given as dns:///NAME:PORT: the pool follows what the name resolves to (workers join
after a health check, leave the rotation when gone, keep their in-flight calls), survives a failed
lookup, and bad addresses are refused at startup. Real gRPC health servers on loopback; the
resolver is replaced so one name can stand for several ports."""
from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator import __main__ as orchestrator_main
from orchestrator.config import OrchestratorConfig
from orchestrator.discovery import parse_worker, resolve
from orchestrator.workers import WORKER_SERVICE, WorkerPool


class HealthOnly:
    """A gRPC server on a loopback port that answers grpc.health.v1 for the DraftWorker service."""

    async def start(self) -> "HealthOnly":
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.health.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(None)


class Answers:
    """A resolver whose answer the test sets; None makes the lookup fail like an NXDOMAIN."""

    def __init__(self, *addresses: str):
        self.addresses: list[str] | None = list(addresses)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if self.addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if self.addresses == ["label too long"]:
            raise UnicodeError("encoding with 'idna' codec failed (label too long)")  # as getaddrinfo raises
        return list(self.addresses)


def pool_for(answers: Answers, *extra: str) -> WorkerPool:
    return WorkerPool(("dns:///draft.example:50062", *extra), interval_s=3600, timeout_s=2, max_message_bytes=1 << 20,
                      close_grace_s=30, resolver=answers)


def test_the_pool_follows_what_the_name_resolves_to():
    async def scenario():
        a, b = await HealthOnly().start(), await HealthOnly().start()
        answers = Answers(a.address)
        pool = pool_for(answers)
        try:
            await pool.start()
            assert answers.asked == [("draft.example", 50062)]
            assert pool.addresses() == [a.address] and pool.any_healthy()

            answers.addresses = [a.address, b.address]  # scaled up
            await pool.refresh()
            joined = next(w for w in pool.workers if w.address == b.address)
            assert not joined.healthy, "a discovered worker is routed only after its first health check"
            await pool.check_all()
            assert joined.healthy
            firsts = {pool.order()[0].address for _ in range(4)}
            assert firsts == {a.address, b.address}, "round-robin over both"

            # a's pod goes away while a call on its channel is in flight: the call goes on, a gets no new requests
            leaving = next(w for w in pool.workers if w.address == a.address)
            watch = leaving.health.Watch(health_pb2.HealthCheckRequest(service=WORKER_SERVICE))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            answers.addresses = [b.address]
            await pool.refresh()
            assert pool.addresses() == [b.address] and [w.address for w in pool.order()] == [b.address]
            answers.addresses = [a.address, b.address]  # back while its old channel still drains: a new channel
            await pool.refresh()
            assert sorted(pool.addresses()) == sorted([a.address, b.address]) and len(pool._retired) == 1
            answers.addresses = [b.address]
            await pool.refresh()
            await a.health.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            update = await asyncio.wait_for(watch.read(), 5)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING, "the in-flight call was cut"
            watch.cancel()
            for _ in range(100):  # its channel closes once nothing is in flight
                if not pool._retired:
                    break
                await asyncio.sleep(0.05)
            assert not pool._retired

            for failing in (None, ["label too long"]):  # a failed lookup keeps the last good answer
                answers.addresses = failing
                await pool.refresh()
                assert pool.addresses() == [b.address]

            answers.addresses = []  # scaled to zero
            await pool.refresh()
            assert pool.order() == [] and not pool.any_healthy()
            assert "dns:///draft.example:50062 -> 0 addresses" in pool.describe()
        finally:
            await pool.close()
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_static_workers_stay_and_are_not_duplicated_by_the_name():
    async def scenario():
        a = await HealthOnly().start()
        answers = Answers(a.address)
        pool = pool_for(answers, a.address, a.address)
        try:
            await pool.start()
            assert pool.addresses() == [a.address]
            answers.addresses = []
            await pool.refresh()
            assert pool.addresses() == [a.address], "an address given as itself is never retired"
        finally:
            await pool.close()
            await a.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:50062", ("127.0.0.1", 50062, False)),
    ("draft-0.draft:7", ("draft-0.draft", 7, False)),
    ("[::1]:50062", ("::1", 50062, False)),
    ("dns:///dyspec-draft:50062", ("dyspec-draft", 50062, True)),
    ("dns:///[fd00::5]:1", ("fd00::5", 1, True)),
])
def test_worker_addresses_parse(text, expected):
    spec = parse_worker(text)
    assert (spec.host, spec.port, spec.discover) == expected
    assert spec.text == text


@pytest.mark.parametrize("text", ["dyspec-draft", "dns:///dyspec-draft", "host:0", "host:70000", "host:http", ":50",
                                  "dns:///:50062", "[::1]50062"])
def test_bad_worker_addresses_are_refused_with_the_address_named(text):
    with pytest.raises(ValueError, match="draft worker"):
        parse_worker(text)
    with pytest.raises(ValueError, match="draft worker"):
        OrchestratorConfig(workers=(text,))


def test_the_orchestrator_command_refuses_a_bad_worker_with_usage_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        orchestrator_main.main(["--worker", "dns:///no-port"])
    assert exited.value.code == 2
    assert "draft worker 'dns:///no-port'" in capsys.readouterr().err


def test_resolve_gives_every_address_with_the_port():
    found = asyncio.run(resolve("localhost", 50062))
    assert "127.0.0.1:50062" in found or "[::1]:50062" in found
    assert all(a.endswith(":50062") for a in found) and found == sorted(set(found))
    with pytest.raises(OSError):
        asyncio.run(resolve("no-such-host.invalid", 1))
