"""Typed errors of the client SDK, one per gRPC status a caller handles differently."""
from __future__ import annotations

import grpc


class DySpecError(Exception):
    """Base of every SDK error; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidRequest(DySpecError):
    """The request is malformed or cannot be served as asked (do not retry unchanged)."""


class NotFound(DySpecError):
    """The model (or session) does not exist on the server."""


class Unauthenticated(DySpecError):
    """The server requires an API key and got none, or a wrong one (see Client's api_key)."""


class Overloaded(DySpecError):
    """The server is at capacity; retry later, ideally with backoff."""


class Unavailable(DySpecError):
    """No server (or no worker behind it) could be reached; raised after the SDK's own retries."""


class DeadlineExceeded(DySpecError):
    """The call's deadline passed before the generation finished."""


class Cancelled(DySpecError):
    """The call was cancelled."""


class ServerError(DySpecError):
    """Any other failure on the server side."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest, grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest, grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded, grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded, grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError) -> DySpecError:
    code = error.code()
    return _BY_CODE.get(code, ServerError)(code, error.details() or code.name)
