"""The automatic budget (BudgetTuner per session) inside a real draft worker, in-process on
loopback: greedy output stays the target's, the tuner sees every round, the budgets it picks move
with what it measures, and a slower link (larger round trip) makes it draft larger trees."""
from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from draft_service.budget import RoundRecord
from draft_service.config import DraftConfig
from draft_service.server import DraftServer, default_policy
from draft_service.servicer import DraftWorkerServicer
from serving.grpc_server import ActiveCalls
from draft_service.tuned_budget import ACCEPTED_HEADROOM, FIRST_TREE_CAP, TunedBudget, TunedSession, observation
from dyspec import generate
from dyspec.decoding import RoundResult, RoundStats
from dyspec.tree import ROOT, TokenTree
from dyspec.verify import Verdict
from dyspec.warp import SamplingParams
from orchestrator.estimators import BudgetTuner
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
from target_service.config import TargetConfig
from target_service.server import TargetServer
from tests import service_models
from tests.background_loop import BackgroundLoop
from tests.worker_responses import streamed_tokens

PROMPTS = ([2, 7, 1, 8], [3, 1, 4, 1, 5, 9])
NEW_TOKENS = 40
SLOW_LINK_S = 0.2


class RecordingTuned:
    """TunedBudget that keeps each session's TunedSession; `extra_rtt_s` is added to every round's
    wall time before the tuner sees it (a slower link, without slowing the test)."""

    def __init__(self, max_budget: int = 16, extra_rtt_s: float = 0.0):
        self.max_budget, self.extra_rtt_s = max_budget, extra_rtt_s
        self.sessions: list[TunedSession] = []

    def __call__(self, sampling=None, shape=None):
        session = TunedSession(BudgetTuner(max_budget=self.max_budget))
        self.sessions.append(session)
        if not self.extra_rtt_s:
            return session
        return lambda history: session([dataclasses.replace(r, round_s=r.round_s + self.extra_rtt_s) for r in history])


@pytest.fixture(scope="module")
def models():
    return service_models.target(), service_models.draft()


@pytest.fixture(scope="module")
def serve(models):
    """serve(policy) -> the draft worker's address, on a fresh worker with that budget policy."""
    loop = BackgroundLoop()

    async def build_target():  # aio servers are built inside the loop that runs them
        server = TargetServer(TargetConfig(port=0), models[0], "tiny")
        await server.start()
        return server

    target = loop.run(build_target())
    workers = []

    def start(policy) -> str:
        async def build():
            worker = DraftServer(DraftConfig(target_address=target.address, port=0), models[1], budget_policy=policy)
            await worker.start()
            return worker
        workers.append(loop.run(build()))
        return workers[-1].address

    yield start
    for worker in workers:
        loop.run(worker.stop(grace_s=1))
    loop.run(target.stop(grace_s=1))
    loop.close()


def run(address: str, prompt: list[int]) -> tuple[list[int], generation_pb2.GenerationStats]:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt), max_new_tokens=NEW_TOKENS,
                                             method="dyspec", budget=0)
    with grpc.insecure_channel(address) as channel:
        responses = list(generation_pb2_grpc.DraftWorkerStub(channel).Generate(
            generation_pb2.WorkerGenerateRequest(request=request), timeout=60))
    return streamed_tokens(responses), responses[-1].summary.stats


def test_auto_is_the_default_policy_when_no_budget_is_configured(models):
    assert isinstance(default_policy(DraftConfig(target_address="x")), TunedBudget)
    assert default_policy(DraftConfig(target_address="x", budget=5))(SamplingParams(temperature=0.7))([]) == 5
    # its joint budget prices drafting by the worker's draft batcher, which batches its sessions' forwards
    # (the servicer alone: a DraftServer's aio server needs an event loop, which this test has none of)
    def servicer(config: DraftConfig) -> DraftWorkerServicer:
        return DraftWorkerServicer(config, models[1], None, default_policy(config), ActiveCalls())

    batching = servicer(DraftConfig(target_address="x"))
    assert batching.budget_policy.load.draft_batch_share == batching.batcher.batch_share
    batching.batcher.close()
    alone = servicer(DraftConfig(target_address="x", batch_drafting=False))
    assert alone.batcher is None and alone.budget_policy.load.draft_batch_share is None


