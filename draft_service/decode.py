"""One Generate call on a draft worker: the speculative decode loop against a remote target.

The loop is dyspec.generate's, token for token: the same overlapped rounds (dyspec.overlap), the
same builder, the same draft coins (per-round draft streams and the verify stream of
dyspec.coins.stream_seed), the same budget cap by the context limit, the same stop rules. Only where the budget comes from (a policy
hook) and where the target lives (RemoteVerifier) differ.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from dyspec.builders import make_builder
from dyspec.coins import draft_coins_for_round
from dyspec.decoding import take_new_tokens
from dyspec.hf_runner import HFDraftSession
from dyspec.overlap import OverlappedRounds
from dyspec.warp import SamplingParams
from draft_service.budget import BudgetFn, RoundRecord
from draft_service.remote_verifier import RemoteVerifier
from proto.dyspec.v1 import generation_pb2
from serving.errors import ServiceError

_CLOSE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class GenerationPlan:
    """A validated request."""

    request_id: str
    model: str
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    ignore_eos: bool
    method: str  # a dyspec builder name or "autoregressive"
    budget: int  # 0: ask the budget policy each round


class WorkerSession:
    def __init__(self, plan: GenerationPlan, draft_model, draft_sampling: SamplingParams, verifier: RemoteVerifier,
                 budget_fn: BudgetFn, executor: Executor, overlap: bool = True, batcher=None):
        """`batcher`: a DraftForwardBatcher shared by the worker's sessions, or None (forward alone)."""
        self.plan, self.draft_model, self.verifier, self.budget_fn, self.executor = (
            plan, draft_model, verifier, budget_fn, executor)
        self.batcher = batcher
        self.overlap = overlap  # draft round r+1 while the target verifies round r (dyspec.overlap)
        speculative = plan.method != "autoregressive"
        # Autoregressive rounds have budget 0, so the builder is never called (as in dyspec.generate).
        self.builder = make_builder(plan.method if speculative else "chain", draft_params=draft_sampling)
        self.speculative = speculative
        self.history: list[RoundRecord] = []
        self.generated: list[int] = []
        self.finish_reason = generation_pb2.FINISH_REASON_LENGTH
        self._round: Future | None = None  # the round running on a draft thread, if any
        self._start_ns = time.perf_counter_ns()

    async def run(self) -> AsyncIterator[list[int]]:
        """Yield the new tokens of each round until max_new_tokens, EOS or the context limit."""
        plan = self.plan
        opened = await self.verifier.open(_session_id(plan.request_id), plan.model, plan.prompt, plan.sampling,
                                          plan.seed)
        if self.speculative and opened.vocab_size != self.draft_model.config.vocab_size:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"draft vocabulary ({self.draft_model.config.vocab_size}) differs from the target's "
                               f"({opened.vocab_size})")
        eos = set() if plan.ignore_eos else set(opened.eos_token_ids)
        # a draft with static KV caches (--static-kv-tokens) holds a fixed number of tokens: the
        # context ends there too (FINISH_REASON_CONTEXT), and a prompt that does not fit is refused
        context = opened.max_context_tokens
        capacity = getattr(self.draft_model, "static_tokens", 0) if self.speculative else 0
        if capacity:
            if len(plan.prompt) + 1 > capacity:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"prompt has {len(plan.prompt)} tokens; this draft worker's KV cache holds "
                                   f"{capacity} (--static-kv-tokens), prompt plus at least one new token")
            context = min(context, capacity)
        draft = HFDraftSession(self.draft_model, plan.prompt,
                               forward_rows=self.batcher.forward if self.batcher is not None else None)
        runner = OverlappedRounds(draft, self.verifier, self.builder, draft_coins_for_round(plan.seed),
                                  overlap=self.overlap and self.speculative)

        def wanted() -> int:  # runs on the draft thread, while no round is being recorded
            return (plan.budget or self.budget_fn(self.history)) if self.speculative else 0

        def room(committed: int) -> int | None:
            left = context - committed - 1
            return None if left < 0 else min(left, opened.max_tree_nodes)

        last = time.perf_counter()
        while len(self.generated) < plan.max_new_tokens:
            # Kept as the executor's own future: if this task is cancelled mid-round, aclose() can still
            # wait for the draft thread (an asyncio wrapper would just report "cancelled").
            self._round = self.executor.submit(runner.next_round, wanted, room)
            result = await asyncio.wrap_future(self._round)
            self._round = None
            if result is None:
                self.finish_reason = generation_pb2.FINISH_REASON_CONTEXT
                break
            now = time.perf_counter()  # overlapped rounds: the time between verdicts is the round
            timings = self.verifier.last_timings
            self.history.append(RoundRecord(result.overlap.budget, result,
                                            now - last, timings.queue_ns / 1e9, timings.forward_ns / 1e9,
                                            timings.total_ns / 1e9, self.verifier.last_wire_s,
                                            max(1, timings.batch_sessions), timings.batch_rows))
            last = now
            new, hit_eos = take_new_tokens(result.verdict.tokens, len(self.generated), plan.max_new_tokens, eos)
            if hit_eos:
                self.finish_reason = generation_pb2.FINISH_REASON_EOS
            self.generated += new
            yield new
            if self.finish_reason == generation_pb2.FINISH_REASON_EOS:
                break

    async def aclose(self) -> None:
        """End the target session and wait for a round still on a draft thread, so the draft cache
        is free when this returns. Mid-round (the caller left, or the loop failed) the target stream
        is cancelled at once rather than closed behind the round: the target frees the session right
        after the round it is running, and the round here fails at once instead of at its deadline."""
        try:
            if self._round is not None and not self._round.done():
                self.verifier.cancel()
                try:
                    await asyncio.wait_for(asyncio.wrap_future(self._round), self.verifier.first_round_deadline_s() + _CLOSE_TIMEOUT_S)
                except Exception:  # its outcome no longer matters, only that it stopped
                    pass
            await self.verifier.close(_CLOSE_TIMEOUT_S)
        finally:
            close_budget = getattr(self.budget_fn, "close", None)  # the policy's optional end hook (budget.py)
            if close_budget is not None:
                close_budget()  # after the last round: none asks for a budget again

    def summary(self) -> generation_pb2.GenerationSummary:
        rounds = [r.result.stats for r in self.history]
        steps = len(rounds)
        stats = generation_pb2.GenerationStats(
            request_id=self.plan.request_id, method=self.plan.method, seed=self.plan.seed,
            prompt_tokens=len(self.plan.prompt), generated_tokens=len(self.generated), steps=steps,
            accepted_tokens=sum(s.accepted for s in rounds), drafted_tokens=sum(s.tree_size for s in rounds),
            mean_acceptance_length=len(self.generated) / max(1, steps),
            draft_ns=_ns(s.draft_s for s in rounds), build_ns=_ns(s.build_s for s in rounds),
            verify_ns=_ns(s.verify_s for s in rounds), target_forward_ns=_ns(r.target_forward_s for r in self.history),
            target_total_ns=_ns(r.target_total_s for r in self.history), network_ns=_ns(r.network_s for r in self.history),
            total_ns=time.perf_counter_ns() - self._start_ns,
            accepted_per_position=_accepted_per_position(s.accepted for s in rounds),
            rounds=[_round_proto(r) for r in self.history])
        return generation_pb2.GenerationSummary(finish_reason=self.finish_reason, stats=stats)


