"""TLS for every port: the PEM files a service is given, checked at start, and the gRPC and HTTPS
credentials made from them.

One certificate per service, with both the serverAuth and clientAuth usages: a service serves its
port with it and presents it as its client certificate on the links it opens (draft worker ->
target, orchestrator -> draft workers). A CA bundle given to a server makes its port mutual TLS
(a client must present a certificate that chains to the bundle); given to a client, it is what
the server's certificate must chain to. No files at all is plaintext, for loopback development.

Files are read when a server or channel is made: a renewed certificate takes effect on restart.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")


def _check_readable(path: str, flag: str) -> None:
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                raise ValueError(f"{flag} {path}: the file is empty")
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class TlsFiles:
    """Paths of PEM files. `cert` and `key` go together: this process's certificate chain and
    private key (its server identity, and its client certificate on the channels it opens).
    `ca`: the bundle peers' certificates must chain to ("" on a server: clients are not asked for
    a certificate; on a client: the system's roots)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    # The flags the paths came from, so errors name what the user typed.
    flags: tuple[str, str, str] = field(default=FLAGS, repr=False, compare=False)

    def __post_init__(self):
        cert_flag, key_flag, ca_flag = self.flags
        if bool(self.cert) != bool(self.key):
            raise ValueError(f"{cert_flag} and {key_flag} go together (a certificate and its private key)")
        if not (self.cert or self.ca):
            raise ValueError(f"give {cert_flag} and {key_flag}, or {ca_flag}, or none of them (plaintext)")
        for path, flag in ((self.cert, cert_flag), (self.key, key_flag), (self.ca, ca_flag)):
            if path:
                _check_readable(path, flag)
        # Catch a mismatched pair or a bundle with no certificate now, not as a failed handshake later.
        if self.cert:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
            except ssl.SSLError as exc:
                raise ValueError(f"{cert_flag} {self.cert} / {key_flag} {self.key}: not a PEM certificate and "
                                 f"its private key ({exc.reason or exc})") from None
        if self.ca:
            try:
                ssl.create_default_context(cafile=self.ca)
            except ssl.SSLError as exc:
                raise ValueError(f"{ca_flag} {self.ca}: not a PEM CA bundle ({exc.reason or exc})") from None

    @property
    def mutual(self) -> bool:
        """As a server: clients must present a certificate signed by `ca`."""
        return bool(self.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.cert:
            raise ValueError(f"a TLS server needs {self.flags[0]} and {self.flags[1]}")
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))],
                                           root_certificates=_read(self.ca) if self.ca else None,
                                           require_client_auth=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca) if self.ca else None,
                                            private_key=_read(self.key) if self.key else None,
                                            certificate_chain=_read(self.cert) if self.cert else None)

    def server_ssl_context(self) -> ssl.SSLContext:
        """For an HTTPS server (aiohttp's TCPSite ssl_context)."""
        if not self.cert:
            raise ValueError(f"an HTTPS server needs {self.flags[0]} and {self.flags[1]}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.mutual:
            context.load_verify_locations(cafile=self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def add_tls_arguments(parser: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    """--tls-cert, --tls-key, --tls-ca and --health-port in a group; `what`: the help of --tls-ca."""
    group = parser.add_argument_group("TLS (serving.tls): without these flags the port is plaintext, for "
                                      "loopback development")
    group.add_argument("--tls-cert", default="", metavar="PEM",
                       help="this service's certificate chain (server, and client certificate on its own links)")
    group.add_argument("--tls-key", default="", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument("--tls-ca", default="", metavar="PEM", help=what)
    group.add_argument("--health-port", type=int, default=None, metavar="PORT",
                       help="also serve grpc.health.v1 alone, in plaintext, on this port (0 picks one): for "
                            "probes that speak no TLS, such as Kubernetes' native gRPC probes")
    return group


def tls_from_args(cert: str, key: str, ca: str, flags: tuple[str, str, str] = FLAGS) -> TlsFiles | None:
    """None when no path is given (plaintext); else the checked files (ValueError naming the flag)."""
    if not (cert or key or ca):
        return None
    return TlsFiles(cert, key, ca, flags)


def mutual_tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """For the services whose port is a link between services (target, draft worker): all three
    files or none, since such a link is mutual TLS."""
    given = [bool(args.tls_cert), bool(args.tls_key), bool(args.tls_ca)]
    if any(given) and not all(given):
        raise ValueError("--tls-cert, --tls-key and --tls-ca go together: links between services are mutual TLS")
    return tls_from_args(args.tls_cert, args.tls_key, args.tls_ca)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def warn_if_plaintext(host: str, what: str) -> None:
    if not is_loopback(host):
        log.warning("%s on %s is plaintext: pass --tls-cert/--tls-key (and --tls-ca for mutual TLS) off "
                    "loopback", what, host)


def name_override(server_name: str) -> list[tuple[str, str]]:
    """Channel options that check the server's certificate for `server_name` instead of the host
    dialled: pods are dialled by IP (a headless Service's addresses, Ray nodes), their certificates
    name the Service."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def aio_channel(address: str, tls: TlsFiles | None, options: list, server_name: str = "") -> grpc.aio.Channel:
    """A grpc.aio channel: plaintext when `tls` is None, else TLS with `tls`'s client certificate."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options + name_override(server_name))
