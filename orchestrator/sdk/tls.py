"""The SDK's channel security: plaintext, or TLS checking the server's certificate.

`tls_ca` is the CA bundle the orchestrator's certificate chains to (a path, or the PEM bytes), for
a private CA such as the one deploy/k8s makes with cert-manager; `tls=True` alone trusts the
system's roots (a publicly trusted certificate). Giving `tls_ca` implies TLS. The public port asks
callers for no certificate: who may call is the API key's business.
"""
from __future__ import annotations

from pathlib import Path

import grpc


def channel_credentials(tls: bool, tls_ca: str | bytes | None) -> grpc.ChannelCredentials | None:
    """None: plaintext (tls False and no CA)."""
    if tls_ca is None:
        return grpc.ssl_channel_credentials() if tls else None
    if not tls_ca:
        raise ValueError("tls_ca is empty: pass a CA bundle (path or PEM bytes), or None with tls=True for the "
                         "system's roots")
    return grpc.ssl_channel_credentials(root_certificates=tls_ca if isinstance(tls_ca, bytes)
                                        else Path(tls_ca).read_bytes())


def server_name_options(tls_server_name: str) -> list[tuple[str, str]]:
    """Check the certificate for this name instead of the host dialled (e.g. dialling an IP)."""
    return [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
