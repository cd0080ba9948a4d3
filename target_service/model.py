"""The target model: loaded from its source and, for tp_size > 1, sharded by DeepSpeed AutoTP.

Kernel injection stays off: it mishandles custom attention masks and multi-token inputs with a KV
cache, and cannot run on CPU; AutoTP keeps the transformers modeling code, which takes our tree
mask and position ids unchanged.
"""
from __future__ import annotations

from datetime import timedelta

from serving.models import ModelSource, load_causal_lm


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


def load_target_model(source: ModelSource, tp_size: int):
    if tp_size == 1:
        return load_causal_lm(source)
    model = load_causal_lm(source, device="cpu")  # DeepSpeed moves each rank's shard to its device
    import deepspeed

    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=next(model.parameters()).dtype,
                                      replace_with_kernel_inject=False)
    return engine.module.eval()
