"""The public API's guards through the real services (target, draft worker, orchestrator on
loopback): API keys on HTTP and gRPC (probes stay open, keys never reach the log), per-key and
server-wide admission, request limits answered before any model work, and a load of 64 concurrent
requests against --max-concurrent 8: each completes or is refused at once, none hangs, memory
stays bounded and every store is empty afterwards."""
from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import grpc
import openai
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.sdk import Client, Overloaded, Unauthenticated
from tests.service_process import ServiceProcess
from tests.test_orchestrator_e2e import (MODEL, PROMPT, orchestrator_process, target_open, wait_for, worker_active,
                                         worker_process)

KEYS = ("key-a-0123456789abcdef", "key-b-0123456789abcdef", "key-c-0123456789abcdef")
PER_KEY, SERVER = 5, 8
CONTEXT, PROMPT_CHARS, BODY_BYTES = 200, 300, 4096
# RSS growth allowed per process under the 64-request load, at its peak and once it is over. Seen
# here: a few MB (target and worker ~400 MB, orchestrator ~55 MB); state kept per refused or queued
# request, or a leak per request, would take far more. Generous, so allocator noise never trips it.
PEAK_GROWTH_MB, AFTER_GROWTH_MB = 200, 150
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("guard-logs")
    key_file = logs / "keys"
    key_file.write_text("# test keys\n" + "\n".join(KEYS[:2]) + "\n")
    started = []
    try:
        target = ServiceProcess.module("target_service", ["--model-factory", "tests.service_models:target"],
                                       logs / "target.log")
        started.append(target)
        target.wait_ready(120)
        worker = worker_process(logs, "worker", target.address)
        started.append(worker)
        worker.wait_ready(120)
        front = orchestrator_process(
            logs, "orchestrator", [worker.address], "--api-key-file", str(key_file), "--api-key", KEYS[2],
            "--max-concurrent", str(SERVER), "--max-concurrent-per-key", str(PER_KEY),
            "--max-context-tokens", str(CONTEXT), "--max-prompt-chars", str(PROMPT_CHARS),
            "--max-body-bytes", str(BODY_BYTES))
        started.append(front)
        front.wait_ready(60)
        front.http = front.ready_line.split()[2]
        yield target, worker, front
    finally:
        for process in reversed(started):
            process.stop()


def request(url: str, body=None, key: str | None = None, raw: bytes | None = None) -> tuple[int, dict, float]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as response:
            return response.status, json.loads(response.read()), time.perf_counter() - start
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if text.startswith(b"{") else {"text": text.decode()}, \
            time.perf_counter() - start


def freed(stack) -> None:
    target, worker, _ = stack
    wait_for(lambda: worker_active(worker) == 0 and target_open(target) == 0, 10, "sessions to be freed",
             lambda: f"worker {worker_active(worker)}, target {target_open(target)}")


