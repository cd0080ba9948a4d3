"""`python -m deploy.ray.launch`: place the DySpec services on a Ray cluster and serve until stopped.

    python -m deploy.ray.launch --address auto --device gpu --tp-size 8 \\
        --target-args "--model-dir /models/target --dtype bfloat16" \\
        --draft-args "--model-dir /models/draft --dtype bfloat16" \\
        --orchestrator-args "--tokenizer-dir /models/target"

Without --address it starts a local Ray whose custom resources stand in for the devices, in its
own temp dir with token auth off. It prints `READY {json endpoints}` on stdout once every service
answers, then waits; on SIGTERM/SIGINT it drains and kills only the actors and the placement group
it created (and stops the local cluster if it started one). `--detach` leaves a launch running
(named, detached actors); `--shutdown` removes such a launch by its namespace.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading

import ray

from deploy.ray.deployment import Deployment, LaunchOptions, launch, teardown
from deploy.ray.placement import STRATEGIES
from draft_service.config import DraftConfig
from orchestrator.config import DEFAULTS as ORCHESTRATOR_DEFAULTS
from target_service.config import TargetConfig

log = logging.getLogger("deploy.ray.launch")
HEALTH_INTERVAL_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.ray.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: start a local one")
    p.add_argument("--namespace", default="dyspec", help="Ray namespace of this launch's named actors")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: one GPU per target rank and per draft worker, NCCL; cpu: gloo, one thread per actor")
    p.add_argument("--tp-size", type=int, default=1, help="target tensor-parallel ranks (one actor each)")
    p.add_argument("--placement-strategy", choices=STRATEGIES, default="STRICT_PACK",
                   help="STRICT_PACK: all ranks on one node; PACK/SPREAD/STRICT_SPREAD: allow or force several")
    p.add_argument("--drafts", type=int, default=1, help="draft workers")
    p.add_argument("--no-orchestrator", action="store_true", help="place target and drafts only")
    p.add_argument("--target-resource", default="target_device", help="custom resource of target nodes, 1 per rank")
    p.add_argument("--draft-resource", default="draft_device", help="custom resource of draft nodes, 1 per worker")
    p.add_argument("--orchestrator-resource", default="", help="custom resource pinning the orchestrator (e.g. "
                                                               "one the head node offers); default: anywhere")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--target-port", type=int, default=TargetConfig().port)
    p.add_argument("--draft-port", type=int, default=DraftConfig(target_address="").port,
                   help="draft worker i listens on this + i")
    p.add_argument("--port", type=int, default=ORCHESTRATOR_DEFAULTS.port, help="public gRPC port")
    p.add_argument("--http-port", type=int, default=ORCHESTRATOR_DEFAULTS.http_port,
                   help="public OpenAI-compatible HTTP port")
    p.add_argument("--master-port", type=int, default=29500, help="torch.distributed port on rank 0's node")
    p.add_argument("--bind-host", help="host the services bind (default: each node's own address)")
    p.add_argument("--target-args", default="", help="flags for `python -m target_service` (model, limits)")
    p.add_argument("--draft-args", default="", help="flags for `python -m draft_service` (its own --dtype: a "
                                                       "CPU draft may take --dtype int8, which a target refuses)")
    p.add_argument("--orchestrator-args", default="", help="flags for `python -m orchestrator` (tokenizer, limits)")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts of each draft worker and the orchestrator "
                                                               "(target ranks restart only as a whole group: 0)")
    p.add_argument("--placement-timeout-s", type=float, default=300.0)
    p.add_argument("--start-timeout-s", type=float, default=1800.0, help="model loads, joins and first READY")
    p.add_argument("--drain-grace-s", type=float, default=30.0, help="on exit, how long in-flight requests may run")
    p.add_argument("--local-cpus", type=int, default=8, help="logical CPUs of a local cluster (scheduling only)")
    p.add_argument("--detach", action="store_true", help="leave the services running and exit (needs --address)")
    p.add_argument("--shutdown", action="store_true", help="remove the launch in --namespace and exit")
    tls = p.add_argument_group("TLS, passed to every service (serving.tls); the files must lie at these paths on "
                               "every node (e.g. a mounted Secret). None of them: plaintext")
    tls.add_argument("--tls-cert", default="", metavar="PEM",
                     help="the services' certificate (serverAuth and clientAuth usages; it names --tls-server-name)")
    tls.add_argument("--tls-key", default="", metavar="PEM", help="the private key of --tls-cert")
    tls.add_argument("--tls-ca", default="", metavar="PEM",
                     help="the CA bundle of the certificate: the links between services are mutual TLS")
    tls.add_argument("--tls-server-name", default="", metavar="NAME",
                     help="the name the certificate carries: services dial each other by node IP")
    p.add_argument("--log-level", default="INFO")
    return p


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    return LaunchOptions(
        namespace=args.namespace, device=args.device, tp_size=args.tp_size, strategy=args.placement_strategy,
        drafts=args.drafts, orchestrator=not args.no_orchestrator, target_resource=args.target_resource,
        draft_resource=args.draft_resource, orchestrator_resource=args.orchestrator_resource,
        cpus_per_actor=args.cpus_per_actor, target_port=args.target_port, draft_port=args.draft_port,
        port=args.port, http_port=args.http_port, master_port=args.master_port, bind_host=args.bind_host,
        target_args=tuple(shlex.split(args.target_args)), draft_args=tuple(shlex.split(args.draft_args)),
        orchestrator_args=tuple(shlex.split(args.orchestrator_args)), max_restarts=args.max_restarts,
        placement_timeout_s=args.placement_timeout_s, start_timeout_s=args.start_timeout_s, detached=args.detach,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, tls_server_name=args.tls_server_name)


def connect(args: argparse.Namespace) -> None:
    if args.address:
        ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
        return
    # A local cluster: token auth off (Ray 2.60 turns it on by default), a temp dir of its own (the
    # default is shared by every Ray on the machine), and custom resources standing in for devices.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    resources = {args.target_resource: float(args.tp_size), args.draft_resource: float(args.drafts)}
    if args.orchestrator_resource:
        resources[args.orchestrator_resource] = 1.0
    temp_dir = tempfile.mkdtemp(prefix="dyspec-ray-")
    ray.init(num_cpus=args.local_cpus, resources=resources, namespace=args.namespace, include_dashboard=False,
             _temp_dir=temp_dir, log_to_driver=False)
    log.info("local Ray with %s; its logs are under %s", resources, temp_dir)


def wait_until_signalled(deployment: Deployment) -> int:
    """Block until SIGTERM/SIGINT (0) or until the target group breaks (1): a tensor-parallel group
    cannot take back one restarted rank, so the launch ends and whoever supervises it relaunches."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(HEALTH_INTERVAL_S):
        try:
            if not all(ray.get([rank.alive.remote() for rank in deployment.ranks], timeout=30)):
                log.error("a target follower rank stopped; ending the launch")
                return 1
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.error("target group unreachable (%s); ending the launch", exc)
            return 1
    log.info("signal received: draining and removing the launch")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.detach and not args.address:
        raise SystemExit("--detach needs --address: a local cluster ends with this process")
    connect(args)
    try:
        if args.shutdown:
            removed = teardown(args.namespace, args.drain_grace_s)
            print(f"removed {len(removed)}: {' '.join(removed)}", flush=True)
            return 0
        kept = False
        try:
            deployment = launch(options_from_args(args))
            for name, where in deployment.endpoints.items():
                log.info("%-6s %s", name, where)
            print(f"READY {json.dumps(deployment.endpoints, separators=(',', ':'))}", flush=True)
            kept = args.detach
            return 0 if kept else wait_until_signalled(deployment)
        except (ray.exceptions.RayError, TimeoutError, ValueError) as exc:  # a service failed, no room
            log.error("launch failed: %s", exc)
            return 1
        finally:
            if not kept:  # also after a failed launch: nothing half-placed stays behind
                teardown(args.namespace, args.drain_grace_s)
    finally:
        ray.shutdown()  # disconnects; also stops the local cluster when this process started it


if __name__ == "__main__":
    sys.exit(main())