def test_observation_maps_a_round_record_literally():
    tree = TokenTree()
    a = tree.add(ROOT, 5, 0.9)
    tree.add(a, 6, 0.5)
    tree.add(ROOT, 7, 0.05)
    stats = RoundStats(tree_size=3, tree_depth=2, accepted=1, draft_calls=2, draft_s=0.010, build_s=0.002,
                       verify_s=0.030, target_forward_s=0.015, commit_s=0.001)
    record = RoundRecord(budget=4, result=RoundResult(tree, Verdict([a], 9, [5, 9]), stats), round_s=0.045,
                         target_queue_s=0.001, target_forward_s=0.015, target_total_s=0.020, wire_s=0.0005)
    obs = observation(record)
    assert (obs.budget, obs.node_values, obs.node_accepted) == (4, [0.9, 0.5, 0.05], [True, False, False])
    assert (obs.round_s, obs.target_s, obs.wire_s) == (0.045, 0.020, 0.0005)
    assert obs.draft_s == pytest.approx(0.012)


def test_greedy_output_equals_target_only_and_the_tuner_sees_every_round(models, serve):
    policy = RecordingTuned()
    address = serve(policy)
    for prompt in PROMPTS:
        tokens, stats = run(address, prompt)
        with torch.no_grad():
            assert tokens == generate(*models, prompt, max_new_tokens=NEW_TOKENS, method="autoregressive").tokens
        session = policy.sessions[-1]
        # asked once per round, shown every finished round but the prompt-prefill one and the last
        assert session.seen == stats.steps - 1 and session.tuner.rounds == stats.steps - 2
        budgets = [r.budget for r in stats.rounds]
        # Overlapped rounds choose round k's budget once round k-1 is sent, from rounds <= k-2: the
        # tuner's first point, again twice before it saw a round without the prefill, then a plain round
        assert budgets[:4] == [8, 8, 8, 0], budgets
        assert len(set(budgets)) > 1, f"the budget never moved: {budgets}"
        assert all(0 <= b <= 16 for b in budgets)
        assert sum(stats.accepted_per_position) == stats.accepted_tokens


def test_a_slower_link_gives_larger_trees(serve):
    def mean_budget(policy) -> float:
        budgets = [r.budget for prompt in PROMPTS for r in run(serve(policy), prompt)[1].rounds[1:]]
        return sum(budgets) / len(budgets)

    fast, slow = mean_budget(RecordingTuned()), mean_budget(RecordingTuned(extra_rtt_s=SLOW_LINK_S))
    assert slow > fast + 1, f"mean budget {slow:.2f} with a {SLOW_LINK_S} s longer round trip, {fast:.2f} without"


def test_later_sessions_start_from_the_workers_experience(models, serve):
    """The default policy shares what sessions measured: the first request starts cold (budget 8
    until it saw a round, then a plain probe round), a later one starts where the worker's tuner stands, and a policy
    without warm start keeps every session cold."""
    policy = TunedBudget(max_budget=16)
    address = serve(policy)
    first = [r.budget for r in run(address, PROMPTS[0])[1].rounds]
    assert first[:4] == [8, 8, 8, 0]
    shared_rounds = policy.shared["greedy"].snapshot().rounds
    assert shared_rounds == len(first) - 2  # every round the session's tuner saw went to the worker's too
    # what the worker's tuner would choose now, within the request's first-tree trust region
    expected = min(policy.shared["greedy"].snapshot().next_budget(), FIRST_TREE_CAP)
    tokens, stats = run(address, PROMPTS[1])
    second = [r.budget for r in stats.rounds]
    assert second[0] == expected, f"the second session did not start from the worker's tuner: {second}"
    assert second[:4] != [8, 8, 8, 0], f"the second session started cold: {second}"
    assert policy.shared["greedy"].snapshot().rounds == shared_rounds + len(second) - 2
    with torch.no_grad():
        assert tokens == generate(*models, PROMPTS[1], max_new_tokens=NEW_TOKENS, method="autoregressive").tokens

    cold = TunedBudget(max_budget=16, warm_start=False)
    address = serve(cold)
    for prompt in PROMPTS:
        assert [r.budget for r in run(address, prompt)[1].rounds][:4] == [8, 8, 8, 0]


