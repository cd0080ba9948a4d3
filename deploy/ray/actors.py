"""The Ray actors that host the services. Each parses the service's own command line
(`build_parser`, `config_from_args`) and calls the functions its `python -m` entry point calls,
so an actor is the plain process minus signal handling: `drain` stands in for SIGTERM.

Constructors do all the work (load, join, serve): after a restart Ray only reruns `__init__`, and a
restarted worker must come back serving on the same port. Heavy imports stay inside the
constructors so the actor's environment (OMP_NUM_THREADS, DS_ACCELERATOR, the torch.distributed
variables) is in place before torch and DeepSpeed load.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

import ray

from deploy.ray.server_thread import ServerThread


def _parse(build_parser, argv: list[str], bind_host: str | None, host_flags: tuple[str, ...] = ("--host",)):
    """The service's own parse of `argv`, bound to `bind_host` (default: this node's address)."""
    host = bind_host or ray.util.get_node_ip_address()
    args = build_parser().parse_args([*argv, *(part for flag in host_flags for part in (flag, host))])
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args


def _advertised(bound: str) -> str:
    """How other nodes reach a server bound at `bound` (host:port; the host may be 0.0.0.0)."""
    return f"{ray.util.get_node_ip_address()}:{bound.rsplit(':', 1)[1]}"


class TargetRank:
    """Rank RANK of WORLD_SIZE of the target (`dist_env`: torch.distributed's env:// variables).
    Rank 0 serves gRPC and mirrors every command to the others, which follow it (target_service.tp)."""

    def __init__(self, argv: list[str], dist_env: dict[str, str], bind_host: str | None = None):
        os.environ.update(dist_env)
        from serving.models import model_source_from_args
        from target_service.__main__ import build_parser, build_server, config_from_args, load_rank_model
        from target_service.tp import follow

        args = _parse(build_parser, argv, bind_host)
        config, source = config_from_args(args), model_source_from_args(args)
        model = load_rank_model(config, source, int(dist_env["WORLD_SIZE"]))
        self._served: ServerThread | None = None
        self._follower: threading.Thread | None = None
        if int(dist_env["RANK"]) == 0:
            self._served = ServerThread(lambda: build_server(config, model, source), "target-grpc")
        else:  # returns when rank 0 broadcasts Stop (its drain) or the group breaks
            self._follower = threading.Thread(target=follow, args=(model,), name="tp-follower", daemon=True)
            self._follower.start()

    def address(self) -> str | None:
        """Rank 0's gRPC address; None on the other ranks."""
        return _advertised(self._served.server.address) if self._served else None

    def alive(self) -> bool:
        return self._follower.is_alive() if self._follower else True

    def drain(self, grace_s: float) -> None:
        """Rank 0: drain, then broadcast Stop so the followers return. Others: nothing to do."""
        if self._served:
            self._served.stop(grace_s)


class DraftWorker:
    """One draft worker (`python -m draft_service`), serving dyspec.v1.DraftWorker."""

    def __init__(self, argv: list[str], bind_host: str | None = None):
        from draft_service.__main__ import build_parser, config_from_args
        from draft_service.server import DraftServer
        from serving.models import load_draft_lm, load_tokenizer, model_source_from_args

        args = _parse(build_parser, argv, bind_host)
        config, source = config_from_args(args), model_source_from_args(args)
        model = load_draft_lm(source, forward=args.draft_forward, static_kv_tokens=args.static_kv_tokens)
        tokenizer = load_tokenizer(source)
        self._served = ServerThread(lambda: DraftServer(config, model, tokenizer), "draft-grpc")

    def address(self) -> str:
        return _advertised(self._served.server.address)

    def drain(self, grace_s: float) -> None:
        self._served.stop(grace_s)


class Orchestrator:
    """The orchestrator (`python -m orchestrator`): public gRPC Generation and OpenAI HTTP."""

    def __init__(self, argv: list[str], bind_host: str | None = None):
        from orchestrator.__main__ import build_parser, config_from_args
        from orchestrator.server import OrchestratorServer
        from orchestrator.tokenizer import TokenizerSource, load_tokenizer

        args = _parse(build_parser, argv, bind_host, ("--host", "--http-host"))
        config = config_from_args(args)
        tokenizer = load_tokenizer(TokenizerSource(args.tokenizer_dir, args.tokenizer_factory, args.tokenizer_kwargs))
        self._served = ServerThread(lambda: OrchestratorServer(config, tokenizer), "orchestrator")

    def address(self) -> str:
        return _advertised(self._served.server.address)

    def http_url(self) -> str:
        scheme = "https" if self._served.server.config.tls else "http"
        return f"{scheme}://{_advertised(self._served.server.http_address)}"

    def drain(self, grace_s: float) -> None:
        self._served.stop(grace_s)
