"""API keys and request limits as pure pieces: where keys come from, the caller each key is named
by (never the key), every refusal's status and message; the context, prompt and body limits and the
OpenAI wording of their 400s / 413s; --public-metrics, from the flag to an in-process
orchestrator's HTTP port. No processes (tests/test_public_api_guards_e2e.py runs them through the
real services)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from orchestrator.auth import OPEN, ApiKeys, Unauthenticated, key_name, keys_from
from orchestrator.config import OrchestratorConfig
from orchestrator.limits import LimitExceeded, RequestLimits, context_from_tokenizer
from orchestrator.openai_http import _error_response
from orchestrator.openai_params import parse
from orchestrator.sdk import Unauthenticated as SdkUnauthenticated
from orchestrator.sdk.credentials import call_metadata, resolve_api_key
from orchestrator.sdk.errors import from_rpc_error
from tests.char_tokenizer import CharTokenizer

KEY_A, KEY_B = "alpha-key-0123456789", "bravo-key-9876543210"


def test_keys_come_from_flags_files_and_the_environment_without_repeats(tmp_path):
    file = tmp_path / "keys"
    file.write_text(f"# team keys\n{KEY_B}\n\n  {KEY_A}  \n")
    keys = keys_from([KEY_A], [str(file)], environ={"DYSPEC_API_KEYS": f" gamma-key-000000, {KEY_A},"})
    assert keys == (KEY_A, KEY_B, "gamma-key-000000")
    assert keys_from(None, None, environ={}) == ()
    empty = tmp_path / "keys.empty"
    empty.write_text("# none yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        keys_from(None, [str(empty)], environ={})
    with pytest.raises(ValueError, match="No such file"):
        keys_from(None, [str(tmp_path / "missing")], environ={})
    with pytest.raises(ValueError, match="too short") as short:
        keys_from(["short"], None, environ={})
    assert "short" not in str(short.value).replace("too short", "")  # named by its hash, not shown


def test_a_caller_is_named_by_its_key_hash_and_every_refusal_says_what_to_send():
    keys = ApiKeys((KEY_A, KEY_B))
    assert keys.caller(f"Bearer {KEY_A}") == key_name(KEY_A) != keys.caller(f"bearer  {KEY_B} ") == key_name(KEY_B)
    assert key_name(KEY_A).startswith("key-") and KEY_A not in key_name(KEY_A)
    cases = {None: "missing API key", "": "missing API key", KEY_A: "must be 'Bearer <key>'",
             "Basic abc": "must be 'Bearer <key>'", "Bearer ": "must be 'Bearer <key>'",
             f"Bearer {KEY_A}x": "invalid API key", f"Bearer {KEY_A[:-1]}": "invalid API key"}
    for value, message in cases.items():
        with pytest.raises(Unauthenticated, match=message) as refused:
            keys.caller(value)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert KEY_A not in refused.value.message and KEY_B not in refused.value.message
    assert ApiKeys().caller(None) == ApiKeys().caller("Bearer anything") == OPEN  # no keys: open


def test_the_http_answer_to_a_bad_key_is_openais_401():
    response = _error_response(Unauthenticated("invalid API key"))
    body = json.loads(response.body)
    assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert body["error"] == {"message": "invalid API key", "type": "invalid_request_error", "param": None,
                             "code": "invalid_api_key"}


def test_the_sdk_sends_its_key_from_the_argument_or_the_openai_variable(monkeypatch):
    assert resolve_api_key("k1", environ={"DYSPEC_API_KEY": "k2"}) == "k1"
    assert resolve_api_key(None, environ={"DYSPEC_API_KEY": "k2", "OPENAI_API_KEY": "k3"}) == "k2"
    assert resolve_api_key(None, environ={"OPENAI_API_KEY": " k3 "}) == "k3"
    assert resolve_api_key(None, environ={}) is None and call_metadata(None) == ()
    assert call_metadata("k1") == (("authorization", "Bearer k1"),)
    with pytest.raises(ValueError, match="api_key is empty"):
        resolve_api_key("  ", environ={})

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAUTHENTICATED

        def details(self):
            return "invalid API key"

    assert isinstance(from_rpc_error(Refused()), SdkUnauthenticated)


def test_config_keeps_keys_out_of_its_repr_and_refuses_negative_limits():
    config = OrchestratorConfig(workers=("localhost:1",), api_keys=(KEY_A,))
    assert KEY_A not in repr(config)
    for bad in ({"max_concurrent_per_key": -1}, {"max_context_tokens": -1}, {"max_prompt_chars": -2},
                {"max_body_bytes": 0}):
        with pytest.raises(ValueError):
            OrchestratorConfig(workers=("localhost:1",), **bad)


class _Tokenizer:
    def __init__(self, length):
        self.model_max_length = length


def test_limits_derive_the_context_from_the_tokenizer_and_the_prompt_bound_from_the_context():
    assert context_from_tokenizer(_Tokenizer(32768)) == 32768
    assert context_from_tokenizer(_Tokenizer(int(1e30))) is None and context_from_tokenizer(object()) is None
    derived = RequestLimits.resolve(0, 0, 1000, _Tokenizer(32768))
    assert (derived.max_context_tokens, derived.max_prompt_chars) == (32768, 32 * 32768)
    given = RequestLimits.resolve(100, 50, 1000, _Tokenizer(32768))
    assert (given.max_context_tokens, given.max_prompt_chars, given.max_body_bytes) == (100, 50, 1000)


def test_prompt_plus_completion_over_the_context_is_refused_with_both_numbers_unless_it_was_a_default():
    limits = RequestLimits(max_context_tokens=100, max_prompt_chars=1000, max_body_bytes=1000)
    assert limits.fit(10, 90) == 90
    with pytest.raises(LimitExceeded) as refused:
        limits.fit(1, 1_000_000_000)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and refused.value.openai_code == "context_length_exceeded"
    assert refused.value.message == ("This model's maximum context length is 100 tokens. However, you requested "
                                     "1000000001 tokens (1 in the prompt, 1000000000 in the completion). Please "
                                     "reduce the length of the prompt or completion.")
    assert limits.fit(30, 256, explicit=False) == 70  # an unset max_tokens is fitted, as vLLM does
    with pytest.raises(LimitExceeded, match="in the messages"):
        limits.fit(100, 1, explicit=False, param="messages")  # nothing left to fit
    assert RequestLimits(None, 10, 10).fit(10**6, 10**9) == 10**9  # context unknown here: the target's applies


def test_prompt_characters_and_body_bytes_are_refused_before_any_work():
    limits = RequestLimits(max_context_tokens=100, max_prompt_chars=20, max_body_bytes=500)
    limits.check_prompt_chars(20)
    with pytest.raises(LimitExceeded, match="21 characters; this server accepts at most 20"):
        limits.check_prompt_chars(21)
    limits.check_body(500)
    limits.check_body(None)  # chunked: aiohttp's client_max_size stops it
    with pytest.raises(LimitExceeded) as big:
        limits.check_body(501)
    response = _error_response(big.value)
    assert response.status == 413 and json.loads(response.body)["error"]["code"] == "request_too_large"


class _CountingTokenizer(CharTokenizer):
    calls = 0

    def __call__(self, text, **kwargs):
        type(self).calls += 1
        return super().__call__(text, **kwargs)


def test_openai_parse_applies_the_limits_and_never_tokenises_an_oversized_prompt():
    tokenizer = _CountingTokenizer()
    limits = RequestLimits(max_context_tokens=40, max_prompt_chars=30, max_body_bytes=10_000)

    def completion(**body):
        return parse(body, chat=False, model_name="m", tokenizer=tokenizer, default_max_tokens=256, limits=limits)

    assert completion(prompt="hello", max_tokens=10).request.max_new_tokens == 10
    assert completion(prompt="hello").request.max_new_tokens == 40 - len(tokenizer("hello")["input_ids"])
    with pytest.raises(LimitExceeded) as refused:
        completion(prompt="hi", max_tokens=1_000_000_000)
    response = _error_response(refused.value)
    error = json.loads(response.body)["error"]
    assert response.status == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "maximum context length is 40 tokens" in error["message"]
    before = _CountingTokenizer.calls
    with pytest.raises(LimitExceeded, match="31 characters"):
        completion(prompt="x" * 31)
    with pytest.raises(LimitExceeded, match="characters") as chat:
        parse({"messages": [{"role": "user", "content": "y" * 20}, {"role": "user", "content": "z" * 20}]},
              chat=True, model_name="m", tokenizer=tokenizer, default_max_tokens=4, limits=limits)
    assert chat.value.param == "messages" and _CountingTokenizer.calls == before
    from orchestrator.openai_params import InvalidParam
    with pytest.raises(InvalidParam, match="max_tokens must be an integer in"):
        completion(prompt="hi", max_tokens=2**40)  # beyond the proto's uint32: a 400, not a crash


def _http_status(url: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize("public", [True, False])
def test_public_metrics_opens_metrics_alone_to_callers_without_a_key(public):
    """An orchestrator started from its command line with keys (and --public-metrics or not), in
    this process, over real HTTP: with the flag a Prometheus scraper reads /metrics with no key while
    the API still wants one; without it /metrics wants a key too. No worker is needed for either."""
    from orchestrator.__main__ import build_parser, config_from_args
    from orchestrator.server import OrchestratorServer
    from tests.background_loop import BackgroundLoop

    argv = ["--worker", "127.0.0.1:1", "--host", "127.0.0.1", "--port", "0", "--http-host", "127.0.0.1",
            "--http-port", "0", "--api-key", KEY_A] + (["--public-metrics"] if public else [])
    config = config_from_args(build_parser().parse_args(argv))
    assert config.public_metrics is public
    loop = BackgroundLoop()

    async def start():
        server = OrchestratorServer(config)
        await server.start()
        return server

    server = loop.run(start())
    try:
        status, page = _http_status(server.http_url + "/metrics")
        assert status == (200 if public else 401), (status, page[:300])
        if public:
            assert "# TYPE dyspec:" in page, page[:300]  # Prometheus text of our metrics
        else:
            assert "missing API key" in page
            assert _http_status(server.http_url + "/metrics", KEY_A)[0] == 200
        assert _http_status(server.http_url + "/v1/models")[0] == 401  # only /metrics is opened
        assert _http_status(server.http_url + "/v1/models", KEY_A)[0] == 200
    finally:
        loop.run(server.stop(grace_s=1))
        loop.close()
