"""What the tests read from a DraftWorker.Generate stream."""
from __future__ import annotations


def streamed_tokens(responses) -> list[int]:
    """Every token id the stream's chunks carried, in order (the summary message carries none)."""
    return [t for r in responses if r.HasField("tokens") for t in r.tokens.token_ids]
