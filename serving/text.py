"""Incremental detokenisation for streamed chunks (draft workers and the orchestrator)."""
from __future__ import annotations


class TextStream:
    """Turns successive token chunks into text deltas. Decodes the whole output each time (tokenizers
    merge across token boundaries) and holds back text that ends inside a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
