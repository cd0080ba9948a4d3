"""The target model: loaded from its source and, for tp_size > 1, sharded by DeepSpeed AutoTP.

Kernel injection stays off: it mishandles custom attention masks and multi-token inputs with a KV
cache, and cannot run on CPU; AutoTP keeps the transformers modeling code, which takes our tree
mask and position ids unchanged.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

from serving.models import DRAFT_ONLY_DTYPES, TARGET_DTYPES, ModelSource, enable_row_exact_attention, load_causal_lm, load_target_lm

SHM_DIR = "/dev/shm"
log = logging.getLogger(__name__)


def init_tensor_parallel(tp_size: int, world_size: int) -> None:
    """Join the process group the deepspeed launcher set up (gloo on CPU)."""
    if world_size != tp_size:
        raise SystemExit(f"--tp-size {tp_size} needs {tp_size} processes, found WORLD_SIZE={world_size}: start with "
                         f"`deepspeed --num_gpus {tp_size} --module target_service --tp-size {tp_size} ...`")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None  # None: the accelerator's own (nccl)
    # The followers block in a broadcast between rounds; rank 0's heartbeat (target_service.tp) keeps
    # the wait far below this timeout, which is then only a guard against a dead rank 0.
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=10))
    unlink_shm_allreduce_buffer()


def shm_allreduce_buffer_name(rank: int, env=os.environ) -> str:
    """The POSIX shared-memory name of DeepSpeed's CPU all-reduce workspace for `rank`
    (ops/csrc/cpu/comm/shm.cpp: deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def unlink_shm_allreduce_buffer(shm_dir: str = SHM_DIR) -> bool:
    """Remove this rank's all-reduce workspace name once every rank has mapped every workspace.

    DeepSpeed creates one 64 MiB shared-memory file per rank when the ranks share a host and never
    unlinks it: every start of a TP target left 64 MiB per rank in /dev/shm (RAM), found as 5.9 GiB
    of stale buffers on the test machine. init_distributed returns on a rank only after it mapped all
    the others' workspaces, so after a barrier the names are no longer needed: the mappings live on
    until the processes exit, and nothing is left behind, not even after a kill. Returns whether a
    file was removed (False when DeepSpeed used no shared memory, e.g. ranks on several hosts)."""
    import torch.distributed as dist

    dist.barrier()
    name = shm_allreduce_buffer_name(dist.get_rank())
    try:
        os.unlink(os.path.join(shm_dir, name))
    except FileNotFoundError:
        return False
    log.info("rank %d: unlinked the mapped shared-memory all-reduce workspace %s", dist.get_rank(), name)
    return True


def load_target_model(source: ModelSource, tp_size: int):
    if source.dtype in DRAFT_ONLY_DTYPES:  # the command line refuses it already; this guards other callers
        raise ValueError(f"dtype {source.dtype} is for draft workers only; a target runs one of {', '.join(TARGET_DTYPES)}")
    if tp_size == 1:
        return load_target_lm(source)
    model = load_causal_lm(source, device="cpu", prepack=False)  # DeepSpeed moves each rank's shard to its device
    import deepspeed

    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=next(model.parameters()).dtype,
                                      replace_with_kernel_inject=False)
    model = engine.module.eval()
    if source.resolved_device() == "cpu":
        from engine.prepack import prepack_linears

        prepack_linears(model, source.kernels)  # each rank packs its own shards; collectives stay DeepSpeed's
        enable_row_exact_attention(model, source.kernels)  # each rank attends over its own heads
    return model
