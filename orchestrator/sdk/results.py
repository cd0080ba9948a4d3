"""What SDK calls return, and the one place a call's arguments become a GenerateRequest."""
from __future__ import annotations

import time

from dataclasses import dataclass, field

from proto.dyspec.v1 import generation_pb2, sampling_pb2

FINISH_REASONS = {generation_pb2.FINISH_REASON_LENGTH: "length", generation_pb2.FINISH_REASON_EOS: "eos",
                  generation_pb2.FINISH_REASON_CONTEXT: "context"}


@dataclass(frozen=True)
class Chunk:
    """One streamed piece: the tokens a round verified and their text. The last chunk of a stream
    has no tokens and carries the finish reason and the stats."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "length", "eos" or "context" on the last chunk
    stats: generation_pb2.GenerationStats | None = None


@dataclass
class Generation:
    """A whole generation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: generation_pb2.GenerationStats
    elapsed_s: float = 0.0  # client-side wall time of the call, retries included
    time_to_first_token_s: float = 0.0
    chunks: int = field(default=0, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean acceptance length: tokens per target forward, including the target's own token."""
        return self.stats.mean_acceptance_length

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tree nodes (trees draft far more than can be accepted)."""
        return self.stats.accepted_tokens / self.stats.drafted_tokens if self.stats.drafted_tokens else 0.0


def build_request(prompt: str | list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  seed: int | None, method: str, budget: int, ignore_eos: bool, model: str,
                  request_id: str) -> generation_pb2.GenerateRequest:
    """prompt: text (tokenised by the server) or token ids. temperature 0 is greedy."""
    sampling = sampling_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    request = generation_pb2.GenerateRequest(request_id=request_id, model=model, max_new_tokens=max_new_tokens,
                                             sampling=sampling, ignore_eos=ignore_eos, method=method, budget=budget)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids[:] = [int(t) for t in prompt]
    return request


def to_chunk(response: generation_pb2.GenerateResponse) -> Chunk:
    if response.HasField("tokens"):
        return Chunk(list(response.tokens.token_ids), response.tokens.text_delta)
    summary = response.summary
    return Chunk([], "", FINISH_REASONS.get(summary.finish_reason, "length"), summary.stats)


class GenerationCollector:
    """Folds a stream's chunks into a Generation; shared by the sync and asyncio clients.

    Callers read the stream to its end (the summary is its last message): leaving after the
    summary would cancel a call that is about to end cleanly."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first_s, self.text, self.ids, self.chunks, self.last = 0.0, [], [], 0, None

    def add(self, chunk: "Chunk") -> None:
        if chunk.stats is not None:
            self.last = chunk
            return
        if not self.chunks:
            self.first_s = time.perf_counter() - self.start
        self.chunks += 1
        self.text.append(chunk.text)
        self.ids += chunk.token_ids

    def result(self) -> Generation:
        if self.last is None:
            raise RuntimeError("the server ended the stream without a summary")
        return Generation("".join(self.text), self.ids, self.last.finish_reason, self.last.stats,
                          time.perf_counter() - self.start, self.first_s, self.chunks)
