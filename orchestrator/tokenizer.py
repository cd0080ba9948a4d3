"""The orchestrator's only model artefact: the tokenizer. It turns text prompts and chat messages
into token ids (workers and the target see ids only) and ids back into text."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizerSource:
    tokenizer_dir: str | None = None  # a transformers tokenizer (or model) folder
    factory: str | None = None  # "module:function" returning a tokenizer-like object (tests)
    factory_kwargs: str = "{}"

    def __post_init__(self):
        if self.tokenizer_dir is not None and self.factory is not None:
            raise ValueError("give a tokenizer folder or a tokenizer factory, not both")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"tokenizer factory must look like 'module:function', got {self.factory!r}")


def load_tokenizer(source: TokenizerSource):
    """The tokenizer, or None when neither a folder nor a factory was given (token-id prompts only).

    A tokenizer needs `__call__(text, add_special_tokens=...)["input_ids"]` and
    `decode(ids, skip_special_tokens=True)`; a `chat_template` and `apply_chat_template` are optional."""
    if source.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source.tokenizer_dir)
    if source.factory is not None:
        module, function = source.factory.split(":", 1)
        return getattr(importlib.import_module(module), function)(**json.loads(source.factory_kwargs))
    return None


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """As the worker tokenises a text prompt (special tokens added as the tokenizer does)."""
    return [int(t) for t in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat ending where the assistant's reply starts.

    With the tokenizer's chat template when it has one (the template writes the special tokens, so
    none are added again); otherwise one "role: content" line per message and a final "assistant:"."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return encode(tokenizer, text, add_special_tokens=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return encode(tokenizer, text)
