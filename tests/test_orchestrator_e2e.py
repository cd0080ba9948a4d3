"""The whole system across processes: target, draft worker and orchestrator on loopback, reached
through the client SDK (sync and asyncio), the `openai` package and plain HTTP.

Greedy output through every front door equals in-process target-only greedy decoding; metrics
count what the requests did; bad requests get clear statuses and the server keeps serving; the
SDK and the orchestrator retry UNAVAILABLE; deadlines and disconnects free the sessions."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dyspec import generate
from orchestrator.sdk import (AsyncClient, Client, DeadlineExceeded, InvalidRequest, NotFound, Overloaded,
                              RetryPolicy, Unavailable)
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, target_pb2, target_pb2_grpc
from tests import service_models
from tests.char_tokenizer import CharTokenizer
from tests.service_process import ServiceProcess, free_port

PROMPT = [3, 1, 4, 1, 5]
NEW_TOKENS = 20
MODEL = "tiny"
MAX_CONCURRENT = 2
TOKENIZER = ["--tokenizer-factory", "tests.char_tokenizer:char_tokenizer"]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


def orchestrator_process(logs, name: str, workers: list[str], *extra: str) -> ServiceProcess:
    args = [a for w in workers for a in ("--worker", w)]
    return ServiceProcess.module("orchestrator", [*args, "--http-port", "0", "--model-name", MODEL,
                                                  "--health-interval-s", "0.5", *TOKENIZER, *extra],
                                 logs / f"{name}.log")


def worker_process(logs, name: str, target: str, *extra: str) -> ServiceProcess:
    return ServiceProcess.module("draft_service", ["--target-address", target, "--budget", "8", *extra,
                                                   "--model-factory", "tests.service_models:draft"],
                                 logs / f"{name}.log")


@pytest.fixture(scope="module")
def stack(logs):
    """(target, worker, orchestrator) processes; the orchestrator's HTTP base URL in .http."""
    started = []
    try:
        target = ServiceProcess.module("target_service", ["--model-factory", "tests.service_models:target"],
                                       logs / "target.log")
        started.append(target)
        target.wait_ready(120)
        worker = worker_process(logs, "worker", target.address)
        started.append(worker)
        worker.wait_ready(120)
        front = orchestrator_process(logs, "orchestrator", [worker.address], "--max-concurrent", str(MAX_CONCURRENT))
        started.append(front)
        front.wait_ready(60)
        front.http = front.ready_line.split()[2]
        yield target, worker, front
        assert front.stop() == 0, "the orchestrator did not drain and exit cleanly on SIGTERM"
    finally:
        for process in reversed(started):
            process.stop()


@pytest.fixture(scope="module")
def models():
    return service_models.target(), service_models.draft()


@pytest.fixture(scope="module")
def expected(models):
    """prompt ids -> in-process target-only greedy tokens."""
    def greedy(prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
        return generate(*models, prompt, max_new_tokens=new_tokens, method="autoregressive").tokens
    return greedy


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack[2].address, timeout=60) as c:
        yield c


def encode(text: str) -> list[int]:
    return CharTokenizer()(text)["input_ids"]


def decode(ids: list[int]) -> str:
    return CharTokenizer().decode(ids)


def http_json(url: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def worker_active(worker) -> int:
    with grpc.insecure_channel(worker.address) as channel:
        return generation_pb2_grpc.DraftWorkerStub(channel).Stats(generation_pb2.WorkerStatsRequest(),
                                                                  timeout=5).active_sessions


def target_open(target) -> int:
    with grpc.insecure_channel(target.address) as channel:
        return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(),
                                                                     timeout=5).open_sessions