def test_greedy_and_sampled_requests_learn_in_separate_shared_tuners():
    """A draft value means another acceptance under greedy and under stochastic verification: a
    worker warmed on greedy requests must not open a sampled one with greedy-sized trees."""
    from orchestrator.estimators import RoundObservation

    policy = TunedBudget(max_budget=16)
    rich = RoundObservation(budget=8, node_values=[0.9 ** (i + 1) for i in range(8)], node_accepted=[True] * 8,
                            round_s=0.5, draft_s=0.1, target_s=0.4, wire_s=0.0, kept_ahead=None)
    for _ in range(5):
        policy.shared["greedy"].observe(rich)
    assert policy(SamplingParams(temperature=0.0)).tuner.rounds == 5
    assert policy(None).tuner.rounds == 5  # a caller that does not say is treated as greedy
    sampled = policy(SamplingParams(temperature=0.7, top_p=0.9))
    assert sampled.tuner.rounds == 0 and sampled.cold  # starts cold: 8, 8, 8, then a plain probe round
    assert policy.shared["sampled"].snapshot().rounds == 0 and policy.shared["greedy"].snapshot().rounds == 5


def test_a_warm_request_grows_its_trees_from_the_first_tree_cap():
    """The worker's tuner may favour big trees (another prompt's acceptance): a new request still
    starts at FIRST_TREE_CAP nodes and at most doubles the largest tree it has verified."""
    from orchestrator.estimators import RoundObservation

    warm = BudgetTuner(max_budget=64)
    rich = RoundObservation(budget=64, node_values=[0.99 ** (i + 1) for i in range(64)], node_accepted=[True] * 64,
                            round_s=0.5, draft_s=0.05, target_s=0.45, wire_s=0.0, kept_ahead=None)
    small = dataclasses.replace(rich, budget=4, node_values=rich.node_values[:4], node_accepted=[True] * 4,
                                round_s=0.45, target_s=0.4)
    for _ in range(6):
        warm.observe(rich)
        warm.observe(small)
    assert warm.next_budget() > FIRST_TREE_CAP  # the worker would go bigger at once
    session = TunedSession(warm)
    budgets, history = [], []
    for _ in range(5):
        budget = session(history)
        budgets.append(budget)
        history.append(_chain_round(budget, accepted=budget))  # every node accepted
    assert budgets[0] == FIRST_TREE_CAP and budgets[1] <= 2 * FIRST_TREE_CAP, budgets
    assert all(b <= max(FIRST_TREE_CAP, 2 * max(budgets[:i], default=0)) for i, b in enumerate(budgets))
    assert budgets[-1] > FIRST_TREE_CAP  # and it does grow where trees pay


def test_a_request_whose_rounds_accept_little_keeps_small_trees():
    """Doubling alone let a licence prompt climb to 40-node trees for 2-5 accepted tokens a round:
    a tree is also at most ACCEPTED_HEADROOM x (1 + the most any of its rounds accepted)."""
    from orchestrator.estimators import RoundObservation

    warm = BudgetTuner(max_budget=64)
    rich = RoundObservation(budget=64, node_values=[0.99 ** (i + 1) for i in range(64)], node_accepted=[True] * 64,
                            round_s=0.5, draft_s=0.05, target_s=0.45, wire_s=0.0, kept_ahead=None)
    for _ in range(6):
        warm.observe(rich)
    session = TunedSession(warm)
    budgets, history = [], []
    for _ in range(8):
        budget = session(history)
        budgets.append(budget)
        history.append(_chain_round(budget, accepted=min(2, budget)))  # never more than two accepted
    assert session.most_accepted == 2
    assert max(budgets) <= max(FIRST_TREE_CAP, ACCEPTED_HEADROOM * 3), budgets  # 12, where doubling allowed 64


