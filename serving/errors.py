"""The one exception a service raises to end an RPC with a given status code."""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Raised below a servicer; the servicer aborts the call with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message
