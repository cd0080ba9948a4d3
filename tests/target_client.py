"""A synchronous test client for one TargetVerification.Session stream (send a request, get the
answer, or the RpcError that ended the stream), and an in-process target server to talk to."""
from __future__ import annotations

import contextlib
import queue
from typing import Iterator

import grpc

from proto.dyspec.v1 import sampling_pb2, target_pb2, target_pb2_grpc


def open_request(session_id: str, prompt: list[int], temperature: float = 0.0, seed: int | None = 0,
                 resumable: bool = False, **sampling) -> target_pb2.TargetRequest:
    """An open; `resumable` keeps the session for a resume if the stream is cancelled or breaks."""
    params = sampling_pb2.SamplingParams(temperature=temperature, seed=seed, **sampling)
    return target_pb2.TargetRequest(open=target_pb2.OpenSession(session_id=session_id, prompt_token_ids=prompt,
                                                                sampling=params, resumable=resumable))


class SessionStream:
    def __init__(self, channel: grpc.Channel, timeout: float = 30.0):
        self._requests: queue.Queue = queue.Queue()
        self.call = target_pb2_grpc.TargetVerificationStub(channel).Session(iter(self._requests.get, None),
                                                                            timeout=timeout)

    def send(self, request: target_pb2.TargetRequest) -> target_pb2.TargetResponse:
        self._requests.put(request)
        return next(self.call)

    def post(self, request: target_pb2.TargetRequest) -> None:
        """Send `request` without waiting for its answer (to act while the target works on it)."""
        self._requests.put(request)

    def expect_error(self, request: target_pb2.TargetRequest) -> grpc.RpcError:
        """Send `request`; return the error that ends the stream (fails if an answer comes instead)."""
        self._requests.put(request)
        try:
            answer = next(self.call)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError(f"expected an error, got {answer}")

    def half_close(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        self.call.cancel()


@contextlib.contextmanager
def served_target(config, model, model_name: str = "tiny") -> Iterator[tuple[object, grpc.Channel]]:
    """A TargetServer over `model` in this process (on its own event-loop thread) and a channel to
    it; both stopped on exit."""
    from target_service.server import TargetServer
    from tests.background_loop import BackgroundLoop

    loop = BackgroundLoop()

    async def start():
        server = TargetServer(config, model, model_name)
        await server.start()
        return server

    server = loop.run(start())
    channel = grpc.insecure_channel(server.address)
    try:
        yield server, channel
    finally:
        channel.close()
        loop.run(server.stop(grace_s=1))
        loop.close()