def test_rounds_overlap_by_default_only_when_the_target_is_on_another_host():
    auto = DraftConfig(target_address="x")
    assert auto.overlap is None
    assert not auto.overlaps("127.0.0.1:50061") and not auto.overlaps("localhost:50061")
    assert not auto.overlaps("[::1]:50061")
    assert auto.overlaps("target.dyspec.svc:50061") and auto.overlaps("10.0.0.7:50061")
    assert DraftConfig(target_address="x", overlap=True).overlaps("127.0.0.1:1")
    assert not DraftConfig(target_address="x", overlap=False).overlaps("10.0.0.7:1")
    from draft_service.__main__ import build_parser, config_from_args

    parse = lambda *flags: config_from_args(build_parser().parse_args(["--target-address", "t:1", "--model-dir", "m", *flags]))  # noqa: E731
    assert parse().overlap is None and parse("--overlap", "on").overlap is True
    assert parse("--no-overlap").overlap is False and parse("--overlap", "off").overlap is False


def _chain_round(budget: int, accepted: int) -> RoundRecord:
    """A verified round over a chain of `budget` nodes whose first `accepted` were accepted."""
    tree = TokenTree()
    for i in range(budget):
        tree.add(i - 1 if i else ROOT, 5 + i, 0.99 ** (i + 1))
    path = list(range(accepted))
    verdict = Verdict(accepted=path, next_token=1, tokens=[*(tree.tokens[a] for a in path), 1])
    stats = RoundStats(tree_size=budget, tree_depth=budget, accepted=accepted, draft_calls=budget,
                       draft_s=0.01 * budget, build_s=0.0, verify_s=0.45, target_forward_s=0.4, commit_s=0.0)
    return RoundRecord(budget=budget, result=RoundResult(tree, verdict, stats), round_s=0.5, target_queue_s=0.0,
                       target_forward_s=0.4, target_total_s=0.45, wire_s=0.0)


def test_a_session_follows_its_draft_cache_and_prices_catching_it_up():
    """The draft's cache starts a prompt behind and catches up with the first tree, whose extra draft
    time teaches the worker a catch-up token's cost; plain rounds leave it behind again. setup_s
    spreads a catch-up over the rounds left, and ignores a cache behind by a few tokens."""
    from draft_service.budget import RequestShape
    from draft_service.shared_budget import LoadShare
    from draft_service.tuned_budget import SETUP_MIN_TOKENS

    load = LoadShare()
    session = TunedSession(BudgetTuner(max_budget=16), load=load, shape=RequestShape(128, 40))
    assert session.draft_behind == 128 and session.setup_s(0.002) > 0
    d0, d1 = session.tuner.draft.coefficients()
    first = _chain_round(8, accepted=3)
    first = dataclasses.replace(first, result=dataclasses.replace(
        first.result, stats=dataclasses.replace(first.result.stats, draft_s=0.5)))
    history = [first]
    session(history)
    assert load.catch_up_s_per_token() == pytest.approx((0.5 - (d0 + d1 * 8)) / 128)
    assert session.draft_behind == 1 and session.generated == 4 and session.setup_s(0.002) == 0.0
    for _ in range(SETUP_MIN_TOKENS):
        history.append(_chain_round(0, accepted=0))  # plain rounds: one token each, not in the draft's cache
        session(history)
    assert session.draft_behind == 1 + SETUP_MIN_TOKENS and session.generated == 4 + SETUP_MIN_TOKENS
    per_round = 1.0 + float(sum(session.tuner.gains()[:FIRST_TREE_CAP]))
    left = 40 - session.generated
    assert session.setup_s(0.002) == pytest.approx(0.002 * (1 + SETUP_MIN_TOKENS) / max(1.0, left / per_round))
    learnt = load.catch_up_s_per_token()
    history.append(_chain_round(4, accepted=4))  # drafting again catches up those tokens, and learns from it
    session(history)
    assert session.draft_behind == 1 and load.catch_up_s_per_token() != learnt
    assert TunedSession(BudgetTuner(max_budget=16)).setup_s(0.002) == 0.0  # an unknown request


def test_a_tuned_session_shares_the_worker_budget_from_its_start_to_its_close():
    from draft_service.shared_budget import LoadShare

    load = LoadShare()
    sessions = [TunedSession(BudgetTuner(max_budget=16), load=load) for _ in range(3)]
    assert load.ask(sessions[0], 0.0) == sorted(sessions, key=id)  # the others have not asked yet
    sessions[1].close()
    assert load.ask(sessions[0], 0.0) == sorted([sessions[0], sessions[2]], key=id)
    TunedSession(BudgetTuner(max_budget=16)).close()  # without a worker's load: nothing to leave
