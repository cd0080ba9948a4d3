"""A synchronous test client for one TargetVerification.Session stream: send a request, get the
answer, or the RpcError that ended the stream."""
from __future__ import annotations

import queue

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
