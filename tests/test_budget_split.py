"""orchestrator.policy.split_budget: one node budget over sessions verified in one target forward,
on synthetic value and cost curves; and draft_service.shared_budget, which feeds it a worker's
concurrent sessions."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from draft_service.shared_budget import LoadShare, shared_budget
from orchestrator.estimators import BudgetTuner
from orchestrator.policy import BatchCost, best_budget, split_budget


def geometric_gains(first: float, ratio: float, n: int) -> np.ndarray:
    return first * ratio ** np.arange(n)


def cpu_cost(verify0=0.6, per_row=0.004, draft_fixed=0.05, draft_per_node=0.03, network=0.002) -> BatchCost:
    """Like the 1.5B fp32 target and 0.5B draft on one core each: a forward is memory-bound (flat
    in rows), drafting costs a lot per node."""
    return BatchCost(network, draft_fixed, draft_per_node, lambda rows: verify0 + per_row * rows)


def predicted_rate(gains, budgets, cost: BatchCost, setup=None) -> float:
    """Tokens per second of a split, by the cost model; `setup`: each session's setup cost if it drafts."""
    tokens = len(gains) + sum(float(np.sum(g[:b])) for g, b in zip(gains, budgets))
    seconds = cost.round_s(sum(1 for b in budgets if b), sum(budgets), len(gains) + sum(budgets), max(budgets))
    return tokens / (seconds + sum(c for c, b in zip(setup or [0.0] * len(gains), budgets) if b))


def random_three_sessions(rng: random.Random) -> tuple[list[np.ndarray], BatchCost]:
    """Three sessions of four nodes each, and a cost with a per-session draft cost, at random."""
    gains = [np.sort(np.array([rng.random() ** 2 for _ in range(4)]))[::-1] for _ in range(3)]
    cost = cpu_cost(verify0=rng.uniform(0.05, 1.0), per_row=rng.uniform(0, 0.02),
                    draft_fixed=rng.uniform(0, 0.2), draft_per_node=rng.uniform(0, 0.1))
    return gains, cost


def test_one_session_gets_what_best_budget_gives_it():
    gains = geometric_gains(0.9, 0.8, 32)
    cost = cpu_cost()
    split = split_budget([gains], [1], cost)
    round_s = np.array([cost.round_s(int(b > 0), b, 1 + b) for b in range(33)])
    alone = best_budget(gains, round_s)
    assert split.budgets == (alone.budget,) and split.tokens_per_s == pytest.approx(alone.tokens_per_s)
    assert 0 < alone.budget < 32


def test_without_a_per_session_draft_cost_the_split_is_the_exact_optimum():
    rng = random.Random(1)
    for _ in range(40):
        k = rng.randint(2, 3)
        gains = [np.sort(np.array([rng.random() for _ in range(5)]))[::-1] for _ in range(k)]
        cost = cpu_cost(verify0=rng.uniform(0.01, 1.0), per_row=rng.uniform(0.0, 0.05), draft_fixed=0.0,
                        draft_per_node=rng.uniform(0.0, 0.1), network=rng.uniform(0, 0.2))
        cost = BatchCost(cost.network_s, 0.0, cost.draft_per_node_s, cost.verify_s, overlap=rng.choice([0.0, 0.7]))
        best = max(predicted_rate(gains, combo, cost) for combo in itertools.product(range(6), repeat=k))
        split = split_budget(gains, [1] * k, cost)
        assert predicted_rate(gains, split.budgets, cost) == pytest.approx(best, rel=1e-12)
        assert split.tokens_per_s == pytest.approx(best, rel=1e-12)


def test_with_a_per_session_draft_cost_the_split_stays_within_two_percent_of_the_optimum():
    """The prefix order ignores that a session's first node also buys its root forward; exhaustive
    search over 200 random 3-session cases bounds what that costs."""
    rng = random.Random(2)
    worst = 1.0
    for _ in range(200):
        gains, cost = random_three_sessions(rng)
        best = max(predicted_rate(gains, combo, cost) for combo in itertools.product(range(5), repeat=3))
        worst = min(worst, predicted_rate(gains, split_budget(gains, [1] * 3, cost).budgets, cost) / best)
    assert worst >= 0.98, worst


