"""Where the target's ranks go: one placement group, one bundle per rank, and each rank's
torch.distributed variables derived from the nodes Ray chose for the bundles."""
from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

# STRICT_PACK: the whole group on one node (NVLink, DeepSpeed's shared-memory all-reduce on CPU).
# PACK prefers one node but may spill over; SPREAD / STRICT_SPREAD put ranks on different nodes.
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


def target_bundle(resource: str, cpus: float, gpus: int) -> dict[str, float]:
    bundle = {resource: 1.0, "CPU": float(cpus)}
    if gpus:
        bundle["GPU"] = float(gpus)
    return bundle


def reserve_target_group(tp_size: int, bundle: dict[str, float], strategy: str, name: str, detached: bool,
                         timeout_s: float) -> tuple[PlacementGroup, list[str]]:
    """Reserve the group and return it with the node id of each bundle (rank r uses bundle r).
    Raises TimeoutError when the cluster cannot offer the bundles (the group is then removed)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
    group = placement_group([dict(bundle) for _ in range(tp_size)], strategy=strategy, name=name,
                            lifetime="detached" if detached else None)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise TimeoutError(f"no room for {tp_size} x {bundle} ({strategy}) within {timeout_s:.0f} s: "
                           f"cluster resources are {ray.cluster_resources()}")
    nodes = placement_group_table(group)["bundles_to_node_id"]
    return group, [nodes[r] for r in range(tp_size)]


def node_addresses() -> dict[str, str]:
    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def rank_env(rank: int, bundle_nodes: list[str], addresses: dict[str, str], master_port: int,
             one_device_per_process: bool) -> dict[str, str]:
    """torch.distributed's env:// variables for `rank`, as the deepspeed launcher would set them.

    The master is rank 0's node. LOCAL_SIZE counts the ranks on this rank's node (DeepSpeed's CPU
    all-reduce uses shared memory among them). With GPUs Ray gives each actor only its own device
    (CUDA_VISIBLE_DEVICES), so the device index, LOCAL_RANK, is 0 in every actor."""
    here = [r for r, node in enumerate(bundle_nodes) if node == bundle_nodes[rank]]
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(len(bundle_nodes)),
        "MASTER_ADDR": addresses[bundle_nodes[0]],
        "MASTER_PORT": str(master_port),
        "LOCAL_RANK": "0" if one_device_per_process else str(here.index(rank)),
        "LOCAL_SIZE": str(len(here)),
    }
