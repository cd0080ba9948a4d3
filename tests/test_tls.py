"""TLS on every port, with certificates made at test time (tests/tls_certs.py).

The whole chain over TLS across processes: SDK and HTTPS -> orchestrator (server TLS) -> draft
worker -> target (both links mutual TLS), greedy output equal to target-only greedy. Refused: a
client without the CA, a caller without a client certificate or with one from another CA, and
plaintext on a TLS port; each fails fast with UNAVAILABLE. The plaintext health ports answer as
the Kubernetes probes ask. Flags: missing or mismatched files are usage errors naming the flag,
and the Ray launcher passes the files through to every service it starts.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dyspec import generate
from orchestrator.sdk import AsyncClient, Client, RetryPolicy, Unavailable
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, target_pb2, target_pb2_grpc
from serving.tls import TlsFiles, is_loopback, warn_if_plaintext
from tests import service_models
from tests.char_tokenizer import CharTokenizer
from tests.service_process import ServiceProcess, free_port
from tests.tls_certs import CertificateAuthority

PROMPT = [3, 1, 4, 1, 5]
NEW_TOKENS = 16
MODEL = "tiny"
ONCE = RetryPolicy(max_attempts=1)  # a refused handshake is UNAVAILABLE, which the SDK would retry
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The deployment's CA and one certificate per service; a rogue CA and a certificate it signed."""
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "dyspec"), CertificateAuthority(folder, "rogue")
    return {"ca": ca.cert, "target": ca.issue("target"), "draft": ca.issue("draft"),
            "orchestrator": ca.issue("orchestrator"), "rogue": rogue.issue("draft"), "rogue_ca": rogue.cert}


def tls_flags(pki, service: str, ca: bool = True) -> list[str]:
    leaf = pki[service]
    return ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), *(["--tls-ca", str(pki["ca"])] if ca else [])]


@pytest.fixture(scope="module")
def stack(pki, tmp_path_factory):
    """Target, worker and orchestrator, all over TLS, each with a plaintext health port. Ports are
    chosen up front so the three start at once (the worker dials the target per request, the
    orchestrator finds the worker by its health checks)."""
    logs = tmp_path_factory.mktemp("logs")
    port = {name: free_port() for name in ("target", "draft", "orchestrator", "target_health", "draft_health",
                                           "orchestrator_health")}
    target = f"127.0.0.1:{port['target']}"
    started = [
        ServiceProcess.module("target_service", [
            "--port", str(port["target"]), "--health-port", str(port["target_health"]), "--no-warmup",
            "--model-factory", "tests.service_models:target", *tls_flags(pki, "target")], logs / "target.log"),
        ServiceProcess.module("draft_service", [
            "--port", str(port["draft"]), "--health-port", str(port["draft_health"]), "--no-warmup",
            "--target-address", target, "--budget", "8", "--model-factory", "tests.service_models:draft",
            *tls_flags(pki, "draft")], logs / "draft.log"),
        ServiceProcess.module("orchestrator", [
            "--port", str(port["orchestrator"]), "--health-port", str(port["orchestrator_health"]),
            "--worker", f"127.0.0.1:{port['draft']}", "--http-port", "0", "--model-name", MODEL,
            "--health-interval-s", "0.5", "--tokenizer-factory", "tests.char_tokenizer:char_tokenizer",
            *tls_flags(pki, "orchestrator")], logs / "orchestrator.log"),
    ]
    try:
        for process in started:
            process.wait_ready(120)
        wait_until_routable(started[2].ready_line.split()[2], pki["ca"])
        yield {"target": started[0].address, "draft": started[1].address, "grpc": started[2].address,
               "https": started[2].ready_line.split()[2],
               **{name: f"127.0.0.1:{port[name]}" for name in port if name.endswith("_health")}}
    finally:
        for process in reversed(started):
            process.stop()


