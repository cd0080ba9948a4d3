"""Entry point: `python -m target_service --model-dir DIR` (or `--model-factory MODULE:FUNCTION`).

Tensor parallel: `deepspeed --num_gpus N --module target_service --tp-size N ...` (on CPU set
DS_ACCELERATOR=cpu). Every rank runs this module; rank 0 serves gRPC and the others follow it.
Prints `READY host:port` on stdout once warmed up (`--no-warmup` skips that) and serving; logs go to
stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from serving.models import ModelSource, add_model_arguments, hand_threads_to_kernels, model_source_from_args
from serving.tls import add_tls_arguments, mutual_tls_from_args
from target_service.config import BatchingConfig, TargetConfig

_DEFAULTS = TargetConfig()


def _window_ms(text: str) -> float | None:
    """--batch-window-ms: a number of milliseconds >= 0, or auto (None)."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m target_service",
                                description="DySpec target: verifies draft token trees over gRPC (dyspec.v1.TargetVerification).")
    p.add_argument("--host", default=_DEFAULTS.host)
    p.add_argument("--port", type=int, default=_DEFAULTS.port, help="0 picks a free port")
    p.add_argument("--tp-size", type=int, default=_DEFAULTS.tp_size, help="tensor-parallel ranks (deepspeed launcher)")
    p.add_argument("--max-sessions", type=int, default=_DEFAULTS.max_sessions)
    p.add_argument("--max-cached-tokens", type=int, default=_DEFAULTS.max_cached_tokens,
                   help="committed tokens summed over all sessions")
    p.add_argument("--idle-timeout-s", type=float, default=_DEFAULTS.idle_timeout_s)
    p.add_argument("--max-tree-nodes", type=int, default=_DEFAULTS.max_tree_nodes)
    p.add_argument("--max-context-tokens", type=int, default=_DEFAULTS.max_context_tokens,
                   help="0: the model's max_position_embeddings")
    p.add_argument("--max-message-bytes", type=int, default=_DEFAULTS.max_message_bytes)
    p.add_argument("--drain-grace-s", type=float, default=_DEFAULTS.drain_grace_s)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="serve at once; by default a few dummy rounds run first (logged as 'warm-up: N forwards in "
                        "X s'), so the first request does not pay for paging the weights in")
    p.add_argument("--no-prefill-at-open", dest="prefill_at_open", action="store_false",
                   help="forward a session's prompt with its first tree instead of right after the open")
    batching = p.add_argument_group("batching", "rounds of many sessions verified in one forward")
    batching.add_argument("--no-batching", dest="batching", action="store_false",
                          help="one round per forward, in arrival order")
    batching.add_argument("--max-batch-rows", type=int, default=_DEFAULTS.batching.max_batch_rows,
                          help="rows in one forward over all its sessions (uncached suffixes, roots, tree nodes)")
    batching.add_argument("--batch-window-ms", type=_window_ms, default=None, metavar="MS|auto",
                          help="how long a forward may wait for open sessions whose round has not arrived yet "
                               "(default auto: a tenth of the recent forward time, at most 50 ms, for sessions in "
                               "plain decoding; drafting sessions until their next round is due, if due within "
                               "a forward)")
    batching.add_argument("--batched-threads", type=int, default=_DEFAULTS.batching.batched_threads, metavar="N",
                          help="threads for prompt prefills while two or more sessions are open, and for "
                               "round forwards while, besides, no session outside the forward is being drafted for "
                               "(its last round carried a tree) (default 0: the process's "
                               "own count, OMP_NUM_THREADS; on our kernels the kernels take them, torch's ops "
                               "keep one); for a target that shares its machine with draft workers, whose cores "
                               "idle then (tensor parallelism: not used)")
    p.add_argument("--log-level", default="INFO")
    add_model_arguments(p)
    add_tls_arguments(p, "CA bundle of the draft workers' client certificates: with it the port is mutual TLS and "
                         "refuses callers without one (give all three --tls-* flags or none)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def config_from_args(args: argparse.Namespace) -> TargetConfig:
    return TargetConfig(args.host, args.port, args.tp_size, args.max_sessions, args.max_cached_tokens,
                        args.idle_timeout_s, args.max_tree_nodes, args.max_context_tokens, args.max_message_bytes,
                        args.drain_grace_s, warmup=args.warmup, tls=mutual_tls_from_args(args),
                        health_port=args.health_port,
                        batching=BatchingConfig(args.batching, args.max_batch_rows, _seconds(args.batch_window_ms),
                                                args.batched_threads),
                        prefill_at_open=args.prefill_at_open)


def load_rank_model(config: TargetConfig, source: ModelSource, world_size: int):
    """This rank's model. With tensor parallelism it first joins the process group, which whoever
    started the process describes in torch.distributed's env:// variables (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK; LOCAL_SIZE for DeepSpeed's CPU all-reduce): the deepspeed
    launcher, a Ray actor (deploy/ray) or a Kubernetes pod (deploy/k8s)."""
    from target_service.model import init_tensor_parallel, load_target_model  # heavy imports after --help

    if config.tp_size > 1 or world_size > 1:
        init_tensor_parallel(config.tp_size, world_size)
    return load_target_model(source, config.tp_size)


def build_server(config: TargetConfig, model, source: ModelSource):
    """Rank 0's server; build it inside the event loop that will run it. Ranks > 0 run
    target_service.tp.follow(model) instead."""
    from target_service.server import TargetServer
    from target_service.tp import MirroredBackend

    backend = MirroredBackend(model) if config.tp_size > 1 else None
    return TargetServer(config, model, source.display_name, backend)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a TLS file missing or mismatched, a bad limit: usage and exit 2
        parser.error(str(exc))
    source = model_source_from_args(args)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    model = load_rank_model(config, source, world_size)
    hand_threads_to_kernels(model)
    if rank > 0:
        from target_service.tp import follow

        # A signal reaches every rank at once; only rank 0 may act on it (drain, then broadcast Stop).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow(model)
        return 0

    async def serve() -> None:  # the aio server must be built inside the loop that runs it
        await build_server(config, model, source).serve_until_signalled()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
