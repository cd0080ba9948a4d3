"""One launch on a Ray cluster: what to place (LaunchOptions), placing it (launch) and removing
it (teardown). Every actor is named in the launch's namespace, so a later process can find and
remove exactly what a launch created and nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deploy.ray.actors import DraftWorker, Orchestrator, TargetRank
from deploy.ray.placement import node_addresses, rank_env, reserve_target_group, target_bundle

GROUP_NAME = "target-group"
ORCHESTRATOR = "orchestrator"
_TargetRank, _DraftWorker, _Orchestrator = ray.remote(TargetRank), ray.remote(DraftWorker), ray.remote(Orchestrator)


def rank_name(rank: int) -> str:
    return f"target-rank-{rank}"


def draft_name(index: int) -> str:
    return f"draft-{index}"


@dataclass(frozen=True)
class LaunchOptions:
    namespace: str = "dyspec"
    device: str = "cpu"  # "gpu": a GPU per rank and per draft worker
    tp_size: int = 1
    strategy: str = "STRICT_PACK"
    drafts: int = 1
    orchestrator: bool = True
    target_resource: str = "target_device"
    draft_resource: str = "draft_device"
    orchestrator_resource: str = ""  # "" places the orchestrator anywhere
    cpus_per_actor: float = 1.0
    target_port: int = 50061
    draft_port: int = 50062  # worker i: draft_port + i (a restarted worker comes back on its port)
    port: int = 50051
    http_port: int = 8000
    master_port: int = 29500
    bind_host: str | None = None  # None: each node's own address
    target_args: tuple[str, ...] = ()
    draft_args: tuple[str, ...] = ()
    orchestrator_args: tuple[str, ...] = ()
    max_restarts: int = 3
    placement_timeout_s: float = 300.0
    start_timeout_s: float = 1800.0
    detached: bool = False  # detached actors outlive the launching process (`--shutdown` removes them)
    # TLS (serving.tls), passed to every service: one certificate (serverAuth + clientAuth) and a CA
    # at the same paths on every node. The services dial each other by node IP, so the certificate
    # names tls_server_name and the dialling side checks for that name. All empty: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_server_name: str = ""

    def __post_init__(self):
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, got {self.device!r}")
        if self.tp_size < 1 or self.drafts < (1 if self.orchestrator else 0) or self.max_restarts < 0:
            raise ValueError("tp_size >= 1, drafts >= 1 with an orchestrator, max_restarts >= 0")
        given = [bool(self.tls_cert), bool(self.tls_key), bool(self.tls_ca)]
        if any(given) and not all(given):
            raise ValueError("--tls-cert, --tls-key and --tls-ca go together: the services' links are mutual TLS")
        if self.tls_server_name and not self.tls_cert:
            raise ValueError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")

    def tls_args(self, dials: bool) -> list[str]:
        """The TLS flags of a service; `dials`: it opens links of its own (draft, orchestrator), whose
        peer certificates must carry tls_server_name. The files are checked where they are read:
        on the service's node."""
        if not self.tls_cert:
            return []
        flags = ["--tls-cert", self.tls_cert, "--tls-key", self.tls_key, "--tls-ca", self.tls_ca]
        return flags + (["--tls-server-name", self.tls_server_name] if dials and self.tls_server_name else [])

    def target_argv(self) -> list[str]:
        return [*self.target_args, "--tp-size", str(self.tp_size), "--port", str(self.target_port),
                *self.tls_args(dials=False)]

    def draft_argv(self, index: int, target: str) -> list[str]:
        return [*self.draft_args, "--port", str(self.draft_port + index), "--target-address", target,
                *self.tls_args(dials=True)]

    def orchestrator_argv(self, workers: list[str]) -> list[str]:
        return [*self.orchestrator_args, "--port", str(self.port), "--http-port", str(self.http_port),
                *(part for worker in workers for part in ("--worker", worker)), *self.tls_args(dials=True)]


@dataclass
class Deployment:
    """What a launch placed. The handles are held on purpose: Ray collects an actor that is not
    detached once no handle to it is left, named or not."""

    options: LaunchOptions
    ranks: list = field(default_factory=list)
    drafts: list = field(default_factory=list)
    orchestrator: object | None = None
    endpoints: dict = field(default_factory=dict)


def _actor_env(device: str) -> dict[str, str]:
    # One BLAS thread per actor: several share a node's cores. DS_ACCELERATOR=cpu keeps DeepSpeed
    # from probing for a GPU (and picks gloo). The tokenizers library may deadlock after a fork.
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


