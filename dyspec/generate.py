"""`generate`: speculative decoding with a token tree, in one process, on transformers models."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

from dyspec.builders import BUILDERS, make_builder
from dyspec.coins import VERIFY_STREAM, TorchCoins, draft_coins_for_round, stream_seed
from dyspec.decoding import LocalVerifier, RoundStats, take_new_tokens
from dyspec.overlap import InlineVerifier, OverlappedRounds, ThreadedVerifier
from dyspec.warp import SamplingParams

METHODS = (*BUILDERS, "autoregressive")


@dataclass
class GenerationResult:
    tokens: list[int]  # new token ids (stops after EOS or max_new_tokens)
    steps: int  # target verification forwards
    accepted_per_step: list[int]  # accepted draft tokens per step (the next token not counted)
    rounds: list[RoundStats] = field(repr=False)
    draft_s: float = 0.0  # draft model forwards
    verify_s: float = 0.0  # target model forwards
    bookkeeping_s: float = 0.0  # everything else: tree building, verification walk, cache commits
    total_s: float = 0.0
    finish_reason: str = "length"  # "length" or "eos"
    overlap: list = field(default_factory=list, repr=False)  # dyspec.overlap.OverlapStats per round

    @property
    def kept_rate(self) -> float:
        """Of the rounds whose tree was drafted ahead, the fraction whose guess was right."""
        tried = [o for o in self.overlap if o.predrafted]
        return sum(o.kept for o in tried) / max(1, len(tried))

    @property
    def tokens_per_step(self) -> float:
        return len(self.tokens) / max(1, self.steps)


def _eos_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}


def generate(target, draft, input_ids, max_new_tokens: int = 64, method: str = "dyspec", budget: int = 64,
             temperature: float = 0.0, draft_temperature: float = 0.6, seed: int = 0, *, top_k: int = 0,
             top_p: float = 1.0, draft_top_k: int = 0, draft_top_p: float = 1.0, eos_token_id=None,
             builder_options: dict | None = None, overlap: bool = True) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens from `target`, drafting token trees with `draft`.

    The output is distributed exactly as sampling from `target` with (temperature, top_k, top_p);
    at temperature 0 it is the target's greedy continuation. `budget` caps the nodes per tree.
    `method` is one of METHODS; "autoregressive" decodes with the target alone (draft unused).
    Drafts are sampled at `draft_temperature`, truncated by draft_top_k / draft_top_p.
    `overlap` runs the target on its own thread and drafts the next round while it verifies
    (dyspec.overlap); the tokens are the same either way for a given seed, up to the draft's
    floating-point rounding (its cache is filled in a different order).
    """
    from dyspec.hf_runner import HFDraftSession, HFTargetSession  # the only transformers-bound part

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if max_new_tokens < 0 or budget < 1:
        raise ValueError("max_new_tokens must be >= 0 and budget >= 1")
    prompt = [int(t) for t in input_ids]
    sampling = SamplingParams(temperature, top_k, top_p)
    draft_params = SamplingParams(draft_temperature, draft_top_k, draft_top_p)
    speculative = method != "autoregressive"
    if speculative and target.config.vocab_size != draft.config.vocab_size:
        raise ValueError("target and draft must share a vocabulary")
    builder = make_builder("chain" if not speculative else method, draft_params=draft_params, **(builder_options or {}))
    eos = _eos_ids(target, eos_token_id)
    max_positions = getattr(target.config, "max_position_embeddings", None)

    start = time.perf_counter()
    target_session = HFTargetSession(target, prompt)
    draft_session = HFDraftSession(draft, prompt) if speculative else _NoDraft(prompt)
    local = LocalVerifier(target_session, sampling, TorchCoins(stream_seed(seed, VERIFY_STREAM)))
    overlap = overlap and speculative

    def room(committed: int) -> int | None:
        if max_positions is None:
            return budget
        left = max_positions - committed - 1  # never let a tree run past the model's context
        return None if left < 0 else left

    out: list[int] = []
    rounds: list[RoundStats] = []
    overlaps = []
    finish = "length"
    with ThreadPoolExecutor(1, thread_name_prefix="dyspec-target") if overlap else nullcontext() as executor:
        verifier = ThreadedVerifier(local, executor) if overlap else InlineVerifier(local)
        runner = OverlappedRounds(draft_session, verifier, builder, draft_coins_for_round(seed), overlap=overlap)
        while len(out) < max_new_tokens:
            result = runner.next_round(lambda: budget if speculative else 0, room)
            if result is None:
                break
            rounds.append(result.stats)
            overlaps.append(result.overlap)
            kept, hit_eos = take_new_tokens(result.verdict.tokens, len(out), max_new_tokens, eos)
            out += kept
            if hit_eos:
                finish = "eos"
                break
    total = time.perf_counter() - start
    draft_s = sum(r.draft_s for r in rounds)
    verify_s = sum(r.target_forward_s for r in rounds)
    return GenerationResult(out, len(rounds), [r.accepted for r in rounds], rounds, draft_s, verify_s,
                            total - draft_s - verify_s, total, finish, overlaps)


class _NoDraft:
    """Draft side of plain target decoding: never asked for logits, only counts tokens."""

    def __init__(self, prompt: list[int]):
        self.tokens = list(prompt)

    def logits(self, tree, nodes):
        raise AssertionError("autoregressive decoding drafts nothing")

    def commit(self, tree, verdict) -> None:
        self.tokens += verdict.tokens
