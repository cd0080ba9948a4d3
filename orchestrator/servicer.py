"""gRPC servicer of the public dyspec.v1.Generation service: a thin translation of the Gateway."""
from __future__ import annotations

import contextlib
import logging

import grpc

from orchestrator.auth import ApiKeys, grpc_authorization
from orchestrator.gateway import Gateway
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from serving.errors import ServiceError
from serving.grpc_server import ActiveCalls

log = logging.getLogger(__name__)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, gateway: Gateway, calls: ActiveCalls, keys: ApiKeys = ApiKeys()):
        self.gateway, self.calls, self.keys = gateway, calls, keys

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # context.write() rather than yield: a client that cancels raises CancelledError here, and
        # aclosing() then cancels the worker call at once.
        with self.calls.track():
            try:
                caller = self.keys.caller(grpc_authorization(context))
                async with contextlib.aclosing(self.gateway.generate(request, context.time_remaining(),
                                                                     caller)) as stream:
                    async for response in stream:
                        await context.write(response)
            except ServiceError as exc:
                log.info("request %r: %s", request.request_id, exc)
                await context.abort(exc.code, exc.message)