def wait_until_routable(https: str, ca, timeout_s: float = 30.0) -> None:
    """Until the orchestrator's /health is 200: its health checks have reached the worker (which
    may have come up after the orchestrator's first check)."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(https + "/health", timeout=5, context=context):
                return
        except urllib.error.HTTPError:  # 503: no healthy worker yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def expected():
    target, draft = service_models.target(), service_models.draft()
    return lambda prompt: generate(target, draft, prompt, max_new_tokens=NEW_TOKENS, method="autoregressive").tokens


def secure(address: str, pki, who: str | None, ca=None) -> grpc.Channel:
    """A channel that checks the server against `ca` (default: the deployment's CA) and presents
    `who`'s certificate (None: no client certificate)."""
    leaf = pki[who] if who else None
    files = TlsFiles(str(leaf.cert) if leaf else "", str(leaf.key) if leaf else "", str(ca or pki["ca"]))
    return grpc.secure_channel(address, files.channel_credentials())


def refused(channel: grpc.Channel, call) -> grpc.RpcError:
    start = time.monotonic()
    with channel, pytest.raises(grpc.RpcError) as raised:
        call(channel)
    assert time.monotonic() - start < 5, "a refused handshake must fail fast, not hang to the deadline"
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
    return raised.value


def target_stats(channel: grpc.Channel):
    return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)


def worker_stats(channel: grpc.Channel):
    return generation_pb2_grpc.DraftWorkerStub(channel).Stats(generation_pb2.WorkerStatsRequest(), timeout=5)


# --- the chain, end to end --------------------------------------------------------------------


def test_the_whole_chain_over_tls_equals_target_only_greedy(stack, pki, expected):
    with Client(stack["grpc"], timeout=60, tls_ca=str(pki["ca"])) as client:
        assert client.generate(PROMPT, NEW_TOKENS, ignore_eos=True).token_ids == expected(PROMPT)

    async def over_asyncio() -> list[int]:
        # PEM bytes, and the name checked instead of the address dialled
        async with AsyncClient(stack["grpc"], timeout=60, tls_ca=pki["ca"].read_bytes(),
                               tls_server_name="localhost") as client:
            return (await client.generate("hello", NEW_TOKENS, ignore_eos=True)).token_ids

    assert asyncio.run(over_asyncio()) == expected(CharTokenizer()("hello")["input_ids"])


def test_https_serves_the_openai_api_to_a_client_that_trusts_the_ca(stack, pki, expected):
    assert stack["https"].startswith("https://")
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    oai = openai.OpenAI(base_url=stack["https"] + "/v1", api_key="unused", max_retries=0, timeout=60,
                        http_client=openai.DefaultHttpxClient(verify=context))
    done = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert done.choices[0].text == CharTokenizer().decode(expected(PROMPT))
    with urllib.request.urlopen(stack["https"] + "/health", timeout=10, context=context) as response:
        assert response.status == 200  # what an httpGet probe with scheme HTTPS would see
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(stack["https"] + "/health", timeout=10, context=ssl.create_default_context())


# --- refused ----------------------------------------------------------------------------------


def test_an_sdk_client_without_the_ca_fails_fast_with_unavailable(stack, pki):
    # the system's roots, another CA, a name the certificate does not carry, plaintext
    for options in ({"tls": True}, {"tls_ca": str(pki["rogue_ca"])},
                    {"tls_ca": str(pki["ca"]), "tls_server_name": "elsewhere"}, {}):
        with Client(stack["grpc"], timeout=10, retry=ONCE, **options) as client:
            start = time.monotonic()
            with pytest.raises(Unavailable):
                client.generate(PROMPT, 4)
            assert time.monotonic() - start < 5, options


def test_the_target_refuses_callers_without_a_client_certificate_from_its_ca(stack, pki):
    assert target_stats(secure(stack["target"], pki, "draft")).max_sessions > 0  # the worker's own certificate
    refused(secure(stack["target"], pki, None), target_stats)  # no client certificate
    refused(secure(stack["target"], pki, "rogue"), target_stats)  # signed by another CA
    refused(grpc.insecure_channel(stack["target"]), target_stats)  # plaintext


def test_the_worker_port_is_mutual_tls_too(stack, pki):
    assert worker_stats(secure(stack["draft"], pki, "orchestrator")).started_sessions >= 0
    refused(secure(stack["draft"], pki, None), worker_stats)
    refused(grpc.insecure_channel(stack["draft"]), worker_stats)
    error = refused(secure(stack["draft"], pki, "orchestrator", ca=pki["rogue_ca"]), worker_stats)
    assert "CERTIFICATE_VERIFY_FAILED" in error.details(), "the client names why it gave up"


def test_plaintext_http_to_the_https_port_fails(stack):
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(stack["https"].replace("https://", "http://") + "/health", timeout=10).read()


