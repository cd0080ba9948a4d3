"""Entry point: `python -m orchestrator --worker HOST:PORT [--worker ...] --tokenizer-dir DIR`.
Prints `READY <grpc host:port> <http url>` on stdout once serving."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from orchestrator.auth import keys_from
from orchestrator.config import DEFAULTS as _DEFAULTS, OrchestratorConfig
from orchestrator.tokenizer import TokenizerSource
from serving.tls import TlsFiles, add_tls_arguments, tls_from_args


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
    keys = p.add_argument_group("API keys (orchestrator.auth): none configured means an open API")
    keys.add_argument("--api-key", action="append", metavar="KEY",
                      help="a key callers send as 'Authorization: Bearer KEY' (repeat for several); prefer "
                           "--api-key-file or $DYSPEC_API_KEYS (comma-separated): flags show in `ps`")
    keys.add_argument("--api-key-file", action="append", metavar="PATH", help="one key a line (# comments)")
    keys.add_argument("--max-concurrent-per-key", type=int, default=_DEFAULTS.max_concurrent_per_key,
                      help="requests in flight per key; more get RESOURCE_EXHAUSTED / HTTP 429 (0: no per-key limit)")
    keys.add_argument("--public-metrics", action="store_true",
                      help="serve /metrics without a key (for a Prometheus scraper) even when keys are required")
    limits = p.add_argument_group("request limits (orchestrator.limits), checked before any model work")
    limits.add_argument("--max-context-tokens", type=int, default=_DEFAULTS.max_context_tokens,
                        help="prompt + completion tokens a request may ask for (0: the tokenizer's model_max_length)")
    limits.add_argument("--max-prompt-chars", type=int, default=_DEFAULTS.max_prompt_chars,
                        help="characters of a text prompt, checked before tokenising (0: 32 per context token)")
    limits.add_argument("--max-body-bytes", type=int, default=_DEFAULTS.max_body_bytes,
                        help="HTTP request body size; larger bodies get 413")
    tls = add_tls_arguments(p, "CA bundle the draft workers' certificates must chain to: with it the links to the "
                               "workers are mutual TLS (the public ports never ask callers for a certificate)")
    tls.add_argument("--tls-client-cert", default="", metavar="PEM",
                     help="client certificate to the workers, when it is not --tls-cert (e.g. a public certificate "
                          "on the public ports, one from the workers' CA on the links)")
    tls.add_argument("--tls-client-key", default="", metavar="PEM", help="the private key of --tls-client-cert")
    tls.add_argument("--tls-server-name", default="", metavar="NAME",
                     help="the name the workers' certificates carry, when it is not the host dialled (dns:/// "
                          "workers are dialled by IP)")
    p.add_argument("--log-level", default="INFO")
    return p


def worker_tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """The links to the workers: mutual TLS when --tls-ca is given, with --tls-client-cert (else
    --tls-cert) as the orchestrator's client certificate."""
    client = (args.tls_client_cert, args.tls_client_key)
    if not args.tls_ca:
        if any(client):
            raise ValueError("--tls-client-cert/--tls-client-key need --tls-ca (the CA of the workers' certificates)")
        return None
    if any(client):
        return TlsFiles(*client, args.tls_ca, ("--tls-client-cert", "--tls-client-key", "--tls-ca"))
    if not args.tls_cert:
        raise ValueError("--tls-ca: the links to the workers are mutual TLS; give --tls-cert/--tls-key (or "
                         "--tls-client-cert/--tls-client-key) as the orchestrator's client certificate")
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)


def config_from_args(args: argparse.Namespace) -> OrchestratorConfig:
    return OrchestratorConfig(
        workers=tuple(args.worker), host=args.host, port=args.port, http_host=args.http_host,
        http_port=args.http_port, model_name=args.model_name, max_concurrent=args.max_concurrent,
        default_timeout_s=args.default_timeout_s, default_max_tokens=args.default_max_tokens,
        health_interval_s=args.health_interval_s, log_interval_s=args.log_interval_s,
        max_message_bytes=args.max_message_bytes,
        drain_grace_s=args.drain_grace_s,
        api_keys=keys_from(args.api_key, args.api_key_file), max_concurrent_per_key=args.max_concurrent_per_key,
        public_metrics=args.public_metrics, max_context_tokens=args.max_context_tokens,
        max_prompt_chars=args.max_prompt_chars, max_body_bytes=args.max_body_bytes,
        tls=tls_from_args(args.tls_cert, args.tls_key, ""), worker_tls=worker_tls_from_args(args),
        worker_tls_server_name=args.tls_server_name, health_port=args.health_port)


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
