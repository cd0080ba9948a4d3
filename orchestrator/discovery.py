"""Draft worker addresses as the orchestrator is given them: `HOST:PORT` is one worker; `dns:///NAME:PORT`
is every address NAME resolves to, looked up again every health interval.

Why: gRPC keeps one HTTP/2 connection per address, so behind one Kubernetes Service address kube-proxy
balances connections, not requests, and one orchestrator sends everything to one draft pod. A headless
Service (clusterIP: None) resolves to the ready pods' own addresses instead; the orchestrator keeps one
channel per pod and routes requests round-robin over them, and a pod that leaves the answer (scaled
down, not ready) stops getting new requests while its in-flight ones finish.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

DNS_PREFIX = "dns:///"


@dataclass(frozen=True)
class WorkerSpec:
    host: str
    port: int
    discover: bool  # True: every address of `host`, re-resolved; False: `host:port` itself

    @property
    def text(self) -> str:
        return (DNS_PREFIX if self.discover else "") + join_host_port(self.host, self.port)


def parse_worker(text: str) -> WorkerSpec:
    """`HOST:PORT`, `[IPV6]:PORT` or `dns:///NAME:PORT`; ValueError with the reason otherwise."""
    discover = text.startswith(DNS_PREFIX)
    rest = text[len(DNS_PREFIX):] if discover else text
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"draft worker {text!r}: expected HOST:PORT or {DNS_PREFIX}NAME:PORT with a port in 1-65535")
    return WorkerSpec(host, int(port), discover)


def join_host_port(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


async def resolve(host: str, port: int) -> list[str]:
    """Every distinct `ADDRESS:PORT` the name resolves to (IPv4 and IPv6), sorted; socket.gaierror
    when it resolves to nothing."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({join_host_port(info[4][0], port) for info in infos})
