"""The automatic budget policy (`--budget auto`): the orchestrator's BudgetTuner behind the
worker's BudgetPolicy seam, one tuner per session.

The tuner learns from the session's own rounds (draft cost per node, the target's verify curve,
the network round trip, and how often nodes of a given draft value were accepted), so each stream
adapts to its own prompt and to the link it runs over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from draft_service.budget import BudgetFn, RoundRecord
from orchestrator.estimators import BudgetTuner, RoundObservation

_PLAIN_PROBE_ROUND = 2  # 0-based: the third round


def observation(record: RoundRecord) -> RoundObservation:
    """What the tuner learns from one finished round. Draft time counts the forwards and the tree
    building (both grow with the budget); target time is the target's own report, so the network
    estimate is round time minus draft, target and serialisation."""
    result = record.result
    accepted = set(result.verdict.accepted)
    return RoundObservation(budget=record.budget, node_values=list(result.tree.values),
                            node_accepted=[node in accepted for node in range(len(result.tree))],
                            round_s=record.round_s, draft_s=result.stats.draft_s + result.stats.build_s,
                            target_s=record.target_total_s, wire_s=record.wire_s)


class TunedSession:
    """One session's BudgetFn: feeds the rounds it has not seen yet to its tuner, then asks it.

    The first round is not shown: both models process the whole prompt in it (draft and target
    caches fill lazily), a one-time cost that would read as a huge per-round cost and talk the
    tuner out of drafting for the rest of the request. The tuner measures its own first point
    again in round two, and round three is a plain round (no tree): the verification cost fit
    then has two sizes to go on, instead of extrapolating from trees of one size only."""

    def __init__(self, tuner: BudgetTuner):
        self.tuner = tuner
        self.seen = 0

    def __call__(self, history: Sequence[RoundRecord]) -> int:
        for record in history[max(self.seen, 1):]:
            self.tuner.observe(observation(record))
        self.seen = len(history)
        if len(history) == _PLAIN_PROBE_ROUND:
            return 0
        return self.tuner.next_budget()


@dataclass(frozen=True)
class TunedBudget:
    """BudgetPolicy: a fresh BudgetTuner (budgets in [0, max_budget]) for every session."""

    max_budget: int = 64

    def __post_init__(self):
        if self.max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {self.max_budget}")

    def __call__(self) -> BudgetFn:
        return TunedSession(BudgetTuner(max_budget=self.max_budget))
