"""The target with tp_size=2 (DeepSpeed AutoTP over gloo, under the `deepspeed` launcher) gives
the same tokens as the single-process target, i.e. as in-process dyspec.generate.

Slow on a fresh machine: DeepSpeed compiles its shared-memory all-reduce op on first use (about
a minute here; cached in ~/.cache/torch_extensions afterwards), then two ranks import torch,
transformers and DeepSpeed side by side on two cores.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from draft_service.config import DraftConfig
from draft_service.server import DraftServer
from dyspec import generate
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2, target_pb2, target_pb2_grpc
from tests import service_models
from tests.background_loop import BackgroundLoop
from tests.service_process import ServiceProcess, free_port
from tests.tiny_models import greedy_reference
from tests.worker_responses import streamed_tokens

PROMPT = [3, 1, 4, 1, 5]
NEW_TOKENS = 24
BUDGET = 8
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tp_target(tmp_path_factory):
    launcher = Path(sys.executable).parent / "deepspeed"
    master_port = free_port()
    argv = [str(launcher), "--num_gpus", "2", "--master_port", str(master_port), "--module", "target_service",
            "--host", "127.0.0.1", "--port", "0", "--tp-size", "2", "--model-factory", "tests.service_models:target"]
    target = ServiceProcess(argv, tmp_path_factory.mktemp("logs") / "target_tp.log")
    target.master_port = master_port
    try:
        target.wait_ready(170)
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="module")
def worker(tp_target):
    """An in-process draft worker (the draft side is not under test here)."""
    loop = BackgroundLoop()
    draft_model = service_models.draft()

    async def start():
        server = DraftServer(DraftConfig(target_address=tp_target.address, port=0, budget=BUDGET), draft_model)
        await server.start()
        return server

    server = loop.run(start())
    with grpc.insecure_channel(server.address) as channel:
        yield generation_pb2_grpc.DraftWorkerStub(channel)
    loop.run(server.stop(grace_s=1))
    loop.close()


def run(worker, method: str, prompt: list[int] = PROMPT, **sampling) -> list[int]:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt), max_new_tokens=NEW_TOKENS,
                                             method=method, sampling=sampling_pb2.SamplingParams(**sampling))
    responses = worker.Generate(generation_pb2.WorkerGenerateRequest(request=request), timeout=120)
    return streamed_tokens(responses)


def test_tensor_parallel_target_gives_the_single_process_tokens(tp_target, worker):
    with grpc.insecure_channel(tp_target.address) as channel:
        stats = target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)
    assert stats.tp_size == 2
    # Each rank packed its own shards, the row-parallel ones included (their all-reduce kept).
    packed_lines = [line for line in tp_target.log_path.read_text().splitlines() if "engine.prepack" in line]
    assert len(packed_lines) == 2 and all("stock: none" in line for line in packed_lines), packed_lines
    models = service_models.target(), service_models.draft()
    greedy = generate(*models, PROMPT, max_new_tokens=NEW_TOKENS, method="autoregressive").tokens
    assert run(worker, "autoregressive", seed=0) == greedy
    assert run(worker, "dyspec", seed=0) == greedy
    sampled = generate(*models, PROMPT, max_new_tokens=NEW_TOKENS, method="dyspec", budget=BUDGET, temperature=0.8,
                       seed=7, **service_models.worker_draft_settings()).tokens
    # Ranks' logits differ from one process's by ~1e-6; a seeded sample flips only if a uniform
    # lands that close to a threshold (fixed seed: deterministic, not flaky).
    assert run(worker, "dyspec", temperature=0.8, seed=7) == sampled
    with grpc.insecure_channel(tp_target.address) as channel:
        after = target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)
    # every session's prompt was prefilled at open, on both ranks (a rank that missed it would hang the group)
    assert after.prefilled_tokens - stats.prefilled_tokens == 3 * (len(PROMPT) - 1)


def test_tensor_parallel_target_leaves_no_shared_memory_behind(tp_target, worker):
    """DeepSpeed's CPU all-reduce workspaces (64 MiB of /dev/shm per rank, never unlinked by
    DeepSpeed) are unlinked once every rank has mapped them: a running TP target, which has just
    served all-reduces through them, has none left on disk."""
    assert run(worker, "dyspec", seed=0)  # the ranks all-reduce through the mapped workspaces
    names = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{tp_target.master_port}_*"))
    assert names == []
    log = tp_target.log_path.read_text()
    for rank in (0, 1):  # they did exist: each rank removed its own
        assert f"rank {rank}: unlinked the mapped shared-memory all-reduce workspace deepspeed_allreduce_buffer_" in log


def test_tensor_parallel_target_batches_concurrent_sessions_and_keeps_their_tokens(tp_target, worker):
    """Rounds of several sessions share a forward on every rank (the followers replay one
    ForwardBatch), and each session still gets target-only greedy decoding."""
    prompts = [[3, 1, 4], [2, 7, 1, 8, 2, 8], [6], [5, 3, 5, 8, 9, 7, 9, 3]]
    stub = target_pb2_grpc.TargetVerificationStub(grpc.insecure_channel(tp_target.address))
    before = stub.Stats(target_pb2.TargetStatsRequest(), timeout=5)
    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(lambda p: run(worker, "dyspec", p, seed=0), prompts))
    after = stub.Stats(target_pb2.TargetStatsRequest(), timeout=5)
    model = service_models.target()
    assert outputs == [greedy_reference(model, p, NEW_TOKENS) for p in prompts]
    assert after.batched_rounds > before.batched_rounds, "no two sessions' rounds met in one forward"