# --- probes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("service, name", [("target", "dyspec.v1.TargetVerification"),
                                           ("draft", "dyspec.v1.DraftWorker"),
                                           ("orchestrator", "dyspec.v1.Generation")])
def test_the_plaintext_health_port_answers_probes_and_serves_nothing_else(stack, service, name):
    with grpc.insecure_channel(stack[f"{service}_health"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for asked in ("", name):  # liveness asks for the server, readiness for the service (deploy/k8s)
            assert health.Check(health_pb2.HealthCheckRequest(service=asked), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            worker_stats(channel)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- flags --------------------------------------------------------------------------------------


def _config(module: str, argv: list[str]):
    import importlib

    main = importlib.import_module(f"{module}.__main__")
    return main.config_from_args(main.build_parser().parse_args(argv))


def test_tls_flags_are_checked_with_errors_that_name_the_flag(pki, tmp_path):
    model = ["--model-factory", "tests.service_models:target"]
    assert _config("target_service", model).tls is None  # no flags: plaintext
    config = _config("target_service", [*model, *tls_flags(pki, "target")])
    assert config.tls.mutual and config.tls.cert == str(pki["target"].cert)
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=f"--tls-key {missing}"):
        _config("target_service", [*model, *tls_flags(pki, "target"), "--tls-key", missing])
    with pytest.raises(ValueError, match="go together"):
        _config("target_service", [*model, *tls_flags(pki, "target", ca=False)])
    with pytest.raises(ValueError, match="not a PEM certificate and its private key"):
        _config("draft_service", ["--target-address", "t:1", *model, *tls_flags(pki, "draft"),
                                  "--tls-key", str(pki["target"].key)])
    with pytest.raises(ValueError, match="--tls-ca .*not a PEM CA bundle"):
        _config("draft_service", ["--target-address", "t:1", *model, *tls_flags(pki, "draft", ca=False),
                                  "--tls-ca", str(pki["draft"].key)])
    # The orchestrator: public ports without a CA; --tls-ca turns on mutual TLS to the workers.
    front = _config("orchestrator", ["--worker", "w:1", *tls_flags(pki, "orchestrator", ca=False)])
    assert front.tls is not None and not front.tls.mutual and front.worker_tls is None
    front = _config("orchestrator", ["--worker", "w:1", "--tls-ca", str(pki["ca"]), "--tls-client-cert",
                                     str(pki["draft"].cert), "--tls-client-key", str(pki["draft"].key)])
    assert front.tls is None and front.worker_tls.cert == str(pki["draft"].cert)
    with pytest.raises(ValueError, match="client certificate"):
        _config("orchestrator", ["--worker", "w:1", "--tls-ca", str(pki["ca"])])


def test_plaintext_off_loopback_is_warned_about(caplog):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("dyspec-target")
    with caplog.at_level(logging.WARNING, logger="serving.tls"):
        warn_if_plaintext("127.0.0.1", "gRPC")
        assert not caplog.records
        warn_if_plaintext("0.0.0.0", "gRPC")
    assert "plaintext" in caplog.text


def test_the_ray_launcher_passes_the_tls_files_to_every_service(pki):
    from deploy.ray.deployment import LaunchOptions
    from deploy.ray.launch import build_parser, options_from_args

    leaf = pki["target"]
    options = options_from_args(build_parser().parse_args([
        "--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), "--tls-ca", str(pki["ca"]),
        "--tls-server-name", "localhost", "--target-args", "--model-factory tests.service_models:target",
        "--draft-args", "--model-factory tests.service_models:draft"]))
    target = _config("target_service", options.target_argv())
    draft = _config("draft_service", options.draft_argv(0, "10.0.0.1:50061"))
    front = _config("orchestrator", options.orchestrator_argv(["10.0.0.2:50062"]))
    assert target.tls == draft.tls == front.worker_tls == TlsFiles(str(leaf.cert), str(leaf.key), str(pki["ca"]))
    assert target.tls.mutual and draft.tls_server_name == front.worker_tls_server_name == "localhost"
    assert front.tls == TlsFiles(str(leaf.cert), str(leaf.key)), "the public ports ask callers for no certificate"
    assert LaunchOptions().target_argv() == ["--tp-size", "1", "--port", "50061"], "no flags: plaintext"
    with pytest.raises(ValueError, match="go together"):
        LaunchOptions(tls_cert=str(leaf.cert), tls_key=str(leaf.key))
