"""A character tokenizer over 64 symbols, for the tiny 64-token test models: text prompts, chat and
text output work end to end without a real tokenizer (and without importing torch)."""
from __future__ import annotations

SYMBOLS = " \nabcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()[]{}<>/\\_*+=#@&"
assert len(SYMBOLS) == 64 and len(set(SYMBOLS)) == 64


class CharTokenizer:
    """Token i is SYMBOLS[i]; text is lower-cased and other characters become '?'. No special tokens
    and no chat template (chat prompts use the plain "role: content" join)."""

    chat_template = None
    vocab_size = len(SYMBOLS)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [SYMBOLS.find(c) if c in SYMBOLS else SYMBOLS.index("?") for c in text.lower()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(SYMBOLS[i] for i in ids)


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