def wait_for(condition, timeout: float, what: str, describe=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {describe() if describe else ''}"
        time.sleep(0.05)


def sessions_freed(stack) -> None:
    wait_for(lambda: worker_active(stack[1]) == 0 and target_open(stack[0]) == 0, 10,
             "the worker and the target to free the session",
             lambda: f"worker sessions {worker_active(stack[1])}, target sessions {target_open(stack[0])}")


# --- gRPC through the SDK ---------------------------------------------------------------------


def test_sdk_greedy_equals_target_only_greedy(client, expected):
    result = client.generate(PROMPT, NEW_TOKENS)
    assert result.token_ids == expected(PROMPT)
    assert result.text == decode(result.token_ids), "text comes from the orchestrator's tokenizer"
    assert result.finish_reason == "length"
    stats = result.stats
    assert (stats.generated_tokens, stats.prompt_tokens) == (NEW_TOKENS, len(PROMPT))
    assert len(stats.rounds) == stats.steps and stats.drafted_tokens == sum(r.drafted_tokens for r in stats.rounds)
    assert sum(stats.accepted_per_position) == stats.accepted_tokens
    assert result.tokens_per_s > 0 and result.tokens_per_step == pytest.approx(NEW_TOKENS / stats.steps)
    text = client.generate("hello world", NEW_TOKENS)
    assert text.token_ids == expected(encode("hello world")) and text.stats.prompt_tokens == len("hello world")


def test_sdk_streams_sync_and_async(client, stack, expected):
    chunks = list(client.stream(PROMPT, NEW_TOKENS))
    assert len(chunks) > 2 and chunks[-1].stats is not None and chunks[-1].finish_reason == "length"
    assert [t for c in chunks[:-1] for t in c.token_ids] == expected(PROMPT)
    assert all(c.token_ids for c in chunks[:-1])

    async def use_async_client():
        async with AsyncClient(stack[2].address, timeout=60) as aclient:
            streamed = [c async for c in aclient.stream("abc", NEW_TOKENS)]
            whole = await aclient.generate(PROMPT, NEW_TOKENS)
            return streamed, whole

    streamed, whole = asyncio.run(use_async_client())
    assert [t for c in streamed for t in c.token_ids] == expected(encode("abc"))
    assert "".join(c.text for c in streamed) == decode(expected(encode("abc")))
    assert whole.token_ids == expected(PROMPT)


def test_a_client_that_leaves_right_after_the_summary_leaves_no_session_behind(stack):
    with grpc.insecure_channel(stack[2].address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for _ in range(10):
            call = stub.Generate(generation_pb2.GenerateRequest(
                token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=4), timeout=30)
            assert any(response.HasField("summary") for response in call)  # reads up to the summary ...
            call.cancel()  # ... and cancels while the worker may still be closing its target session
    sessions_freed(stack)


def test_bad_grpc_requests_get_typed_errors_and_the_server_keeps_serving(client, expected):
    cases = [(InvalidRequest, dict(prompt=PROMPT, max_new_tokens=0)),
             (InvalidRequest, dict(prompt=[], max_new_tokens=4)),
             (InvalidRequest, dict(prompt=PROMPT, max_new_tokens=4, method="medusa")),
             (InvalidRequest, dict(prompt=[999], max_new_tokens=4)),
             (InvalidRequest, dict(prompt=PROMPT, max_new_tokens=4, top_p=2.0)),
             (NotFound, dict(prompt=PROMPT, max_new_tokens=4, model="gpt-4"))]
    for error, kwargs in cases:
        with pytest.raises(error) as raised:
            client.generate(kwargs.pop("prompt"), **kwargs)
        assert raised.value.details, kwargs
    assert client.generate(PROMPT, NEW_TOKENS).token_ids == expected(PROMPT)


def test_grpc_health_and_reflection_answer_on_the_public_port(stack):
    with grpc.insecure_channel(stack[2].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "dyspec.v1.Generation"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert {"dyspec.v1.Generation", "grpc.health.v1.Health"} <= names


def test_a_deadline_shorter_than_the_generation_is_deadline_exceeded_and_frees_the_sessions(client, stack):
    sessions_freed(stack)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.generate(PROMPT, 240, temperature=1.0, seed=0, method="autoregressive", ignore_eos=True, timeout=0.3)
    assert time.monotonic() - start < 2.0
    sessions_freed(stack)


def test_admission_limits_concurrent_requests(client, stack):
    sessions_freed(stack)
    holders = [client.stream(PROMPT, 240, temperature=1.0, seed=0, method="autoregressive", ignore_eos=True)
               for _ in range(MAX_CONCURRENT)]
    try:
        for held in holders:
            next(held)  # each request is running
        with pytest.raises(Overloaded) as raised:
            client.generate(PROMPT, 4)
        assert str(MAX_CONCURRENT) in raised.value.details
        status, body = http_json(stack[2].http + "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
        assert status == 429 and body["error"]["message"]
    finally:
        for held in holders:
            held.close()
    sessions_freed(stack)


# --- HTTP: the OpenAI API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=stack[2].http + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_completions_plain_and_streamed(oai, expected):
    want = decode(expected(encode("hello"), 16))
    done = oai.completions.create(model=MODEL, prompt="hello", max_tokens=16, temperature=0)
    assert done.choices[0].text == want and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 16, 21)
    assert done.model_extra["dyspec"]["steps"] >= 1
    chunks = list(oai.completions.create(model=MODEL, prompt="hello", max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    ids = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                 extra_body={"dyspec_method": "chain", "dyspec_budget": 4})
    assert ids.choices[0].text == decode(expected(PROMPT)) and ids.model_extra["dyspec"]["method"] == "chain"


def test_openai_chat_plain_and_streamed(oai, expected):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = decode(expected(encode("system: be brief\nuser: hi\nassistant:"), 12))
    done = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert done.choices[0].message.content == want and done.choices[0].message.role == "assistant"
    assert done.object == "chat.completion" and done.usage.completion_tokens == 12
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_before_them(oai, expected, stack):
    full = decode(expected(encode("hello"), 16))
    stop = full[5:7]
    want = full[:full.index(stop)]
    done = oai.completions.create(model=MODEL, prompt="hello", max_tokens=16, temperature=0, stop=[stop, "@@@@"])
    assert (done.choices[0].text, done.choices[0].finish_reason) == (want, "stop")
    streamed = list(oai.completions.create(model=MODEL, prompt="hello", max_tokens=16, temperature=0, stop=stop,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want and streamed[-1].choices[0].finish_reason == "stop"
    sessions_freed(stack)  # stopping early cancelled the generation


def test_health_models_and_metrics(stack, oai):
    status, body = http_json(stack[2].http + "/health")
    assert status == 200 and body["status"] == "ok"
    assert [m.id for m in oai.models.list().data] == [MODEL]

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(stack[2].http + "/metrics", timeout=10) as response:
            lines = response.read().decode().splitlines()
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines
                                                        if line and not line.startswith("#"))}

    label = f'{{model_name="{MODEL}"}}'
    names = [f"dyspec:spec_decode_num_drafts_total{label}", f"dyspec:spec_decode_num_draft_tokens_total{label}",
             f"dyspec:spec_decode_round_seconds_count{label}", f"dyspec:time_to_first_token_seconds_count{label}",
             f"dyspec:e2e_request_latency_seconds_count{label}", f"dyspec:generation_tokens_total{label}"]
    before = scrape()
    oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    after = scrape()
    for name in names:
        assert after[name] > before.get(name, 0.0), name
    assert after[f"dyspec:spec_decode_num_accepted_tokens_total{label}"] == sum(
        v for k, v in after.items() if k.startswith("dyspec:spec_decode_num_accepted_tokens_per_pos_total"))
    assert f"dyspec:spec_decode_budget{label}" in after and f"dyspec:num_requests_running{label}" in after
    assert f"dyspec:spec_decode_round_network_seconds_count{label}" in after
    # every round reports its target forward's batch (rows >= 1, sessions >= 1) and its queue wait
    rounds = after[f"dyspec:spec_decode_round_seconds_count{label}"] - before.get(
        f"dyspec:spec_decode_round_seconds_count{label}", 0.0)
    for name in ("dyspec:target_batch_rows", "dyspec:target_batch_sessions", "dyspec:spec_decode_round_target_queue_seconds"):
        counted = after[f"{name}_count{label}"] - before.get(f"{name}_count{label}", 0.0)
        assert counted == rounds > 0, name
    assert after[f"dyspec:target_batch_rows_sum{label}"] - before.get(f"dyspec:target_batch_rows_sum{label}", 0.0) >= rounds
    assert after[f'dyspec:draft_workers{{model_name="{MODEL}",state="healthy"}}'] == 1
    assert after[f'dyspec:draft_workers{{model_name="{MODEL}",state="down"}}'] == 0


def test_bad_http_requests_get_400_with_a_message_and_the_server_keeps_serving(stack, oai, expected):
    url = stack[2].http
    cases = [
        ("/v1/completions", None, b"{not json", 400, None),
        ("/v1/completions", {"prompt": "hi", "n": 2}, None, 400, "n"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, None, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
        ("/v1/completions", {"prompt": ["a", "b"]}, None, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": [""]}, None, 400, "stop"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 3}, None, 400, "logprobs"),
        ("/v1/completions", {"prompt": [999], "max_tokens": 2}, None, 400, None),
        ("/v1/completions", {"prompt": "hi", "dyspec_method": "medusa"}, None, 400, None),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, None, 404, "model"),
        ("/v1/chat/completions", {"messages": "hi"}, None, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages"),
    ]
    for path, body, raw, status, param in cases:
        got, answer = http_json(url + path, body, raw)
        assert got == status, (path, body, raw, answer)
        assert answer["error"]["message"] and answer["error"]["param"] == param, answer
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=MODEL, prompt="hi", n=3)
    assert "n must be 1" in raised.value.message
    done = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert done.choices[0].text == decode(expected(PROMPT))


def test_an_http_client_that_disconnects_mid_stream_frees_the_sessions(stack):
    sessions_freed(stack)
    host, port = stack[2].http.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"prompt": PROMPT, "max_tokens": 240, "temperature": 1.0, "ignore_eos": True, "stream": True,
            "dyspec_method": "autoregressive"}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert worker_active(stack[1]) == 1
    connection.sock.close()  # gone without a word
    connection.close()
    sessions_freed(stack)


# --- failures: unreachable and restarted workers ------------------------------------------------


def test_sdk_gives_up_on_an_unreachable_server_with_unavailable_within_its_deadline():
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)
    with Client(f"127.0.0.1:{free_port()}", timeout=10, retry=policy) as nowhere:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            nowhere.generate(PROMPT, 4)
        assert nowhere.attempts == 4 and time.monotonic() - start < 5
    patient = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.2)
    with Client(f"127.0.0.1:{free_port()}", timeout=10, retry=patient) as nowhere:
        start = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            nowhere.generate(PROMPT, 4, timeout=1.0)
        assert time.monotonic() - start < 1.5, "retries must stop at the call's deadline"


def test_orchestrator_routes_around_a_down_worker(stack, logs, expected):
    live = stack[1].address
    front = orchestrator_process(logs, "orchestrator-two-workers", [f"127.0.0.1:{free_port()}", live])
    try:
        front.wait_ready(60)
        with Client(front.address, timeout=30, retry=RetryPolicy(max_attempts=1)) as c:
            for _ in range(3):  # whichever worker round-robin starts with, the live one answers
                assert c.generate(PROMPT, NEW_TOKENS).token_ids == expected(PROMPT)
    finally:
        assert front.stop() == 0


def test_a_dns_worker_name_reaches_the_workers_it_resolves_to(stack, logs, expected):
    port = stack[1].address.rsplit(":", 1)[1]
    front = orchestrator_process(logs, "orchestrator-dns", [f"dns:///localhost:{port}"])
    try:
        front.wait_ready(60)
        with Client(front.address, timeout=30, retry=RetryPolicy(max_attempts=1)) as c:
            for _ in range(2):  # localhost may also resolve to ::1, where nothing listens: routed around
                assert c.generate(PROMPT, NEW_TOKENS).token_ids == expected(PROMPT)
    finally:
        assert front.stop() == 0
    assert f"worker 127.0.0.1:{port} discovered" in front.log_path.read_text()


def test_sdk_retries_until_a_worker_comes_up(stack, logs, expected):
    port = free_port()
    front = orchestrator_process(logs, "orchestrator-late-worker", [f"127.0.0.1:{port}"])
    worker = None
    try:
        front.wait_ready(60)
        with Client(front.address, timeout=10, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.05)) as c:
            with pytest.raises(Unavailable) as raised:
                c.generate(PROMPT, 4)
            assert "no draft worker" in raised.value.details and c.attempts == 2
        outcome = {}
        patient = Client(front.address, timeout=90, retry=RetryPolicy(max_attempts=10_000, max_backoff_s=0.5))

        def call():
            with patient:
                try:
                    outcome["result"] = patient.generate(PROMPT, NEW_TOKENS)
                except Exception as error:  # reported by the assertion below
                    outcome["error"] = error

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)  # the first attempts fail: nothing listens on the port yet
        worker = worker_process(logs, "late-worker", stack[0].address, "--port", str(port))
        caller.join(100)
        assert "result" in outcome, f"no success once the worker came up ({patient.attempts} attempts): {outcome}"
        assert outcome["result"].token_ids == expected(PROMPT) and patient.attempts > 1
    finally:
        if worker is not None:
            worker.stop()
        assert front.stop() == 0


def test_a_dns_name_that_resolves_to_nothing_is_unavailable_with_the_name_in_the_message(logs):
    """Before any draft pod exists (the headless Service has no endpoints yet) the orchestrator is up,
    says why it cannot serve on every front door, and does not crash."""
    name = "dns:///no-such-draft.invalid:50062"  # .invalid never resolves (RFC 2606)
    front = orchestrator_process(logs, "orchestrator-no-workers", [name])
    try:
        front.wait_ready(60)
        with Client(front.address, timeout=10, retry=RetryPolicy(max_attempts=1)) as c:
            with pytest.raises(Unavailable) as raised:
                c.generate(PROMPT, 4)
        assert "no draft worker is known yet" in raised.value.details
        assert f"{name} -> 0 addresses" in raised.value.details
        http = front.ready_line.split()[2]
        status, body = http_json(f"{http}/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 4})
        assert status == 503 and "no draft worker is known yet" in body["error"]["message"], body
        status, body = http_json(f"{http}/health")
        assert status == 503 and body["status"] == "no healthy draft worker"
    finally:
        assert front.stop() == 0