def test_http_needs_a_key_except_health_and_says_so_as_openai_does(stack):
    http = stack[2].http
    body = {"prompt": PROMPT, "max_tokens": 4}
    for key, message in ((None, "missing API key"), ("key-z-0123456789abcdef", "invalid API key")):
        status, answer, _ = request(http + "/v1/completions", body, key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key" and message in answer["error"]["message"]
        assert request(http + "/v1/models", key=key)[0] == 401
        assert request(http + "/metrics", key=key)[0] == 401  # not --public-metrics
    assert request(http + "/health")[0] == 200
    for key in KEYS:  # from the file and from the flag
        status, answer, _ = request(http + "/v1/completions", body, key)
        assert status == 200 and answer["usage"]["completion_tokens"] == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=http + "/v1", api_key="wrong-key-0000", max_retries=0).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2)
    reply = openai.OpenAI(base_url=http + "/v1", api_key=KEYS[0], max_retries=0, timeout=60).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_grpc_needs_a_key_the_sdk_sends_it_and_health_stays_open(stack, monkeypatch):
    address = stack[2].address
    monkeypatch.delenv("DYSPEC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with Client(address, timeout=30) as anonymous:
        with pytest.raises(Unauthenticated, match="missing API key"):
            anonymous.generate(PROMPT, 2)
    with Client(address, timeout=30, api_key="key-z-0123456789abcdef") as wrong:
        with pytest.raises(Unauthenticated, match="invalid API key"):
            wrong.generate(PROMPT, 2)
        assert wrong.attempts == 1  # not retried
    with Client(address, timeout=30, api_key=KEYS[1]) as keyed:
        assert len(keyed.generate(PROMPT, 5).token_ids) == 5
    monkeypatch.setenv("OPENAI_API_KEY", KEYS[2])  # as the openai client reads it
    with Client(address, timeout=30) as from_env:
        assert len(from_env.generate(PROMPT, 2).token_ids) == 2
    with grpc.insecure_channel(address) as channel:
        probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert probe.status == health_pb2.HealthCheckResponse.SERVING


def test_keys_never_reach_the_log(stack):
    log = stack[2].log_path.read_text()
    assert log and not any(key in log for key in (*KEYS, "key-z-0123456789abcdef"))


def test_context_prompt_and_body_limits_are_answered_before_any_model_work(stack):
    http = stack[2].http
    rounds_before = target_rounds(stack)
    status, answer, took = request(http + "/v1/completions", {"prompt": [5], "max_tokens": 1_000_000_000}, KEYS[0])
    assert status == 400 and took < 2, (status, took)
    assert answer["error"]["code"] == "context_length_exceeded" and answer["error"]["message"].startswith(
        f"This model's maximum context length is {CONTEXT} tokens. However, you requested 1000000001 tokens")
    status, answer, _ = request(http + "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "y" * (PROMPT_CHARS + 1)}]}, KEYS[0])
    assert status == 400 and answer["error"]["param"] == "messages" and "characters" in answer["error"]["message"]
    huge = json.dumps({"prompt": "x" * (8 << 20), "max_tokens": 1}).encode()
    status, answer, took = request(http + "/v1/completions", key=KEYS[0], raw=huge)
    assert status == 413 and answer["error"]["code"] == "request_too_large" and took < 5, (status, took)
    with Client(stack[2].address, timeout=30, api_key=KEYS[0]) as client:
        with pytest.raises(Exception, match="maximum context length") as refused:
            client.generate(PROMPT, 10**9)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(Exception, match="characters"):
            client.generate("z" * (PROMPT_CHARS + 1), 2)
    # a request that leaves max_tokens unset is fitted to the context, not refused
    status, answer, _ = request(http + "/v1/completions", {"prompt": [5] * (CONTEXT - 3), "ignore_eos": True}, KEYS[0])
    assert status == 200 and answer["usage"]["completion_tokens"] <= 3
    assert target_rounds(stack) > rounds_before  # only that last request reached the target
    freed(stack)


def target_rounds(stack) -> int:
    from proto.dyspec.v1 import target_pb2, target_pb2_grpc

    with grpc.insecure_channel(stack[0].address) as channel:
        return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(),
                                                                     timeout=5).rounds_verified


def test_a_key_at_its_limit_is_refused_while_other_keys_are_served(stack):
    freed(stack)
    with Client(stack[2].address, timeout=60, api_key=KEYS[0]) as a, \
            Client(stack[2].address, timeout=60, api_key=KEYS[1]) as b:
        held = [a.stream(PROMPT, 150, temperature=1.0, seed=i, method="autoregressive", ignore_eos=True)
                for i in range(PER_KEY)]
        try:
            for stream in held:
                next(stream)
            with pytest.raises(Overloaded, match=f"at its limit of {PER_KEY} concurrent requests"):
                a.generate(PROMPT, 2)
            assert request(stack[2].http + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, KEYS[0])[0] == 429
            assert len(b.generate(PROMPT, 3).token_ids) == 3
        finally:
            for stream in held:
                stream.close()
    freed(stack)


def _rss_mb(processes) -> list[float]:
    return [sum(p.memory_info().rss for p in [psutil.Process(s.proc.pid), *psutil.Process(s.proc.pid).children(True)])
            / 2**20 for s in processes]


def test_64_concurrent_requests_against_8_each_finish_or_are_refused_at_once(stack):
    freed(stack)
    before = _rss_mb(stack)

    def over_http(i: int):
        status, answer, took = request(stack[2].http + "/v1/completions",
                                       {"prompt": PROMPT, "max_tokens": 24, "ignore_eos": True}, KEYS[i % 3])
        return ("ok" if status == 200 else status), took, answer.get("usage", {}).get("completion_tokens")

    def over_grpc(i: int):
        start = time.perf_counter()
        with Client(stack[2].address, timeout=60, api_key=KEYS[i % 3]) as client:
            try:
                tokens = len(client.generate(PROMPT, 24, ignore_eos=True).token_ids)
                return "ok", time.perf_counter() - start, tokens
            except Overloaded:
                return 429, time.perf_counter() - start, None

    start = time.perf_counter()
    samples = []
    with concurrent.futures.ThreadPoolExecutor(65) as pool:
        futures = [pool.submit(over_http if i % 2 else over_grpc, i) for i in range(64)]
        while True:  # the peak, sampled while the load runs (at least once, however fast it ends)
            samples.append(_rss_mb(stack))
            if all(f.done() for f in futures) or time.perf_counter() - start >= 120:
                break
            time.sleep(0.05)
        results = [f.result(timeout=1) for f in futures]  # none hangs
    wall = time.perf_counter() - start
    peak = [max(column) for column in zip(*samples)]
    done = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == 429]
    assert len(done) + len(refused) == 64, results  # nothing else: no 5xx, no deadline
    assert all(tokens == 24 for _, _, tokens in done)
    assert len(done) >= SERVER and refused, (len(done), len(refused))
    assert max(took for _, took, _ in refused) < 2.0, sorted(took for _, took, _ in refused)[-5:]
    freed(stack)
    with urllib.request.urlopen(urllib.request.Request(stack[2].http + "/metrics",
                                                       headers={"Authorization": f"Bearer {KEYS[0]}"})) as page:
        running = [line for line in page.read().decode().splitlines()
                   if line.startswith("dyspec:num_requests_running{")]
    assert running and float(running[0].split()[-1]) == 0
    after = _rss_mb(stack)
    print(f"64 at once: {len(done)} done, {len(refused)} refused in {wall:.1f} s; RSS MB before/peak/after "
          f"target {before[0]:.0f}/{peak[0]:.0f}/{after[0]:.0f}, worker {before[1]:.0f}/{peak[1]:.0f}/{after[1]:.0f}, "
          f"orchestrator {before[2]:.0f}/{peak[2]:.0f}/{after[2]:.0f}")
    assert all(p - b < PEAK_GROWTH_MB for p, b in zip(peak, before)), (before, peak)
    assert all(a - b < AFTER_GROWTH_MB for a, b in zip(after, before)), (before, after)
