"""Entry point: `python -m draft_service --target-address HOST:PORT --model-dir DIR`
(or `--model-factory MODULE:FUNCTION`). Prints `READY host:port` on stdout once warmed up
(`--no-warmup` skips that) and serving."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from dyspec import METHODS
from dyspec.warp import SamplingParams
from draft_service.config import DraftConfig
from serving.models import DRAFT_FORWARDS, add_model_arguments, model_source_from_args
from serving.tls import add_tls_arguments, mutual_tls_from_args

_DEFAULTS = DraftConfig(target_address="")


def _budget(text: str) -> int:
    """'auto' is 0 in DraftConfig."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a fixed budget must be >= 1 (or 'auto'), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m draft_service",
                                description="DySpec draft worker: drafts token trees and drives the decode loop "
                                            "against a target (dyspec.v1.DraftWorker).")
    p.add_argument("--host", default=_DEFAULTS.host)
    p.add_argument("--port", type=int, default=_DEFAULTS.port, help="0 picks a free port")
    p.add_argument("--target-address", required=True, help="target service host:port")
    p.add_argument("--method", choices=METHODS, default=_DEFAULTS.method, help="default tree builder")
    p.add_argument("--budget", type=_budget, default=_DEFAULTS.budget, metavar="auto|N",
                   help="tree budget (nodes per round) for requests that leave it 0: 'auto' (default) tunes it per "
                        "session from measured costs and acceptance; N fixes it")
    p.add_argument("--max-budget", type=int, default=_DEFAULTS.max_budget, help="largest tree 'auto' may choose")
    p.add_argument("--deadline-s", type=float, default=_DEFAULTS.deadline_s, help="per-round deadline")
    p.add_argument("--prefill-s-per-token", type=float, default=_DEFAULTS.prefill_s_per_token,
                   help="added to the first round's deadline per prompt token (that round carries the prefill)")
    p.add_argument("--max-sessions", type=int, default=_DEFAULTS.max_sessions)
    p.add_argument("--draft-temperature", type=float, default=_DEFAULTS.draft_sampling.temperature)
    p.add_argument("--draft-top-k", type=int, default=_DEFAULTS.draft_sampling.top_k)
    p.add_argument("--draft-top-p", type=float, default=_DEFAULTS.draft_sampling.top_p)
    p.add_argument("--max-message-bytes", type=int, default=_DEFAULTS.max_message_bytes)
    p.add_argument("--drain-grace-s", type=float, default=_DEFAULTS.drain_grace_s)
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="draft the next tree while the target verifies: on, off (serial rounds), or auto (default): "
                        "on when the target is on another host, off on loopback, where both share one machine")
    p.add_argument("--no-overlap", dest="overlap", action="store_const", const="off", help="--overlap off")
    p.add_argument("--no-joint-budget", dest="joint_budget", action="store_false",
                   help="budget auto: size each session's tree alone, even while sessions share target forwards")
    p.add_argument("--no-batch-drafting", dest="batch_drafting", action="store_false",
                   help="each session forwards the draft on its own thread, even when others draft at the same time")
    p.add_argument("--draft-forward", choices=DRAFT_FORWARDS, default="native",
                   help="native (default): the lean forward, with a 4-bit draft's forwards of up to 8 rows on the CPU "
                        "as one native call each (engine.native_draft); lean: Llama / Qwen2 drafts run "
                        "engine.lean_decoder's forward (stacked q/k/v and gate/up, about a third of transformers' ops "
                        "a layer); transformers: the model's own forward. Other architectures always run their own")
    p.add_argument("--static-kv-tokens", type=int, default=0, metavar="N",
                   help="with the lean forward: allocate each session's KV cache once at N tokens (prompt + output "
                        "must fit) and run forwards of up to 64 rows padded to a bucket, as CUDA graphs on a GPU "
                        "(engine.graphed_forward; written for GPUs, not yet measured on one). 0 (default): growing caches")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="serve at once; by default a few dummy draft forwards run first (logged as 'warm-up: N "
                        "forwards in X s'), so the first request does not pay for paging the weights in")
    p.add_argument("--log-level", default="INFO")
    add_model_arguments(p, draft=True)
    tls = add_tls_arguments(p, "CA bundle for both links: callers (the orchestrator) must present a certificate "
                               "from it, and the target's certificate must chain to it; --tls-cert is also this "
                               "worker's client certificate to the target (give all three --tls-* flags or none)")
    tls.add_argument("--tls-server-name", default="", metavar="NAME",
                     help="the name the target's certificate carries, when it is not the host of --target-address")
    return p


def config_from_args(args: argparse.Namespace) -> DraftConfig:
    sampling = SamplingParams(args.draft_temperature, args.draft_top_k, args.draft_top_p)
    return DraftConfig(args.target_address, args.host, args.port, args.method, args.budget, args.max_budget,
                       args.deadline_s, args.max_sessions, sampling, args.max_message_bytes, args.drain_grace_s,
                       {"auto": None, "on": True, "off": False}[args.overlap],
                       warmup=args.warmup, prefill_s_per_token=args.prefill_s_per_token,
                       tls=mutual_tls_from_args(args), tls_server_name=args.tls_server_name,
                       health_port=args.health_port, joint_budget=args.joint_budget,
                       batch_drafting=args.batch_drafting)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a TLS file missing or mismatched, a bad limit: usage and exit 2
        parser.error(str(exc))
    source = model_source_from_args(args)
    if args.static_kv_tokens < 0:
        parser.error(f"--static-kv-tokens must be >= 0, got {args.static_kv_tokens}")

    from draft_service.server import DraftServer  # heavy imports after --help
    from serving.models import hand_threads_to_kernels, load_draft_lm, load_tokenizer

    model = load_draft_lm(source, forward=args.draft_forward, static_kv_tokens=args.static_kv_tokens)
    hand_threads_to_kernels(model)
    tokenizer = load_tokenizer(source)

    async def serve() -> None:  # the aio server must be built inside the loop that runs it
        await DraftServer(config, model, tokenizer).serve_until_signalled()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