def test_a_setup_cost_is_priced_like_the_exhaustive_optimum_and_keeps_a_cold_session_plain():
    """setup_s: what drafting at all costs a session this round besides its root forward (its draft
    cache behind by a prompt). Against exhaustive search the split stays within 2%, as without one;
    a session whose draft must first forward its prompt stays plain where its warm twin drafts, and
    without load the same session drafts all the same."""
    rng = random.Random(3)
    worst = 1.0
    for _ in range(200):
        gains, cost = random_three_sessions(rng)
        setup = [rng.choice([0.0, rng.uniform(0, 0.5)]) for _ in range(3)]
        best = max(predicted_rate(gains, combo, cost, setup) for combo in itertools.product(range(5), repeat=3))
        split = split_budget(gains, [1] * 3, cost, setup_s=setup)
        assert split.tokens_per_s == pytest.approx(predicted_rate(gains, split.budgets, cost, setup), rel=1e-9)
        worst = min(worst, predicted_rate(gains, split.budgets, cost, setup) / best)
    assert worst >= 0.98, worst

    gains = geometric_gains(0.85, 0.85, 16)
    cost = cpu_cost(verify0=0.2, per_row=0.002, draft_fixed=0.015, draft_per_node=0.01)
    warm_and_cold = split_budget([gains] * 4, [1] * 4, cost, setup_s=[0.0, 0.0, 0.0, 0.4])
    assert min(warm_and_cold.budgets[:3]) > 0 and warm_and_cold.budgets[3] == 0, warm_and_cold
    assert split_budget([gains], [1], cost, setup_s=[0.4]).budgets[0] > 0  # alone it still pays


def test_trees_shrink_toward_batched_plain_decoding_as_sessions_are_added_on_a_cpu_like_cost():
    gains = geometric_gains(0.85, 0.85, 64)
    per_session = []
    for k in (1, 2, 4, 8, 16, 32):
        split = split_budget([gains] * k, [1] * k, cpu_cost())
        per_session.append(sum(split.budgets) / k)
        assert max(split.budgets) - min(split.budgets) <= 1, "equal sessions get equal trees"
    assert all(a >= b for a, b in zip(per_session, per_session[1:])), per_session
    assert per_session[0] >= 4 and per_session[-1] == 0, per_session


def test_on_a_gpu_like_cost_trees_stay_large_under_load():
    """A forward whose cost barely moves with rows (an H200 up to hundreds of rows) and drafts
    batched across sessions (each session's share of a batched draft forward is small): every
    session keeps a real tree at 16 sessions. With each session's draft forwards run one after
    another (4 ms each), the same target makes plain batched decoding the better choice at 16."""
    gains = geometric_gains(0.85, 0.9, 64)
    batched_drafts = BatchCost(0.0005, 0.0003, 0.0001, lambda rows: 0.02 + 2e-6 * rows)
    split = split_budget([gains] * 16, [1] * 16, batched_drafts)
    assert min(split.budgets) >= 8, split.budgets
    serial_drafts = BatchCost(0.0005, 0.004, 0.0005, lambda rows: 0.02 + 2e-6 * rows)
    assert sum(split_budget([gains] * 16, [1] * 16, serial_drafts).budgets) == 0
    assert sum(split_budget([gains] * 2, [1] * 2, serial_drafts).budgets) > 0


def test_nodes_go_to_the_session_whose_tree_gains_most():
    sure = geometric_gains(0.95, 0.95, 16)  # a predictable stream (code, a template)
    hard = geometric_gains(0.3, 0.5, 16)  # one whose draft rarely agrees
    split = split_budget([hard, sure], [1, 1], cpu_cost())
    assert split.budgets[1] > split.budgets[0] >= 0
    assert split.budgets[0] == 0, "no node of the hard stream gains what it costs"
    assert split_budget([sure, sure], [1, 1], cpu_cost(), max_budgets=[16, 2]).budgets[1] == 2, "caps hold"
    assert split_budget([], [], cpu_cost()).budgets == ()


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeSession:
    """What shared_budget reads of a TunedSession."""

    def __init__(self, gains, round_s=0.5):
        self.tuner = BudgetTuner(max_budget=len(gains))
        self.tuner.rounds = 5
        self.tuner.draft.update(1, 0.08)
        self.tuner.draft.update(9, 0.32)  # 50 ms + 30 ms per node
        self._gains = gains
        self.tuner.gains = lambda: self._gains
        self.last_round_s = round_s
        self.last_split = None
        self.setup = 0.0  # what drafting at all costs it besides its root forward (TunedSession.setup_s)
        self.cap = len(gains)  # its trust region (TunedSession.trust_cap)

    def setup_s(self, s_per_token: float) -> float:
        return self.setup

    def trust_cap(self) -> int:
        return self.cap


