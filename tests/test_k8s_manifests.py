"""The Kubernetes manifests, rendered offline with `kubectl kustomize` and checked without a
cluster: core kinds against Kubernetes' own schemas (kubernetes-validate --strict), custom
resources (LeaderWorkerSet, RayCluster) against their CRDs, and every container's flags parsed by
the service's own argument parser, so ports, probes, addresses and limits agree with the code.
TLS: every flag's file is a key of a mounted Secret, and cert-manager issues each Secret with the
names its clients check (cert-manager's CRDs are not among ../shared/k8s-crds: checked by structure).
"""
from __future__ import annotations

import functools
import importlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from orchestrator.discovery import parse_worker
from tests.container_files import entry_module

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT.parent / "shared" / "k8s-crds"  # beside the clone in CI; see its README
KUBERNETES_VERSION = "1.32.0"  # grpc probes are GA from 1.27; LeaderWorkerSet needs >= 1.26
KUBECTL = shutil.which("kubectl")
VARIANTS = {"base": K8S / "base", "cpu-dev": K8S / "overlays" / "cpu-dev", "gpu": K8S / "overlays" / "gpu",
            "kuberay": K8S / "kuberay"}
SERVERS = {"target_service": "target_service.server", "draft_service": "draft_service.server",
           "orchestrator": "orchestrator.server"}  # where each service keeps the name it reports to health
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH: it renders the kustomizations")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for name, path in VARIANTS.items():
        done = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        out[name] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod template) for every workload, LWS leader and worker templates included."""
    out = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            out.append((name, doc["spec"]["template"]))
        elif doc["kind"] == "LeaderWorkerSet":
            lwt = doc["spec"]["leaderWorkerTemplate"]
            out += [(f"{name}/leader", lwt["leaderTemplate"]), (f"{name}/worker", lwt["workerTemplate"])]
    return out


def image_module(image: str) -> str:
    """ghcr.io/dyspec/<svc>:tag -> the module its container file's ENTRYPOINT runs."""
    service = image.rsplit("/", 1)[1].split(":")[0].split("@")[0]
    return entry_module(ROOT / "deploy" / "docker" / f"{service}.Dockerfile")


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])[0]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


def parsed_args(docs: list[dict], container: dict):
    """The container's args as its service parses them (its image's ENTRYPOINT module)."""
    module = importlib.import_module(f"{image_module(container['image'])}.__main__")
    env = container_env(docs, container)
    return module.build_parser().parse_args([expand(a, env) for a in container.get("args", [])])


def service_containers(docs: list[dict]):
    """(where, pod template, container, parsed args) for each container that runs a service."""
    for where, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            yield where, template, container, parsed_args(docs, container)


