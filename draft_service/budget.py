"""The seam where the orchestrator's budget policy plugs into the draft loop.

The worker makes one `BudgetFn` per session with its `BudgetPolicy` (a factory, so per-stream
online estimators such as orchestrator.estimators.BudgetTuner get their own state; a factory may
also hand out functions that share global estimators). Each round it calls `budget_fn(history)`
with the session's finished rounds, oldest first (a request's own non-zero budget bypasses it),
then caps the answer by the target's tree and context limits. A BudgetFn may also have a `close()`,
which the worker calls once when the session ends, so that state shared between sessions forgets it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from dyspec.decoding import RoundResult
from dyspec.warp import SamplingParams


@dataclass(frozen=True)
class RoundRecord:
    """One finished round, as the draft measured it and the target reported it (seconds)."""

    budget: int  # nodes allowed this round (after caps)
    result: RoundResult  # tree (node values = draft path probabilities), verdict, draft-side RoundStats
    round_s: float  # wall time of the whole round on the worker: build + round trip + draft commit
    target_queue_s: float
    target_forward_s: float
    target_total_s: float  # the target's whole handling, receipt to verdict
    wire_s: float  # draft-side serialisation: tree to message, verdict from message
    batch_sessions: int = 1  # sessions whose rounds shared the target forward (VerifyTimings)
    batch_rows: int = 0  # rows of that forward over all of them (0: not reported)

    @property
    def network_s(self) -> float:
        """Round trip minus the target's own time: network, serialisation and stream scheduling."""
        return max(0.0, self.result.stats.verify_s - self.target_total_s)


@dataclass(frozen=True)
class RequestShape:
    """What a policy knows of a request before its first round."""

    prompt_tokens: int
    max_new_tokens: int


BudgetFn = Callable[[Sequence[RoundRecord]], int]
# called once per session, with its sampling parameters and its shape
BudgetPolicy = Callable[[SamplingParams, RequestShape], BudgetFn]


def as_policy(policy: Callable) -> BudgetPolicy:
    """`policy` as a BudgetPolicy. A policy written before the request's shape was passed takes the
    sampling parameters alone: it is adapted (the shape dropped) instead of failing every request
    with INTERNAL. A callable that takes neither form is refused here, when the worker is built."""
    try:
        signature = inspect.signature(policy)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): taken as it is
        return policy
    try:
        signature.bind(SamplingParams(), RequestShape(0, 0))
        return policy
    except TypeError:
        pass
    try:
        signature.bind(SamplingParams())
    except TypeError:
        raise TypeError(f"a budget policy is called as policy(sampling, shape) once per session (or as "
                        f"policy(sampling)); {policy!r} takes {signature}") from None
    return lambda sampling, shape: policy(sampling)


@dataclass(frozen=True)
class FixedBudget:
    """The default policy: the same budget every round."""

    budget: int

    def __call__(self, history: Sequence[RoundRecord]) -> int:
        return self.budget