def launch(o: LaunchOptions) -> Deployment:
    """Place and start everything; returns once every service serves. Call teardown on failure."""
    gpus = 1 if o.device == "gpu" else 0
    common = dict(namespace=o.namespace, lifetime="detached" if o.detached else None, num_cpus=o.cpus_per_actor,
                  runtime_env={"env_vars": _actor_env(o.device)})
    deployment = Deployment(o)

    group, nodes = reserve_target_group(o.tp_size, target_bundle(o.target_resource, o.cpus_per_actor, gpus),
                                        o.strategy, GROUP_NAME, o.detached, o.placement_timeout_s)
    if o.device == "cpu" and len(set(nodes)) > 1:
        # DeepSpeed's CPU all-reduce is shared memory among the ranks of one machine; with ranks on
        # several nodes it is left uninitialised and the first forward segfaults.
        ray.util.remove_placement_group(group)
        raise ValueError(f"--device cpu needs every target rank on one node, but {o.strategy} spread them "
                         f"over {len(set(nodes))}: use STRICT_PACK")
    addresses = node_addresses()
    target_argv = o.target_argv()
    for rank in range(o.tp_size):
        # max_restarts 0: a lone restarted rank cannot rejoin a running process group.
        deployment.ranks.append(_TargetRank.options(
            name=rank_name(rank), max_restarts=0, num_gpus=gpus, resources={o.target_resource: 1.0},
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            **common).remote(target_argv, rank_env(rank, nodes, addresses, o.master_port, gpus > 0), o.bind_host))
    # The ranks load and join together; a failed rank's constructor error surfaces here.
    ray.get([rank.alive.remote() for rank in deployment.ranks], timeout=o.start_timeout_s)
    target = ray.get(deployment.ranks[0].address.remote(), timeout=60)
    deployment.endpoints["target"] = target

    restartable = dict(max_restarts=o.max_restarts, max_task_retries=o.max_restarts, **common)
    for i in range(o.drafts):
        argv = o.draft_argv(i, target)
        deployment.drafts.append(_DraftWorker.options(
            name=draft_name(i), num_gpus=gpus, resources={o.draft_resource: 1.0}, scheduling_strategy="SPREAD",
            **restartable).remote(argv, o.bind_host))
    workers = ray.get([draft.address.remote() for draft in deployment.drafts], timeout=o.start_timeout_s)
    deployment.endpoints["drafts"] = workers

    if o.orchestrator:
        argv = o.orchestrator_argv(workers)
        resources = {o.orchestrator_resource: 1.0} if o.orchestrator_resource else {}
        deployment.orchestrator = _Orchestrator.options(name=ORCHESTRATOR, resources=resources,
                                                        **restartable).remote(argv, o.bind_host)
        deployment.endpoints["grpc"] = ray.get(deployment.orchestrator.address.remote(), timeout=o.start_timeout_s)
        deployment.endpoints["http"] = ray.get(deployment.orchestrator.http_url.remote(), timeout=60)
    return deployment


def _ours(name: str) -> bool:
    return name == ORCHESTRATOR or name.startswith(("draft-", "target-rank-"))


def teardown(namespace: str, grace_s: float) -> list[str]:
    """Drain, then kill, the named actors of a launch in `namespace`, and remove its placement
    group. Front to back, so requests finish before what they depend on stops: the orchestrator,
    the drafts, then rank 0 (whose drain tells the other ranks to stop). Returns what was removed."""
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == namespace and _ours(a["name"]))
    handles = {name: ray.get_actor(name, namespace=namespace) for name in names}
    tiers = [[n for n in names if n == ORCHESTRATOR], [n for n in names if n.startswith("draft-")],
             [n for n in names if n.startswith("target-rank-")]]
    for tier in tiers:
        draining = [handles[name].drain.remote(grace_s) for name in tier]  # a tier drains in parallel
        for ref in draining:
            try:
                ray.get(ref, timeout=grace_s + 15)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # already dead, or it would not drain: the kill below ends it either way
    for name in names:
        ray.kill(handles[name], no_restart=True)
    removed = list(names)
    try:
        group = ray.util.get_placement_group(GROUP_NAME)
    except ValueError:  # no such group in this namespace
        group = None
    if group is not None:
        ray.util.remove_placement_group(group)
        removed.append(f"placement-group:{GROUP_NAME}")
    return removed