def _session_id(request_id: str) -> str:
    """Unique on the target, and still traceable to the request in its logs."""
    readable = re.sub(r"[^A-Za-z0-9._:/-]", "_", request_id)[:64] or "request"
    return f"{readable}-{uuid.uuid4().hex[:16]}"


def _ns(seconds) -> int:
    return round(sum(seconds) * 1e9)


def _accepted_per_position(accepted_per_round) -> list[int]:
    """counts[i] = rounds whose accepted path reached depth i + 1."""
    counts: list[int] = []
    for accepted in accepted_per_round:
        counts += [0] * (accepted - len(counts))
        for depth in range(accepted):
            counts[depth] += 1
    return counts


def _round_proto(record: RoundRecord) -> generation_pb2.GenerationRound:
    s, o = record.result.stats, record.result.overlap
    return generation_pb2.GenerationRound(
        budget=record.budget, drafted_tokens=s.tree_size, accepted_tokens=s.accepted, round_ns=_ns([record.round_s]),
        draft_ns=_ns([s.draft_s, s.build_s]), verify_ns=_ns([s.verify_s]), target_total_ns=_ns([record.target_total_s]),
        network_ns=_ns([record.network_s]), drafted_ahead=o.predrafted, kept_ahead=o.kept,
        overlapped_ns=_ns([o.overlapped_s]), wasted_ns=_ns([o.wasted_s]), wait_ns=_ns([o.wait_s]),
        target_queue_ns=_ns([record.target_queue_s]), batch_sessions=record.batch_sessions,
        batch_rows=record.batch_rows)
