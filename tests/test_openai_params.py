"""The orchestrator's pure pieces, literally: OpenAI parameter checks, stop strings across chunks,
status mappings, and the SDK's retry rule. No processes, no models."""
from __future__ import annotations

import random

import grpc
import pytest

from orchestrator.openai_http import _error_response
from orchestrator.openai_params import InvalidParam, parse
from orchestrator.sdk import (DeadlineExceeded, InvalidRequest, NotFound, Overloaded, RetryPolicy, ServerError,
                              Unavailable)
from orchestrator.sdk.errors import from_rpc_error
from orchestrator.stop import StopMatcher
from serving.errors import ServiceError
from tests.char_tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()


def completion(**body):
    return parse({"prompt": "hi", **body}, chat=False, model_name="m", tokenizer=TOKENIZER, default_max_tokens=16)


def test_parameters_become_one_generate_request():
    parsed = completion(max_tokens=5, temperature=0.5, top_p=0.9, top_k=-1, seed=7, stop="x", stream=True,
                        stream_options={"include_usage": True}, dyspec_method="chain", dyspec_budget=4,
                        ignore_eos=True, user="someone", model="m")
    r = parsed.request
    assert list(r.token_ids.ids) == TOKENIZER("hi")["input_ids"] and r.max_new_tokens == 5
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k, r.sampling.seed) == (0.5, 0.9, 0, 7)
    assert (r.method, r.budget, r.ignore_eos) == ("chain", 4, True)
    assert (parsed.stop, parsed.stream, parsed.include_usage) == (("x",), True, True)
    defaults = completion().request
    assert defaults.max_new_tokens == 16 and defaults.sampling.temperature == 1.0
    assert not defaults.sampling.HasField("seed")
    assert list(completion(prompt=[[5, 6]]).request.token_ids.ids) == [5, 6]


def test_chat_uses_the_plain_join_without_a_template():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parsed = parse({"messages": [{"role": "user", "content": parts}], "max_completion_tokens": 3}, chat=True,
                   model_name="m", tokenizer=TOKENIZER, default_max_tokens=9)
    assert list(parsed.request.token_ids.ids) == TOKENIZER("user: ab\nassistant:")["input_ids"]
    assert parsed.request.max_new_tokens == 3


@pytest.mark.parametrize("body, param, status", [
    ({"n": 2}, "n", 400),
    ({"temperature": 2.5}, "temperature", 400),
    ({"temperature": True}, "temperature", 400),
    ({"top_p": 0}, "top_p", 400),
    ({"max_tokens": 1.5}, "max_tokens", 400),
    ({"seed": -1}, "seed", 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"stream_options": {"include_usage": True}}, "stream_options", 400),  # without stream
    ({"prompt": ""}, "prompt", 400),
    ({"prompt": {"text": "x"}}, "prompt", 400),
    ({"presence_penalty": 1}, "presence_penalty", 400),
    ({"dyspec_budget": -1}, "dyspec_budget", 400),
    ({"dyspec_method": 3}, "dyspec_method", 400),
    ({"model": "other"}, "model", 404),
])
def test_bad_parameters_name_themselves(body, param, status):
    with pytest.raises(InvalidParam) as raised:
        completion(**body)
    assert (raised.value.param, raised.value.status) == (param, status) and raised.value.message


def test_text_needs_a_tokenizer():
    with pytest.raises(InvalidParam, match="token ids"):
        parse({"prompt": "hi"}, chat=False, model_name="m", tokenizer=None, default_max_tokens=4)
    assert list(parse({"prompt": [1]}, chat=False, model_name="m", tokenizer=None,
                      default_max_tokens=4).request.token_ids.ids) == [1]


def test_stop_strings_are_found_across_chunks_and_never_sent():
    stop = StopMatcher(("END", "xy"))
    assert stop.push("abcE") == "abc"  # "E" may start "END"
    assert stop.push("N") == ""
    assert stop.push("Dzzz") == "" and stop.stopped
    assert stop.push("more") == "" and stop.flush() == ""
    early = StopMatcher(("bb", "abc"))
    assert early.push("aab") == "a" and early.push("bx") == "a" and early.stopped  # "bb" ends first at index 2
    plain = StopMatcher(("zz",))
    assert plain.push("az") == "a" and plain.push("b") == "zb" and plain.flush() == "" and not plain.stopped
    tail = StopMatcher(("zz",))
    assert tail.push("az") == "a" and tail.flush() == "z"
    assert StopMatcher(()).push("anything") == "anything"


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.NOT_FOUND, 404), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INTERNAL, 500),
])
def test_grpc_statuses_map_to_http(code, status):
    response = _error_response(ServiceError(code, "why"))
    assert response.status == status and b'"why"' in response.body


class FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "details"


def test_sdk_errors_are_typed_by_status():
    expected = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest, grpc.StatusCode.NOT_FOUND: NotFound,
                grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded, grpc.StatusCode.UNAVAILABLE: Unavailable,
                grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded, grpc.StatusCode.INTERNAL: ServerError}
    for code, kind in expected.items():
        error = from_rpc_error(FakeRpcError(code))
        assert type(error) is kind and error.code == code and error.details == "details"


def test_retry_only_unavailable_before_the_first_message_within_attempts_and_deadline():
    policy, rng = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=0.3), random.Random(0)
    delays = [policy.delay_s(attempt, rng) for attempt in (1, 2, 3, 4, 5) for _ in range(200)]
    assert 0 <= min(delays) and max(delays) <= 0.3
    assert max(policy.delay_s(1, rng) for _ in range(200)) <= 0.1  # capped by the first backoff
    ok = dict(code=grpc.StatusCode.UNAVAILABLE, attempt=1, received=False, remaining_s=5.0, delay_s=0.1)
    assert policy.should_retry(**ok)
    assert not policy.should_retry(**ok | {"code": grpc.StatusCode.RESOURCE_EXHAUSTED})
    assert not policy.should_retry(**ok | {"received": True})
    assert not policy.should_retry(**ok | {"attempt": 3})
    assert not policy.should_retry(**ok | {"remaining_s": 0.05})