def test_a_workers_concurrent_sessions_share_one_budget_while_the_target_batches():
    clock = FakeClock()
    load = LoadShare(clock)
    for rows in (4, 40, 80):  # the target's forwards: 0.6 s + 4 ms per row
        load.observe(batch_sessions=4, batch_rows=rows, verify_s=0.6 + 0.004 * rows, network_s=0.002)
    sessions = [FakeSession(geometric_gains(0.85, 0.85, 64)) for _ in range(16)]
    budgets = [shared_budget(s, 12, load) for s in sessions]
    assert budgets[0] == 12, "the first to ask drafts alone so far: its own choice"
    budgets = [shared_budget(s, 12, load) for s in sessions]  # now all 16 are drafting
    expected = split_budget([s.tuner.gains() for s in sessions], [1] * 16, load.cost(sessions[0].tuner))
    assert tuple(budgets) == expected.budgets and max(budgets) < 12
    clock.now += 3.0  # 15 sessions finished: only the last one keeps asking
    assert shared_budget(sessions[0], 12, load) == 12


def test_a_session_whose_draft_must_first_catch_up_stays_plain_while_its_peers_draft():
    """shared_budget hands each session's catch-up cost (TunedSession.setup_s) to the split."""
    load = LoadShare(FakeClock())
    for rows in (4, 12, 30):
        load.observe(batch_sessions=4, batch_rows=rows, verify_s=0.2 + 0.002 * rows, network_s=0.002)
    sessions = [FakeSession(geometric_gains(0.85, 0.85, 16)) for _ in range(4)]
    for s in sessions:
        s.tuner.draft = type(s.tuner.draft)()
        s.tuner.draft.update(1, 0.02)
        s.tuner.draft.update(9, 0.1)  # 10 ms + 10 ms per node
    for s in sessions:
        shared_budget(s, 12, load)
    warm = [shared_budget(s, 12, load) for s in sessions]
    assert min(warm) > 0
    sessions[3].setup = 0.5
    budgets = [shared_budget(s, 12, load) for s in sessions]
    assert min(budgets[:3]) > 0 and budgets[3] == 0, budgets


def test_the_tail_of_a_burst_running_alone_does_not_hide_that_the_target_batches():
    """As a burst of sessions ends, its last rounds run alone; the next burst's first rounds must still
    be split (an average of sessions per forward had fallen under its threshold there, and every new
    session drafted alone while the target prefilled the others' prompts)."""
    from draft_service.shared_budget import _BATCH_EVIDENCE_ROUNDS

    load = LoadShare(FakeClock())
    for rows in (4, 40, 80):
        load.observe(batch_sessions=4, batch_rows=rows, verify_s=0.6 + 0.004 * rows, network_s=0.002)
    for _ in range(20):
        load.observe(batch_sessions=1, batch_rows=9, verify_s=0.64, network_s=0.002)
    assert load.batching()
    sessions = [FakeSession(geometric_gains(0.85, 0.85, 64)) for _ in range(16)]
    for s in sessions:
        shared_budget(s, 12, load)
    assert max(shared_budget(s, 12, load) for s in sessions) < 12
    for _ in range(_BATCH_EVIDENCE_ROUNDS):
        load.observe(batch_sessions=1, batch_rows=9, verify_s=0.64, network_s=0.002)
    assert not load.batching()  # a long run of lone rounds: this target no longer batches them


def test_batch_mates_asking_together_take_parts_of_one_split():
    """The first of a batch to ask splits for all; the others, asking within SPLIT_REUSE_S, take their
    parts of that split, though their own tuners would price drafting otherwise; a round later each
    split is new. (Split on their own, one session drafted while its peers went plain.)"""
    from draft_service.shared_budget import SPLIT_REUSE_S

    clock = FakeClock()
    load = LoadShare(clock)
    for rows in (4, 12, 30):
        load.observe(batch_sessions=4, batch_rows=rows, verify_s=0.2 + 0.002 * rows, network_s=0.002)
    sessions = [FakeSession(geometric_gains(0.85, 0.85, 16)) for _ in range(4)]
    cheap, dear = sessions[0], sessions[1]
    for s in sessions:
        s.tuner.draft = type(s.tuner.draft)()
        s.tuner.draft.update(1, 0.02)
        s.tuner.draft.update(9, 0.1)  # 10 ms + 10 ms per node
    dear.tuner.draft = type(dear.tuner.draft)()
    dear.tuner.draft.update(1, 0.5)
    dear.tuner.draft.update(9, 2.0)  # its own estimate: drafting is dear
    for s in sessions:
        load.ask(s, 0.3)
    clock.now += 1.0
    first = shared_budget(cheap, 12, load)
    together = split_budget([s.tuner.gains() for s in sessions], [1] * 4, load.cost(cheap.tuner))
    assert first == together.budgets[0] > 0
    assert shared_budget(dear, 12, load) == together.budgets[1] > 0  # the cheap asker's split, not its own
    clock.now += SPLIT_REUSE_S * 2  # the next round: its own split again
    alone = split_budget([s.tuner.gains() for s in sessions], [1] * 4, load.cost(dear.tuner))
    assert shared_budget(dear, 12, load) == alone.budgets[1] < together.budgets[1]


