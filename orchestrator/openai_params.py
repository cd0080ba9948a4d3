"""OpenAI request bodies (/v1/completions, /v1/chat/completions) checked and turned into one
dyspec.v1 GenerateRequest. Every rejection names the parameter and says what is accepted.

Supported: model, prompt / messages, max_tokens (max_completion_tokens for chat), temperature,
top_p, seed, stop, n (1 only), stream, stream_options.include_usage, and the extensions top_k,
ignore_eos, dyspec_method, dyspec_budget (sent by the openai client through `extra_body`).
Parameters this server cannot honour are refused when set to anything but their neutral value,
rather than silently ignored; fields with no effect on generation (user, metadata, ...) pass.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.limits import RequestLimits
from orchestrator.tokenizer import chat_prompt, encode
from proto.dyspec.v1 import generation_pb2, sampling_pb2

MAX_SEED = 2**63 - 1
MAX_TOKENS = 2**32 - 1  # the proto's uint32; the context limit refuses far less
NO_LIMITS = RequestLimits(max_context_tokens=None, max_prompt_chars=2**62, max_body_bytes=2**62)
MAX_STOPS = 4  # as OpenAI
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# parameter -> its neutral values; anything else is refused
_UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class InvalidParam(Exception):
    """A 400 (or 404 for an unknown model) in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class OpenAIRequest:
    chat: bool
    request: generation_pb2.GenerateRequest  # prompt as token ids
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # streaming: a last chunk with usage


def parse(body, chat: bool, model_name: str, tokenizer, default_max_tokens: int,
          limits: RequestLimits = NO_LIMITS) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise InvalidParam("the request body must be a JSON object")
    for name, neutral in _UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise InvalidParam(f"{name} is not supported by this server", name)
    model = body.get("model")
    if model not in (None, "", model_name):
        raise InvalidParam(f"The model `{model}` does not exist; this server serves `{model_name}`", "model", 404,
                           "model_not_found")
    n = body.get("n")
    if n not in (None, 1):
        raise InvalidParam(f"n must be 1 (got {n!r}): this server returns one choice per request; "
                           "send several requests for several completions", "n")
    stop = _stop(body.get("stop"))
    if stop and tokenizer is None:
        raise InvalidParam("stop needs a tokenizer, and this server has none", "stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise InvalidParam("stream_options must be an object, and only with stream: true", "stream_options")
    include_usage = bool(options and _bool(options, "include_usage"))

    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, max_name, 1, MAX_TOKENS, None)
    sampling = sampling_pb2.SamplingParams(temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
                                           top_p=_number(body, "top_p", 0.0, 1.0, 1.0, open_low=True),
                                           top_k=max(0, _int(body, "top_k", -1, None, 0)))  # -1: off, as vLLM
    seed = _int(body, "seed", 0, MAX_SEED, None)
    if seed is not None:
        sampling.seed = seed
    method = body.get("dyspec_method", "")
    if not isinstance(method, str):
        raise InvalidParam("dyspec_method must be a string (a tree builder name or 'autoregressive')",
                           "dyspec_method")
    request = generation_pb2.GenerateRequest(sampling=sampling,
                                             ignore_eos=_bool(body, "ignore_eos"), method=method,
                                             budget=_int(body, "dyspec_budget", 0, 1 << 16, 0))
    ids = _chat_ids(body, tokenizer, limits) if chat else _prompt_ids(body, tokenizer, limits)
    request.token_ids.ids[:] = ids
    # max_tokens asked for must fit the context (else 400, as OpenAI and vLLM answer); the default
    # is fitted to what the context leaves.
    request.max_new_tokens = limits.fit(len(ids), default_max_tokens if max_tokens is None else max_tokens,
                                        explicit=max_tokens is not None, param="messages" if chat else "prompt")
    return OpenAIRequest(chat, request, stop, stream, include_usage)


def _prompt_ids(body: dict, tokenizer, limits: RequestLimits) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidParam("this server has no tokenizer: send the prompt as a list of token ids", "prompt")
        limits.check_prompt_chars(len(prompt))  # before the tokenizer spends seconds on a huge one
        ids = encode(tokenizer, prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidParam("batched prompts are not supported: send one prompt per request", "prompt")
    else:
        raise InvalidParam("prompt must be a string or a list of token ids", "prompt")
    if not ids:
        raise InvalidParam("the prompt is empty", "prompt")
    return ids


def _chat_ids(body: dict, tokenizer, limits: RequestLimits) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParam("messages must be a non-empty list of {role, content} objects", "messages")
    if tokenizer is None:
        raise InvalidParam("chat needs a tokenizer, and this server has none", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _CHAT_ROLES:
            raise InvalidParam(f"messages[{i}] must be an object with a role in {list(_CHAT_ROLES)}", "messages")
        plain.append({"role": message["role"], "content": _content(message.get("content"), i)})
    limits.check_prompt_chars(sum(len(m["content"]) for m in plain), "messages")
    return chat_prompt(tokenizer, plain)


def _content(content, i: int) -> str:
    """A string, or a list of text parts (the only part type this text-only server takes)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidParam(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise InvalidParam(f"stop must be a non-empty string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    return tuple(stops)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidParam(f"{name} must be true or false", name)
    return bool(value)


def _int(body: dict, name: str, low: int, high: int | None, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidParam(f"{name} must be an integer {bounds}, got {value!r}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, default: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        low < value <= high if open_low else low <= value <= high)
    if not ok:
        raise InvalidParam(f"{name} must be a number in {'(' if open_low else '['}{low:g}, {high:g}], got {value!r}",
                           name)
    return float(value)
