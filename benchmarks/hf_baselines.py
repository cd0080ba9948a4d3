"""In-process transformers baselines for benchmarks.pipeline_speed: the target alone
(`target.generate`, greedy or plain sampling) and transformers' assisted generation with the same
draft (`assistant_model=draft`), both timed per emitted chunk through a streamer.

Generation settings are given explicitly (no penalties, no top-k/top-p unless asked), so greedy
output is the target's argmax continuation, comparable token for token with the services'.
Assisted generation runs with transformers' defaults (up to 20 draft tokens per round, a draft
confidence threshold of 0.4 that it adapts); the assistant's config is restored after every call
so one call's adaptation does not leak into the next.
"""
from __future__ import annotations

import copy
import time

import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging
from transformers.generation.streamers import BaseStreamer

from benchmarks.pipeline_services import RunResult


class _ChunkTimer(BaseStreamer):
    """Records when each chunk of new tokens is produced (the first put is the prompt)."""

    def __init__(self, start: float):
        self.start, self.seen_prompt = start, False
        self.times: list[float] = []
        self.sizes: list[int] = []

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter() - self.start)
        self.sizes.append(int(value.numel()))

    def end(self) -> None:
        pass


def hf_generate(target, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                assistant=None) -> RunResult:
    """Target alone (assistant None) or assisted generation; timed like a service request."""
    eos = getattr(target.generation_config, "eos_token_id", None)
    pad = eos[0] if isinstance(eos, list) else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None, top_k=0 if temperature > 0 else None,
                              top_p=1.0 if temperature > 0 else None, eos_token_id=eos,
                              pad_token_id=pad if pad is not None else 0, repetition_penalty=1.0)
    hf_logging.set_verbosity_error()  # generate() warns about its own internal arguments on every call
    ids = torch.tensor([prompt])
    saved = copy.deepcopy(assistant.generation_config) if assistant is not None else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    timer = _ChunkTimer(start)
    with torch.inference_mode():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=timer,
                              **({"assistant_model": assistant} if assistant is not None else {}))
    wall = time.perf_counter() - start
    if assistant is not None:
        assistant.generation_config = saved
    tokens = out[0, len(prompt):].tolist()
    return RunResult(tokens=tokens, wall_s=wall, first_chunk_s=timer.times[0] if timer.times else wall,
                     first_chunk_tokens=timer.sizes[0] if timer.sizes else 0, chunk_times_s=timer.times, stats={},
                     rounds=[], finish_reason="", extra={"target_forwards": len(timer.times)})