def test_a_target_that_does_not_batch_leaves_each_session_its_own_choice():
    load = LoadShare(FakeClock())
    for _ in range(10):
        load.observe(batch_sessions=1, batch_rows=9, verify_s=0.7, network_s=0.002)
    sessions = [FakeSession(geometric_gains(0.85, 0.85, 64)) for _ in range(8)]
    for s in sessions:
        shared_budget(s, 12, load)
    assert [shared_budget(s, 12, load) for s in sessions] == [12] * 8


def test_a_cheaper_plain_forward_tips_the_split_to_plain_decoding_under_load():
    """A target that takes the draft's cores for batches where nobody drafts (--batched-threads)
    verifies plain batches faster: priced apart (plain_verify_s), eight sessions whose trees would
    pay at one-core prices go plain, while one session alone still drafts."""
    gains = [geometric_gains(0.7, 0.7, 32) for _ in range(8)]
    one_core = cpu_cost(verify0=0.2, per_row=0.002, draft_fixed=0.015, draft_per_node=0.006)
    assert sum(split_budget(gains, [1] * 8, one_core).budgets) > 0
    two_cores = BatchCost(one_core.network_s, one_core.draft_fixed_s, one_core.draft_per_node_s, one_core.verify_s,
                          plain_verify_s=lambda rows: 0.12 + 0.0012 * rows)
    split = split_budget(gains, [1] * 8, two_cores)
    assert split.budgets == (0,) * 8
    assert split.tokens_per_s == pytest.approx(8 / two_cores.round_s(0, 0, 8))
    assert split_budget(gains[:1], [1], two_cores).budgets[0] > 0  # alone, drafting still pays
    # the plain curve prices rounds where nobody drafts only
    assert two_cores.round_s(1, 4, 12) == pytest.approx(one_core.round_s(1, 4, 12))


def test_load_share_prices_plain_batches_apart_once_it_saw_a_few():
    load = LoadShare()
    tuner = BudgetTuner(max_budget=16)
    for rows in (9, 14, 20, 12):
        load.observe(4, rows, 0.2 + 0.001 * rows, 0.001)  # batches with trees (rows > sessions)
    for sessions in (2, 3, 4):
        load.observe(sessions, sessions, 0.1, 0.001)  # plain batches: one row a session
    assert load.cost(tuner).plain_verify_s is None, "three plain batches are too few to price them apart"
    load.observe(5, 5, 0.1, 0.001)
    cost = load.cost(tuner)
    assert cost.plain_verify_s is not None
    assert float(cost.plain_verify_s(np.array(4))) == pytest.approx(0.1, abs=1e-4)
    assert float(cost.verify_s(np.array(12))) == pytest.approx(0.212, abs=2e-3)  # the tree batches' own line


def test_plain_batches_of_one_size_do_not_price_more_rows_in_proportion():
    """At a burst's start the target's plain batches held one session each (the others were still
    prefilling). The plain fit once ran through the origin then, priced four plain rows at four
    times one row's 0.17 s, and the split drafted big trees for every session at 4 streams."""
    load = LoadShare()
    for _ in range(6):
        load.observe(1, 1, 0.17, 0.001)
    cost = load.cost(BudgetTuner(max_budget=16))
    assert float(cost.plain_verify_s(np.array(4))) == pytest.approx(0.17)
    load.observe(2, 2, 0.19, 0.001)  # a second size: the slope is the data's
    assert float(cost.plain_verify_s(np.array(4))) == pytest.approx(0.17)  # a cost taken before is a snapshot
    assert float(load.cost(BudgetTuner(max_budget=16)).plain_verify_s(np.array(4))) == pytest.approx(0.23, abs=0.01)


