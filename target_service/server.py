"""A running target: the gRPC frame, the engine on its model thread, and the upkeep task
(idle eviction, tensor-parallel heartbeat). Used by the entry point and by in-process tests."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from serving.grpc_server import ActiveCalls, GrpcServer
from serving.warmup import log_result, warm_up_target
from target_service.backend import LocalBackend, SessionBackend
from target_service.batcher import RoundBatcher
from target_service.config import TargetConfig
from target_service.engine import ModelInfo, VerificationEngine
from target_service.servicer import TargetServicer
from target_service.store import SessionStore

log = logging.getLogger(__name__)
SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetVerification"].full_name


def model_info(model, name: str, config: TargetConfig) -> ModelInfo:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # as dyspec.generate reads it
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos]))
    max_context = config.max_context_tokens or getattr(model.config, "max_position_embeddings", None)
    if not max_context:
        raise ValueError("the model declares no max_position_embeddings: pass --max-context-tokens")
    return ModelInfo(name, int(model.config.vocab_size), eos_ids, int(max_context))


class TargetServer:
    def __init__(self, config: TargetConfig, model, model_name: str, backend: SessionBackend | None = None):
        self.config = config
        self.backend = backend or LocalBackend(model, config.batching.batched_threads)
        store = SessionStore(config.max_sessions, config.max_cached_tokens, config.idle_timeout_s)
        batching = config.batching
        self.engine = VerificationEngine(self.backend, model_info(model, model_name, config), store,
                                         config.max_tree_nodes, batching.max_batch_rows if batching.enabled else 0)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # the one model thread
        self.calls = ActiveCalls()
        self.grpc = GrpcServer(config.host, config.port, [SERVICE_NAME], self.calls, config.max_message_bytes,
                               config.tls, config.health_port)
        self.batcher = RoundBatcher(self.engine, self.executor, config.batching)
        target_pb2_grpc.add_TargetVerificationServicer_to_server(
            TargetServicer(self.engine, self.executor, self.calls, self.batcher, config.tp_size,
                           prefill_at_open=config.prefill_at_open), self.grpc.server)
        self._upkeep: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return self.grpc.address

    async def _upkeep_forever(self) -> None:
        interval = min(1.0, self.config.idle_timeout_s / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            evicted = await loop.run_in_executor(self.executor, self.engine.tick)
            if evicted:
                log.info("evicted idle sessions: %s", evicted)

    async def warm_up(self) -> None:
        """A few dummy rounds through the backend on the model thread (serving.warmup), unless the
        config turns it off. Before the gRPC server starts and before the upkeep ticks: under tensor
        parallelism the followers replay the warm-up's broadcasts like any session's."""
        if not self.config.warmup:
            log.info("warm-up: skipped (--no-warmup)")
            return
        info = self.engine.info
        result = await asyncio.get_running_loop().run_in_executor(
            self.executor, warm_up_target, self.backend, info.vocab_size, info.max_context_tokens,
            self.config.max_tree_nodes)
        log_result(result, "target")

    async def start(self) -> None:
        await self.warm_up()
        await self.grpc.start()
        self._upkeep = asyncio.create_task(self._upkeep_forever())

    async def serve_until_signalled(self) -> None:
        """Warm up, serve (printing READY), drain on SIGTERM/SIGINT. A failed warm-up still shuts the
        backend down (under tensor parallelism: Stop to the followers)."""
        try:
            await self.warm_up()
            self._upkeep = asyncio.create_task(self._upkeep_forever())
            await self.grpc.serve_until_signalled(self.config.drain_grace_s)
        finally:
            await self._shutdown()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain (see GrpcServer.drain) and release the model thread and the backend."""
        await self.grpc.drain(self.config.drain_grace_s if grace_s is None else grace_s)
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.backend.shutdown)
        self.executor.shutdown(wait=True)
