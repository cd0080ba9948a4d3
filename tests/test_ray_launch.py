"""`python -m deploy.ray.launch` on a local Ray whose custom resources stand in for devices: the
target's two tensor-parallel ranks (gloo) in one placement group, a draft worker and the
orchestrator, each an actor running its service's entry functions. Greedy output through the
public gRPC API equals target-only decoding; a killed draft actor is restarted by Ray and serves
again; stopping the launcher removes its actors and placement group and nothing else.

The test starts (and stops) its own cluster in its own temp dir; the launcher joins it by address.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import grpc
import pytest
import ray

from dyspec import generate
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, target_pb2, target_pb2_grpc
from tests import service_models
from tests.service_process import REPO, ServiceProcess, child_env, free_port

NAMESPACE = "dyspec-ray-test"
PROMPT = [3, 1, 4, 1, 5]
NEW_TOKENS = 24
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def cluster():
    """A local Ray with the launcher's device resources. Token auth off, a temp dir of its own
    (short: Ray's socket paths have a length limit), stopped by the test that started it."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = tempfile.mkdtemp(prefix="dyspec-rt-")
    context = ray.init(num_cpus=6, resources={"draft_device": 1, "target_device": 2}, _temp_dir=temp_dir,
                       include_dashboard=False, namespace="dyspec-ray-test-driver", log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def launcher_argv(address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deploy.ray.launch", "--address", address, "--namespace", NAMESPACE, *extra]


@pytest.fixture(scope="module")
def launched(cluster, tmp_path_factory):
    argv = launcher_argv(
        cluster, "--device", "cpu", "--tp-size", "2", "--drafts", "1", "--max-restarts", "2",
        "--target-port", str(free_port()), "--draft-port", str(free_port()), "--port", str(free_port()),
        "--http-port", str(free_port()), "--master-port", str(free_port()), "--drain-grace-s", "5",
        "--target-args", "--model-factory tests.service_models:target",
        "--draft-args", "--model-factory tests.service_models:draft --budget 8")
    launcher = ServiceProcess(argv, tmp_path_factory.mktemp("logs") / "launcher.log")
    try:
        endpoints = json.loads(launcher.wait_ready(240))
        yield launcher, endpoints
    finally:
        launcher.stop()


@pytest.fixture(scope="module")
def greedy():
    return generate(service_models.target(), service_models.draft(), PROMPT, max_new_tokens=NEW_TOKENS,
                    method="autoregressive").tokens


def generate_via(address: str, method: str, max_new_tokens: int = NEW_TOKENS, on_first_chunk=None) -> list[int]:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=PROMPT), method=method,
                                             max_new_tokens=max_new_tokens, ignore_eos=True)
    tokens = []
    with grpc.insecure_channel(address) as channel:
        for response in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60):
            if response.HasField("tokens"):
                if not tokens and on_first_chunk:
                    on_first_chunk()
                tokens += response.tokens.token_ids
    return tokens


def test_greedy_output_through_the_orchestrator_equals_target_only_decoding(launched, greedy):
    _, endpoints = launched
    assert generate_via(endpoints["grpc"], "autoregressive") == greedy
    assert generate_via(endpoints["grpc"], "dyspec") == greedy


def test_target_ranks_share_one_placement_group_and_one_process_group(launched):
    _, endpoints = launched
    groups = [g for g in ray.util.placement_group_table().values() if g["name"] == "target-group"
              and g["state"] == "CREATED"]
    assert len(groups) == 1
    assert groups[0]["strategy"] == "STRICT_PACK"
    assert list(groups[0]["bundles"].values()) == [{"target_device": 1.0, "CPU": 1.0}] * 2
    with grpc.insecure_channel(endpoints["target"]) as channel:
        stats = target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)
    assert stats.tp_size == 2


def test_a_killed_draft_actor_is_restarted_and_serves_again(launched, greedy):
    _, endpoints = launched
    draft = ray.get_actor("draft-0", namespace=NAMESPACE)
    with pytest.raises(grpc.RpcError) as in_flight:
        # Long enough that the kill lands mid-stream; the tiny target allows 256 positions.
        generate_via(endpoints["grpc"], "dyspec", max_new_tokens=240,
                     on_first_chunk=lambda: ray.kill(draft, no_restart=False))
    assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE, in_flight.value.details()
    assert ray.get(draft.address.remote(), timeout=120) == endpoints["drafts"][0], "restarted on another port"
    # The orchestrator finds a restarted worker within a health interval or two (2 s each).
    deadline = time.monotonic() + 15
    while True:
        try:
            assert generate_via(endpoints["grpc"], "dyspec") == greedy
            break
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_stopping_the_launcher_removes_its_actors_and_group_and_nothing_else(launched):
    launcher, _ = launched

    class Bystander:  # local, so Ray ships it by value (the worker cannot import a test module)
        def ping(self) -> str:
            return "pong"

    # A bystander in the same namespace, and one placement group not made by the launcher.
    bystander = ray.remote(Bystander).options(name="bystander", namespace=NAMESPACE, num_cpus=0).remote()
    other_group = ray.util.placement_group([{"CPU": 0.01}], name="not-ours")
    ray.get(other_group.ready(), timeout=30)
    assert ray.get(bystander.ping.remote(), timeout=30) == "pong"

    assert launcher.stop(timeout=60) == 0
    left = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    assert left == {"bystander"}
    states = {g["name"]: g["state"] for g in ray.util.placement_group_table().values()}
    assert states["target-group"] == "REMOVED" and states["not-ours"] == "CREATED"
    assert ray.get(bystander.ping.remote(), timeout=10) == "pong"

    # `--shutdown` of the same namespace finds nothing more of the launcher's to remove.
    done = subprocess.run(launcher_argv(ray.get_runtime_context().gcs_address, "--shutdown"), cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("removed 0"), done.stdout + done.stderr[-2000:]
    ray.kill(bystander)
    ray.util.remove_placement_group(other_group)


def test_a_group_the_cluster_cannot_hold_fails_the_launch_and_leaves_nothing(cluster):
    # Three target ranks, two target devices: placement times out and the launch removes its group.
    done = subprocess.run(launcher_argv(cluster, "--tp-size", "3", "--placement-timeout-s", "2", "--no-orchestrator",
                                        "--target-args", "--model-factory tests.service_models:target"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no room for 3 x" in done.stderr, done.stderr[-2000:]
    states = [g["state"] for g in ray.util.placement_group_table().values() if g["name"] == "target-group"]
    assert "CREATED" not in states and "PENDING" not in states
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]


def test_a_detached_launch_outlives_its_launcher_until_shutdown(cluster):
    common = ["--tp-size", "1", "--drafts", "1", "--no-orchestrator", "--target-port", str(free_port()),
              "--draft-port", str(free_port()), "--drain-grace-s", "2",
              "--target-args", "--model-factory tests.service_models:target",
              "--draft-args", "--model-factory tests.service_models:draft"]
    done = subprocess.run(launcher_argv(cluster, "--detach", *common), cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.startswith("READY "), done.stderr[-2000:]
    endpoints = json.loads(done.stdout.split()[1])
    with grpc.insecure_channel(endpoints["target"]) as channel:  # still serving after the launcher exited
        stats = target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=10)
    assert stats.tp_size == 1

    done = subprocess.run(launcher_argv(cluster, "--shutdown", "--drain-grace-s", "2"), cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(done.stdout.split(":", 1)[1].split()) == {"draft-0", "target-rank-0", "placement-group:target-group"}
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