def test_a_burst_counts_its_sessions_from_their_start_until_their_end():
    """A burst's sessions join when they start: the first to ask splits with the others though they
    have not asked yet, and still does after waiting half a minute for the prompts queued ahead of its
    first verdict; a session that left counts no more."""
    clock = FakeClock()
    load = LoadShare(clock)
    for rows in (4, 40, 80):
        load.observe(batch_sessions=4, batch_rows=rows, verify_s=0.6 + 0.004 * rows, network_s=0.002)
    sessions = [FakeSession(geometric_gains(0.85, 0.85, 64)) for _ in range(16)]
    for s in sessions:
        load.join(s)
    clock.now += 30.0  # the target prefills the burst's prompts
    first = shared_budget(sessions[0], 12, load)
    expected = split_budget([s.tuner.gains() for s in sessions], [1] * 16, load.cost(sessions[0].tuner))
    assert first == expected.budgets[0] < 12
    for s in sessions[1:]:
        load.leave(s)
    clock.now += 1.0  # past the split its batch-mates would take
    assert shared_budget(sessions[0], 12, load) == 12  # alone again: its own choice


def test_batched_drafting_is_priced_by_the_longest_tree_and_split_near_the_exhaustive_optimum():
    """draft_batch_share < 1: a worker that batches its sessions' draft forwards drafts them in step,
    so the round's drafting is the longest tree's plus that share of the others'. The split (its
    prefix start no longer exact) stays within 2% of exhaustive search over random 3-session cases."""
    rng = random.Random(5)
    worst = 1.0
    for _ in range(200):
        gains, summed = random_three_sessions(rng)
        cost = BatchCost(summed.network_s, summed.draft_fixed_s, summed.draft_per_node_s, summed.verify_s,
                         draft_batch_share=rng.uniform(0.0, 0.9))
        best = max(predicted_rate(gains, combo, cost) for combo in itertools.product(range(5), repeat=3))
        split = split_budget(gains, [1] * 3, cost)
        assert split.tokens_per_s == pytest.approx(predicted_rate(gains, split.budgets, cost), rel=1e-9)
        worst = min(worst, split.tokens_per_s / best)
    assert worst >= 0.98, worst
    # the cost itself: two sessions' trees of 3 and 5 nodes, a fifth of the shorter one's drafting added
    cost = BatchCost(0.0, 0.05, 0.03, lambda rows: 0.4 + 0 * rows, draft_batch_share=0.2)
    assert cost.round_s(2, 8, 10, 5) == pytest.approx(0.4 + 0.05 * 1.2 + 0.03 * (5 + 0.2 * 3))
    assert cost.round_s(0, 0, 2, 0) == pytest.approx(0.4)  # plain for all: nothing drafted


def test_batched_drafting_keeps_trees_under_a_load_where_summed_drafting_goes_plain():
    """Eight sessions, a memory-bound forward (0.38 s + 4 ms a row) and drafting of 50 ms + 30 ms a
    node a session: priced as summed over the sessions, drafting eight trees costs more than they
    gain and the split goes plain; priced as batched (each session beside the longest tree adding a
    fifth of its own drafting), four nodes each pay, and the predicted rate is 1.6x plain's."""
    gains = [geometric_gains(0.9, 0.8, 32) for _ in range(8)]

    def cost(share):
        return BatchCost(0.002, 0.05, 0.03, lambda rows: 0.38 + 0.004 * rows, draft_batch_share=share)

    summed, batched = split_budget(gains, [1] * 8, cost(1.0)), split_budget(gains, [1] * 8, cost(0.2))
    assert summed.budgets == (0,) * 8
    assert all(b >= 3 for b in batched.budgets) and batched.tokens_per_s > 1.5 * summed.tokens_per_s


def test_the_split_keeps_each_session_inside_its_trust_region():
    """A session that has not verified a tree yet drafts at most its trust region (TunedSession:
    FIRST_TREE_CAP nodes) when it sizes its tree alone, and so it does inside the joint split: a
    burst of new sessions drafts small first trees, not what the warm worker's curves would pick."""
    load = LoadShare(FakeClock())
    for rows in (4, 40, 80):
        load.observe(batch_sessions=4, batch_rows=rows, verify_s=0.2 + 0.001 * rows, network_s=0.002)
    sessions = [FakeSession(geometric_gains(0.95, 0.95, 64)) for _ in range(4)]
    for s in sessions:
        shared_budget(s, 12, load)
    free = [shared_budget(s, 12, load) for s in sessions]
    assert min(free) > 5, free
    for s in sessions:
        s.cap = 5
    load.keep_split([], split_budget([], [], load.cost(sessions[0].tuner)))  # no split to reuse
    capped = [shared_budget(s, 12, load) for s in sessions]
    assert max(capped) == 5, capped
