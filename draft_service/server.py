"""A running draft worker: the gRPC frame around the DraftWorker servicer. Used by the entry
point and by in-process callers (the orchestrator's tests may embed one)."""
from __future__ import annotations

import asyncio
import logging

from draft_service.budget import BudgetPolicy, FixedBudget, as_policy
from draft_service.config import DraftConfig
from draft_service.servicer import DraftWorkerServicer
from draft_service.tuned_budget import TunedBudget
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from serving.grpc_server import ActiveCalls, GrpcServer
from serving.warmup import log_result, warm_up_draft

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["DraftWorker"].full_name


def default_policy(config: DraftConfig) -> BudgetPolicy:
    """A fixed budget when configured, else a BudgetTuner per session."""
    if config.budget > 0:
        fixed = FixedBudget(config.budget)
        return lambda sampling, shape=None: fixed
    return TunedBudget(config.max_budget, joint=config.joint_budget)


class DraftServer:
    def __init__(self, config: DraftConfig, draft_model, tokenizer=None, budget_policy: BudgetPolicy | None = None):
        self.config = config
        self.calls = ActiveCalls()
        policy = as_policy(budget_policy) if budget_policy is not None else default_policy(config)
        self.servicer = DraftWorkerServicer(config, draft_model, tokenizer, policy, self.calls)
        self.grpc = GrpcServer(config.host, config.port, [SERVICE_NAME], self.calls, config.max_message_bytes,
                               config.tls, config.health_port)
        generation_pb2_grpc.add_DraftWorkerServicer_to_server(self.servicer, self.grpc.server)

    @property
    def address(self) -> str:
        return self.grpc.address

    async def warm_up(self) -> None:
        """A few dummy draft forwards (serving.warmup) on a draft thread, unless the config turns it off."""
        if not self.config.warmup:
            log.info("warm-up: skipped (--no-warmup)")
            return
        result = await asyncio.get_running_loop().run_in_executor(self.servicer.executor, warm_up_draft,
                                                                  self.servicer.draft_model)
        log_result(result, "draft")

    async def start(self) -> None:
        await self.warm_up()
        await self.grpc.start()

    async def serve_until_signalled(self) -> None:
        """Warm up, serve (printing READY), drain on SIGTERM/SIGINT."""
        try:
            await self.warm_up()
            await self.grpc.serve_until_signalled(self.config.drain_grace_s)
        finally:
            await self.servicer.close()

    async def stop(self, grace_s: float | None = None) -> None:
        await self.grpc.drain(self.config.drain_grace_s if grace_s is None else grace_s)
        await self.servicer.close()
