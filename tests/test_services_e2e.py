"""Target and draft services as separate processes on loopback: the draft worker's output equals
the in-process dyspec.generate token for token (greedy for every method, and seeded sampling),
and both services answer health checks and reflection."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dyspec import METHODS, generate
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from tests import service_models
from tests.service_process import ServiceProcess

WORKER_DRAFT = service_models.worker_draft_settings()

PROMPT = [3, 1, 4, 1, 5]
NEW_TOKENS = 24
BUDGET = 8
TREE_METHODS = [m for m in METHODS if m != "autoregressive"]
FACTORIES = ["--model-factory", "tests.service_models:target"], ["--model-factory", "tests.service_models:draft"]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    target = ServiceProcess.module("target_service", FACTORIES[0], logs / "target.log")
    try:
        address = target.wait_ready(120)
        draft = ServiceProcess.module("draft_service", ["--target-address", address, "--budget", str(BUDGET),
                                                        *FACTORIES[1]], logs / "draft.log")
        draft.wait_ready(120)
        yield target, draft
        assert draft.stop() == 0, "the draft worker did not drain and exit cleanly on SIGTERM"
        assert target.stop() == 0, "the target did not drain and exit cleanly on SIGTERM"
    finally:
        target.stop()


@pytest.fixture(scope="module")
def worker(services):
    with grpc.insecure_channel(services[1].address) as channel:
        yield generation_pb2_grpc.DraftWorkerStub(channel)


@pytest.fixture(scope="module")
def models():
    return service_models.target(), service_models.draft()


def run(worker, method: str, temperature: float = 0.0, seed: int | None = 0, **sampling):
    request = generation_pb2.GenerateRequest(
        request_id=f"e2e-{method}", token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=NEW_TOKENS,
        method=method, sampling=sampling_pb2.SamplingParams(temperature=temperature, seed=seed, **sampling))
    tokens, summaries = [], []
    for response in worker.Generate(generation_pb2.WorkerGenerateRequest(request=request), timeout=60):
        if response.HasField("tokens"):
            assert response.tokens.token_ids, "empty chunk"
            tokens += response.tokens.token_ids
        else:
            summaries.append(response.summary)
    assert len(summaries) == 1, "exactly one summary, last"
    return tokens, summaries[0]


def test_greedy_output_equals_plain_target_decoding_for_every_method(worker, models):
    expected = generate(*models, PROMPT, max_new_tokens=NEW_TOKENS, method="autoregressive").tokens
    for method in METHODS:
        tokens, summary = run(worker, method)
        assert tokens == expected, method
        stats = summary.stats
        assert summary.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert (stats.method, stats.generated_tokens, stats.prompt_tokens) == (method, NEW_TOKENS, len(PROMPT))
        same_trees = generate(*models, PROMPT, max_new_tokens=NEW_TOKENS, method=method, budget=BUDGET, seed=0,
                              **WORKER_DRAFT)
        assert (stats.steps, stats.accepted_tokens) == (same_trees.steps, sum(same_trees.accepted_per_step)), method
        assert stats.steps + stats.accepted_tokens >= NEW_TOKENS  # the last round may be cut at max_new_tokens
        assert stats.target_total_ns >= stats.target_forward_ns > 0 and stats.verify_ns >= stats.target_total_ns
        if method == "autoregressive":
            assert stats.steps == NEW_TOKENS and stats.drafted_tokens == 0
    speculative = [run(worker, m)[1].stats for m in TREE_METHODS]
    assert any(s.accepted_tokens > 0 for s in speculative), "no draft token was ever accepted: the test lost its teeth"


@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_is_reproducible_and_equals_in_process_generate(worker, models, method):
    sampling = dict(temperature=0.8, top_k=20, top_p=0.95)
    first, summary = run(worker, method, seed=1234, **sampling)
    again, _ = run(worker, method, seed=1234, **sampling)
    assert first == again
    assert summary.stats.seed == 1234
    expected = generate(*models, PROMPT, max_new_tokens=NEW_TOKENS, method=method, budget=BUDGET, seed=1234,
                        **{**WORKER_DRAFT, **sampling})
    assert first == expected.tokens
    assert summary.stats.steps == expected.steps and summary.stats.accepted_tokens == sum(expected.accepted_per_step)


def test_unseeded_requests_report_the_seed_that_reproduces_them(worker):
    tokens, summary = run(worker, "dyspec", temperature=1.0, seed=None)
    assert run(worker, "dyspec", temperature=1.0, seed=summary.stats.seed)[0] == tokens


def test_bad_requests_are_invalid_argument(worker):
    cases = {
        "empty prompt": generation_pb2.GenerateRequest(max_new_tokens=4),
        "text without a tokenizer": generation_pb2.GenerateRequest(text="hello", max_new_tokens=4),
        "unknown method": generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=PROMPT),
                                                         max_new_tokens=4, method="medusa"),
        "no new tokens": generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=PROMPT)),
        "bad top_p": generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=4,
                                                    sampling=sampling_pb2.SamplingParams(top_p=2.0)),
    }
    for name, request in cases.items():
        with pytest.raises(grpc.RpcError) as error:
            list(worker.Generate(generation_pb2.WorkerGenerateRequest(request=request), timeout=10))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert error.value.details(), name
    wrong = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=4,
                                           model="some-other-model")
    with pytest.raises(grpc.RpcError) as error:
        list(worker.Generate(generation_pb2.WorkerGenerateRequest(request=wrong), timeout=10))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "some-other-model" in error.value.details()


@pytest.mark.parametrize("which, service", [(0, "dyspec.v1.TargetVerification"), (1, "dyspec.v1.DraftWorker")])
def test_health_and_reflection_answer(services, which, service):
    with grpc.insecure_channel(services[which].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                       timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names
        described = list(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]), timeout=5))
        assert described[0].file_descriptor_response.file_descriptor_proto, "reflection cannot describe the service"