# --- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_kinds_validate_strictly(rendered, variant):
    core = [d for d in rendered[variant] if "." not in d["apiVersion"].split("/")[0] or
            d["apiVersion"].startswith(("apps/", "policy/", "networking.k8s.io/"))]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_has_teeth(rendered):
    deployment = json.loads(json.dumps(find(rendered["base"], "Deployment", "dyspec-draft")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@functools.cache
def load_crds() -> tuple[dict, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    return tuple(yaml.load(path.read_text(), Loader=loader) for path in sorted(CRDS.glob("*.yaml")))


def crd_schema(api_version: str, kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"CRD schemas not found at {CRDS} (../shared/k8s-crds beside the clone)")
    group, version = api_version.split("/")
    for crd in load_crds():
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {api_version} {kind} in {CRDS}")


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare: the API server would prune them silently, so a typo
    passes jsonschema. Open objects (no properties, preserve-unknown-fields) are not checked."""
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        found = [f"{path}.{k}" for k in value if k not in schema["properties"]]
        return found + [u for k, v in value.items() if k in schema["properties"]
                        for u in unknown_fields(v, schema["properties"][k], f"{path}.{k}")]
    if isinstance(value, list) and "items" in schema:
        return [u for i, v in enumerate(value) for u in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("variant, kind", [("base", "LeaderWorkerSet"), ("gpu", "LeaderWorkerSet"),
                                           ("kuberay", "RayCluster")])
def test_custom_resources_validate_against_their_crds(rendered, variant, kind):
    (resource,) = find(rendered[variant], kind)
    schema = crd_schema(resource["apiVersion"], kind)
    jsonschema.validate(resource, schema)
    assert unknown_fields(resource, schema) == []
    if kind == "LeaderWorkerSet":  # and the check has teeth
        broken = json.loads(json.dumps(resource))
        broken["spec"]["leaderWorkerTemplate"]["size"] = "8"
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
        broken["spec"]["leaderWorkerTemplate"] = {**resource["spec"]["leaderWorkerTemplate"], "restartpolicy": "x"}
        assert unknown_fields(broken, schema) == [".spec.leaderWorkerTemplate.restartpolicy"]


def test_cpu_dev_uses_the_statefulset_variant(rendered):
    docs = rendered["cpu-dev"]
    assert not find(docs, "LeaderWorkerSet") and len(find(docs, "StatefulSet", "dyspec-target")) == 1


# --- flags, ports and probes agree with the code -----------------------------------------------


@pytest.mark.parametrize("variant", ["base", "cpu-dev", "gpu"])
def test_container_flags_parse_and_ports_and_probes_match_them(rendered, variant):
    docs = rendered[variant]
    seen = set()
    for where, template, container, args in service_containers(docs):
        module = image_module(container["image"])
        seen.add(module)
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if where.endswith("/worker"):  # ranks > 0 serve nothing: no ports, no probes
            assert "readinessProbe" not in container and "grpc" not in ports
            continue
        assert ports["grpc"] == args.port, where
        if module == "orchestrator":
            assert ports["http"] == args.http_port
        service_name = importlib.import_module(SERVERS[module]).SERVICE_NAME
        # The port is TLS and native gRPC probes speak none: they ask the plaintext health port.
        assert args.tls_cert and args.health_port is not None and ports["health"] == args.health_port, where
        assert container["readinessProbe"]["grpc"] == {"port": args.health_port, "service": service_name}, where
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == args.health_port, (where, probe)  # "" = the whole server
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert args.drain_grace_s < grace, f"{where}: SIGKILL would cut the drain short"
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > args.drain_grace_s, \
            f"{where}: health reads NOT_SERVING while draining; liveness must outlast the drain"
    assert seen == set(SERVERS)


@pytest.mark.parametrize("variant", ["base", "cpu-dev", "gpu"])
def test_services_route_to_the_ports_the_services_listen_on(rendered, variant):
    docs = rendered[variant]
    listening = {}  # Service name -> {port: container port it reaches}, from selectors and named ports
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        for where, template, container, args in service_containers(docs):
            if selector.items() <= template["metadata"]["labels"].items():
                named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
                for port in service["spec"]["ports"]:
                    target = port["targetPort"]
                    if named.get(target, target) in named.values():
                        listening.setdefault(service["metadata"]["name"], {})[port["port"]] = named.get(target, target)
    by_module = {image_module(c["image"]): a for w, _, c, a in service_containers(docs) if not w.endswith("/worker")}
    host, port = by_module["draft_service"].target_address.rsplit(":", 1)
    assert listening[host][int(port)] == by_module["target_service"].port
    for worker in map(parse_worker, by_module["orchestrator"].worker):
        if worker.discover:  # the pods' own addresses: a headless Service, and the container's port itself
            service = find(docs, "Service", worker.host)[0]
            assert service["spec"].get("clusterIP") == "None", f"{worker.text} needs a headless Service"
            assert worker.port == by_module["draft_service"].port and worker.port in listening[worker.host].values()
        else:
            assert listening[worker.host][worker.port] == by_module["draft_service"].port
    assert set(listening["dyspec"].values()) == {by_module["orchestrator"].port, by_module["orchestrator"].http_port}
    # The target Service reaches rank 0 only: the other ranks do not serve.
    target_selector = find(docs, "Service", "dyspec-target")[0]["spec"]["selector"]
    for where, template in pod_templates(docs):
        if where.endswith("/worker"):
            assert not target_selector.items() <= template["metadata"]["labels"].items()


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_the_leaderworkerset_group_is_the_tensor_parallel_group(rendered, variant):
    docs = rendered[variant]
    (lws,) = find(docs, "LeaderWorkerSet")
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    for template in (lwt["leaderTemplate"], lwt["workerTemplate"]):
        (container,) = template["spec"]["containers"]
        assert parsed_args(docs, container).tp_size == lwt["size"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RANK"] == "$(LWS_WORKER_INDEX)" and env["WORLD_SIZE"] == "$(LWS_GROUP_SIZE)"
        assert env["MASTER_ADDR"] == "$(LWS_LEADER_ADDRESS)" and env["LOCAL_RANK"] == "0"
    assert find(docs, "ConfigMap", "dyspec-config")[0]["data"]["TP_SIZE"] == str(lwt["size"])
    if variant == "gpu":
        assert lwt["size"] == 8


def test_the_statefulset_target_is_one_process(rendered):
    (sts,) = find(rendered["cpu-dev"], "StatefulSet", "dyspec-target")
    assert sts["spec"]["replicas"] == 1
    assert parsed_args(rendered["cpu-dev"], sts["spec"]["template"]["spec"]["containers"][0]).tp_size == 1


def test_cpu_dev_fetches_the_models_its_config_names(rendered):
    from model_store.cache import cache_root, model_dir
    from model_store.cli import _parser as model_store_parser
    from model_store.registry import MODELS

    docs = rendered["cpu-dev"]
    config = find(docs, "ConfigMap", "dyspec-config")[0]["data"]
    fetched = set()
    for where, template in pod_templates(docs):
        for init in template["spec"].get("initContainers", []):
            assert init["command"] == ["python", "-m", "model_store"]
            args = model_store_parser().parse_args(init["args"])
            fetched |= {str(model_dir(cache_root(args.cache_dir), MODELS[n])) for n in args.names}
    assert {config["TARGET_MODEL_DIR"], config["DRAFT_MODEL_DIR"], config["TOKENIZER_DIR"]} <= fetched


# --- network policy, devices, resources ---------------------------------------------------------


def admits(policy: dict, labels: dict, port: int) -> bool:
    """Whether `policy` lets a pod with `labels` (same namespace) in on `port`."""
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        peer_ok = peers is None or any("podSelector" in p and p["podSelector"].get("matchLabels", {}).items()
                                       <= labels.items() for p in peers)
        port_ok = "ports" not in rule or any(p["port"] == port for p in rule["ports"])
        if peer_ok and port_ok:
            return True
    return False


@pytest.mark.parametrize("variant", ["base", "cpu-dev", "gpu"])
def test_only_draft_pods_reach_the_target_port(rendered, variant):
    docs = rendered[variant]
    (policy,) = find(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    labels = {}
    for where, template in pod_templates(docs):
        labels.setdefault(image_module(template["spec"]["containers"][0]["image"]), []).append(
            template["metadata"]["labels"])
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert all(selector.items() <= pod.items() for pod in labels["target_service"]), "selects every target pod"
    assert not any(selector.items() <= pod.items() for m in ("draft_service", "orchestrator") for pod in labels[m])
    target_port = next(a.port for w, _, c, a in service_containers(docs) if image_module(c["image"]) == "target_service")
    assert all(admits(policy, pod, target_port) for pod in labels["draft_service"])
    assert not any(admits(policy, pod, target_port) for pod in labels["orchestrator"])
    assert not admits(policy, {"app": "anything-else"}, target_port)
    assert all(admits(policy, pod, 29500) for pod in labels["target_service"]), "ranks reach each other"


def containers_of(docs: list[dict]):
    for where, template in pod_templates(docs):
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            yield where, c
    for cluster in find(docs, "RayCluster"):
        groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for group in groups:
            for c in group["template"]["spec"]["containers"]:
                yield f"RayCluster/{group.get('groupName', 'head')}", c


@pytest.mark.parametrize("variant", ["gpu", "kuberay"])
def test_gpu_limits_are_whole_devices_written_as_strings(rendered, variant):
    gpus = [(where, c["resources"]["limits"]["nvidia.com/gpu"]) for where, c in containers_of(rendered[variant])
            if "nvidia.com/gpu" in c["resources"].get("limits", {})]
    assert gpus
    assert all(isinstance(n, str) and n.isdigit() for _, n in gpus), gpus


def test_cpu_dev_asks_for_no_gpu(rendered):
    assert not any("nvidia.com/gpu" in json.dumps(c["resources"]) for _, c in containers_of(rendered["cpu-dev"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_requests_cpu_and_memory(rendered, variant):
    for where, container in containers_of(rendered[variant]):
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= requests.keys(), (where, container["name"])
        assert container["resources"]["limits"]["memory"] == requests["memory"], "memory is not overcommitted"


@pytest.mark.parametrize("variant", ["base", "cpu-dev", "gpu"])
def test_every_workload_has_a_disruption_budget(rendered, variant):
    docs = rendered[variant]
    budgets = [b["spec"]["selector"]["matchLabels"] for b in find(docs, "PodDisruptionBudget")]
    for where, template in pod_templates(docs):
        assert any(b.items() <= template["metadata"]["labels"].items() for b in budgets), where


# --- KubeRay: the launcher's flags ----------------------------------------------------------------


def test_kuberay_head_runs_the_launcher_with_flags_it_and_the_services_accept(rendered):
    from deploy.ray.launch import build_parser as launcher_parser
    from draft_service.__main__ import build_parser as draft_parser
    from orchestrator.__main__ import build_parser as orchestrator_parser
    from target_service.__main__ import build_parser as target_parser

    (cluster,) = find(rendered["kuberay"], "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    script, _, *flags = container["args"]
    assert "KUBERAY_GEN_RAY_START_CMD" in script and 'exec python -m deploy.ray.launch "$@"' in script
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    args = launcher_parser().parse_args(flags)
    # The services parse the flags the launcher passes on (plus those it adds itself).
    target_parser().parse_args(shlex.split(args.target_args))
    draft_parser().parse_args([*shlex.split(args.draft_args), "--target-address", "t:1"])
    orchestrator_parser().parse_args([*shlex.split(args.orchestrator_args), "--worker", "w:1"])

    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    offered = {name: json.loads(json.loads(g["rayStartParams"]["resources"])) for name, g in groups.items()}
    assert offered["target"] == {args.target_resource: args.tp_size}
    assert int(groups["target"]["rayStartParams"]["num-gpus"]) == args.tp_size
    assert offered["draft"] == {args.draft_resource: 1} and groups["draft"]["replicas"] >= args.drafts
    assert json.loads(json.loads(head["rayStartParams"]["resources"])) == {args.orchestrator_resource: 1}
    # Teardown drains three tiers one after another before the kubelet's SIGKILL.
    assert 3 * args.drain_grace_s < head["template"]["spec"]["terminationGracePeriodSeconds"]
    public = find(rendered["kuberay"], "Service", "dyspec")[0]["spec"]["ports"]
    assert {p["targetPort"] for p in public} == {args.port, args.http_port}
    orchestrator = orchestrator_parser().parse_args([*shlex.split(args.orchestrator_args), "--worker", "w:1"])
    assert container["readinessProbe"]["grpc"]["port"] == orchestrator.health_port  # the public ports are TLS


# --- TLS: files from mounted Secrets, issued by cert-manager with the names clients check ----------

TLS_FLAGS = ("tls_cert", "tls_key", "tls_ca", "tls_client_cert", "tls_client_key")


def mounted_secret(template: dict, container: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in `container`, which must come from a Secret volume."""
    folder, _, name = path.rpartition("/")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == folder]
    assert len(mounts) == 1, f"{path}: no single volume mounted at {folder}"
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    assert "secret" in volume, f"{path}: {volume['name']} is not a Secret"
    items = {item["path"]: item["key"] for item in volume["secret"].get("items", [])}
    if items:
        assert name in items, f"{path}: not among the Secret's projected items"
    return volume["secret"]["secretName"], items.get(name, name)


def tls_secrets(docs: list[dict]) -> dict[str, dict[str, str]]:
    """module -> {Secret name: key} of its TLS files, checking that each is mounted from a Secret."""
    out = {}
    for where, template, container, args in service_containers(docs):
        paths = [getattr(args, flag) for flag in TLS_FLAGS if getattr(args, flag, "")]
        assert args.tls_cert and args.tls_key and args.tls_ca, f"{where}: every port is TLS outside loopback"
        for path in paths:
            secret, key = mounted_secret(template, container, path)
            out.setdefault(image_module(container["image"]), {})[path] = (secret, key)
    return out


@pytest.mark.parametrize("variant", ["base", "cpu-dev", "gpu"])
def test_every_tls_file_is_a_key_of_a_mounted_secret(rendered, variant):
    secrets = tls_secrets(rendered[variant])
    assert secrets.keys() == set(SERVERS)
    for module, files in secrets.items():
        assert {key for _, key in files.values()} == {"tls.crt", "tls.key", "ca.crt"}, module  # cert-manager's keys
        assert len({secret for secret, _ in files.values()}) == 1, f"{module}: one Secret per service"


def test_the_tls_check_has_teeth(rendered):
    docs = json.loads(json.dumps(rendered["base"]))
    template = find(docs, "Deployment", "dyspec-draft")[0]["spec"]["template"]
    template["spec"]["containers"][0]["args"].append("--tls-ca=/etc/other/ca.crt")
    with pytest.raises(AssertionError, match="no single volume"):
        tls_secrets(docs)


def issued_names(docs: list[dict], secret: str) -> tuple[dict, list[str]]:
    """The Certificate writing `secret`, its dnsNames; asserts the chain up to a CA Issuer."""
    (certificate,) = [c for c in find(docs, "Certificate") if c["spec"]["secretName"] == secret]
    spec = certificate["spec"]
    assert {"server auth", "client auth"} <= set(spec["usages"]), f"{secret}: serves and is a client certificate"
    ref = spec["issuerRef"]
    assert ref.get("group", "cert-manager.io") == "cert-manager.io" and ref.get("kind", "Issuer") == "Issuer"
    (issuer,) = find(docs, "Issuer", ref["name"])
    (ca,) = [c for c in find(docs, "Certificate") if c["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]]
    assert ca["spec"]["isCA"] is True and "selfSigned" in find(docs, "Issuer", ca["spec"]["issuerRef"]["name"])[0]["spec"]
    return certificate, spec["dnsNames"]


@pytest.mark.parametrize("variant", ["cpu-dev", "gpu"])
def test_cert_manager_issues_each_secret_with_the_names_its_clients_check(rendered, variant):
    docs = rendered[variant]
    secrets = {module: next(iter(files.values()))[0] for module, files in tls_secrets(docs).items()}
    names = {module: issued_names(docs, secret)[1] for module, secret in secrets.items()}
    args = {image_module(c["image"]): a for w, _, c, a in service_containers(docs) if not w.endswith("/worker")}
    target_host = args["draft_service"].target_address.rsplit(":", 1)[0]
    assert (args["draft_service"].tls_server_name or target_host) in names["target_service"]
    for worker in map(parse_worker, args["orchestrator"].worker):  # dns:/// workers are dialled by IP
        assert (args["orchestrator"].tls_server_name or worker.host) in names["draft_service"]
    assert "dyspec" in names["orchestrator"], "the public Service's name"
    # One CA for every link: each Secret is issued by the same Issuer.
    assert len({issued_names(docs, s)[0]["spec"]["issuerRef"]["name"] for s in secrets.values()}) == 1


def test_kuberay_mounts_the_launchers_tls_files_on_every_ray_pod(rendered):
    from deploy.ray.launch import build_parser as launcher_parser

    docs = rendered["kuberay"]
    (cluster,) = find(docs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]
    args = launcher_parser().parse_args(head["spec"]["containers"][0]["args"][2:])
    for template in [head, *(g["template"] for g in cluster["spec"]["workerGroupSpecs"])]:
        (container,) = template["spec"]["containers"]  # every Ray pod may host a service
        found = {mounted_secret(template, container, getattr(args, f)) for f in ("tls_cert", "tls_key", "tls_ca")}
        assert {key for _, key in found} == {"tls.crt", "tls.key", "ca.crt"} and len({s for s, _ in found}) == 1
    certificate, names = issued_names(docs, next(iter(found))[0])
    assert args.tls_server_name in names and "dyspec" in names
