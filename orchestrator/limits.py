"""Request limits checked before any model work: body size, prompt characters (before the
tokenizer runs: tokenising 8 MB took 23 s), and prompt + completion tokens against the context.

The context check follows the OpenAI API and vLLM: a request whose prompt plus *requested*
completion exceeds the context is refused (400 / INVALID_ARGUMENT) with both numbers in the
message, not silently clamped. Only an OpenAI request that left max_tokens unset is fitted to
what the context leaves, as vLLM does for an unset max_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from serving.errors import ServiceError

CHARS_PER_CONTEXT_TOKEN = 32  # the default prompt bound: far more than any tokenizer's characters a token
UNBOUNDED_TOKENIZER_LENGTH = 10**9  # transformers' "no limit" model_max_length is 1e30


class LimitExceeded(ServiceError):
    """A request over a limit: INVALID_ARGUMENT (400) or, for the body, 413. `param` and
    `openai_code` fill OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, openai_code: str | None = None, http_status: int = 400):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.param, self.openai_code, self.http_status = param, openai_code, http_status


def context_from_tokenizer(tokenizer) -> int | None:
    """The tokenizer's model_max_length when it states a real one (Qwen2.5's says 32768)."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length < UNBOUNDED_TOKENIZER_LENGTH else None


@dataclass(frozen=True)
class RequestLimits:
    max_context_tokens: int | None  # prompt + completion; None: not known here (the target still stops at its own)
    max_prompt_chars: int
    max_body_bytes: int

    @classmethod
    def resolve(cls, max_context_tokens: int, max_prompt_chars: int, max_body_bytes: int, tokenizer) -> "RequestLimits":
        """0 means "derive": the context from the tokenizer, the prompt bound from the context."""
        context = max_context_tokens or context_from_tokenizer(tokenizer)
        chars = max_prompt_chars or CHARS_PER_CONTEXT_TOKEN * (context or 32768)
        return cls(context, chars, max_body_bytes)

    def check_body(self, content_length: int | None) -> None:
        if content_length is not None and content_length > self.max_body_bytes:
            raise LimitExceeded(f"the request body has {content_length} bytes; this server accepts at most "
                                f"{self.max_body_bytes}", http_status=413, openai_code="request_too_large")

    def check_prompt_chars(self, chars: int, param: str = "prompt") -> None:
        if chars > self.max_prompt_chars:
            raise LimitExceeded(f"the prompt has {chars} characters; this server accepts at most {self.max_prompt_chars}"
                                + (f" (its context is {self.max_context_tokens} tokens)" if self.max_context_tokens else ""),
                                param, "context_length_exceeded")

    def fit(self, prompt_tokens: int, max_new_tokens: int, explicit: bool = True, param: str = "prompt") -> int:
        """The completion length to generate: `max_new_tokens` if prompt + it fits the context;
        else, when it was not asked for explicitly, what the context leaves; else LimitExceeded."""
        context = self.max_context_tokens
        if context is None or prompt_tokens + max_new_tokens <= context:
            return max_new_tokens
        if not explicit and prompt_tokens < context:
            return context - prompt_tokens
        where = "messages" if param == "messages" else "prompt"
        raise LimitExceeded(f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the {where}, {max_new_tokens} "
                            f"in the completion). Please reduce the length of the {where} or completion.",
                            param, "context_length_exceeded")
