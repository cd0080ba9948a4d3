"""API keys on the public API: who may call, and a name for each key that is safe to log.

Keys come from `--api-key` (repeatable), `--api-key-file` (one key a line; blank lines and `#`
comments skipped) and `$DYSPEC_API_KEYS` (comma-separated, for a Kubernetes Secret mounted as an
environment variable). With no key configured the API is open, as for loopback development.

Callers send the key as OpenAI clients do, `Authorization: Bearer <key>`: the HTTP header, or the
`authorization` metadata on gRPC. The comparison is constant-time over every configured key (each
is compared, whatever matches), so timing tells nothing about which prefix was right. A key is
never logged or put in a message: it is named by `key-<first 8 hex digits of its SHA-256>`.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.errors import ServiceError

KEYS_ENV = "DYSPEC_API_KEYS"
OPEN = "anonymous"  # the caller's name when no key is configured
_SCHEME = "bearer"


class Unauthenticated(ServiceError):
    """A missing or wrong key: UNAUTHENTICATED on gRPC, 401 on HTTP."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAUTHENTICATED, message)


def key_name(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def read_key_file(path: str | Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"--api-key-file {path}: {error.strerror or error}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path} holds no key")
    return keys


def keys_from(flags: list[str] | None, files: list[str] | None, environ=os.environ) -> tuple[str, ...]:
    """Every configured key, from the flags, the files and $DYSPEC_API_KEYS, without repeats."""
    keys = list(flags or [])
    for path in files or []:
        keys += read_key_file(path)
    keys += [k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    for key in keys:
        if len(key) < 8 or any(c.isspace() for c in key):
            raise ValueError(f"API key {key_name(key)} is too short or holds whitespace: use 8 or more "
                             "non-space characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return tuple(dict.fromkeys(keys))


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def caller(self, authorization: str | None) -> str:
        """The caller's name for an `Authorization` value (None when absent); Unauthenticated if
        keys are required and it carries none of them."""
        if not self.required:
            return OPEN
        if not authorization:
            raise Unauthenticated("missing API key: send it as 'Authorization: Bearer <key>' (HTTP header or gRPC "
                                  "metadata 'authorization')")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != _SCHEME or not token.strip():
            raise Unauthenticated("the authorization value must be 'Bearer <key>'")
        token = token.strip().encode()
        matched = None
        for key in self.keys:  # every key compared, so the time does not depend on which one matches
            if hmac.compare_digest(token, key.encode()):
                matched = key
        if matched is None:
            raise Unauthenticated("invalid API key")
        return key_name(matched)


def grpc_authorization(context: grpc.aio.ServicerContext) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == "authorization":
            return value
    return None
