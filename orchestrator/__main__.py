"""Entry point: `python -m orchestrator --worker HOST:PORT [--worker ...] --tokenizer-dir DIR`.
Prints `READY <grpc host:port> <http url>` on stdout once serving."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from orchestrator.config import DEFAULTS as _DEFAULTS, OrchestratorConfig
from orchestrator.tokenizer import TokenizerSource


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator",
                                description="DySpec orchestrator: the public gRPC Generation service and an "
                                            "OpenAI-compatible HTTP server, routing to draft workers.")
    p.add_argument("--worker", action="append", required=True, metavar="HOST:PORT",
                   help="a draft worker (repeat for several; requests go round-robin over the healthy ones); "
                        "dns:///NAME:PORT is every address NAME resolves to, looked up again each health interval "
                        "(a Kubernetes headless Service)")
    p.add_argument("--host", default=_DEFAULTS.host, help="gRPC bind host")
    p.add_argument("--port", type=int, default=_DEFAULTS.port, help="gRPC port; 0 picks a free port")
    p.add_argument("--http-host", default=_DEFAULTS.http_host)
    p.add_argument("--http-port", type=int, default=_DEFAULTS.http_port, help="HTTP port; 0 picks a free port")
    tokenizer = p.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer-dir", help="transformers tokenizer (or model) folder; without a tokenizer "
                                                   "only token-id prompts are accepted")
    tokenizer.add_argument("--tokenizer-factory", metavar="MODULE:FUNCTION",
                           help="callable returning a tokenizer, e.g. tests.char_tokenizer:char_tokenizer")
    p.add_argument("--tokenizer-kwargs", default="{}", metavar="JSON", help="keyword arguments for the factory")
    p.add_argument("--model-name", default=_DEFAULTS.model_name, help="public model name (/v1/models)")
    p.add_argument("--max-concurrent", type=int, default=_DEFAULTS.max_concurrent,
                   help="requests in flight; more get RESOURCE_EXHAUSTED / HTTP 429")
    p.add_argument("--default-timeout-s", type=float, default=_DEFAULTS.default_timeout_s,
                   help="deadline of requests that carry none (HTTP requests)")
    p.add_argument("--default-max-tokens", type=int, default=_DEFAULTS.default_max_tokens,
                   help="OpenAI requests without max_tokens")
    p.add_argument("--health-interval-s", type=float, default=_DEFAULTS.health_interval_s)
    p.add_argument("--log-interval-s", type=float, default=_DEFAULTS.log_interval_s,
                   help="between summary lines in the log (throughput, acceptance)")
    p.add_argument("--max-message-bytes", type=int, default=_DEFAULTS.max_message_bytes)
    p.add_argument("--drain-grace-s", type=float, default=_DEFAULTS.drain_grace_s)
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> OrchestratorConfig:
    return OrchestratorConfig(
        workers=tuple(args.worker), host=args.host, port=args.port, http_host=args.http_host,
        http_port=args.http_port, model_name=args.model_name, max_concurrent=args.max_concurrent,
        default_timeout_s=args.default_timeout_s, default_max_tokens=args.default_max_tokens,
        health_interval_s=args.health_interval_s, log_interval_s=args.log_interval_s,
        max_message_bytes=args.max_message_bytes,
        drain_grace_s=args.drain_grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a bad address or limit: usage and exit 2, not a traceback
        parser.error(str(exc))
    source = TokenizerSource(args.tokenizer_dir, args.tokenizer_factory, args.tokenizer_kwargs)

    from orchestrator.server import OrchestratorServer  # heavy imports after --help
    from orchestrator.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)

    async def serve() -> None:  # the aio servers must be built inside the loop that runs them
        await OrchestratorServer(config, tokenizer).serve_until_signalled()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
