"""Batched drafting (draft_service.draft_batcher): draft forwards that sessions ask for at the same
time run as one forward; each session's logits and cache are those of its forward alone (packed
float32 draft: batch-invariant kernels), a failing forward fails only its own session, and a
worker's concurrent greedy requests still give the target's greedy tokens."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from dyspec.builders import make_builder
from dyspec.coins import TorchCoins
from dyspec.hf_runner import HFDraftSession
from dyspec.warp import SamplingParams
from draft_service.draft_batcher import DraftForwardBatcher
from engine.prepack import prepack_linears
from tests.tiny_models import tiny_llama

PROMPTS = [[1, 9, 22, 4], [7, 3, 3, 51, 12, 8, 30], [2], [44, 45, 46, 47, 48]]


@pytest.fixture
def draft():
    model = tiny_llama(seed=6, num_layers=2)
    prepack_linears(model, "packed")
    return model


def _build_tree(model, prompt, forward_rows=None, seed=0, budget=12):
    """One dyspec tree over `prompt`: its tokens, parents and the draft distributions it sent."""
    session = HFDraftSession(model, prompt, forward_rows=forward_rows)
    builder = make_builder("dyspec", draft_params=SamplingParams(temperature=0.6, top_k=32))
    tree = builder.build(session, budget, TorchCoins(seed))
    return tree, session


class _Stall:
    """Holds the batcher's model thread on a first forward until released, so the forwards asked
    for meanwhile queue up and go in one batch."""

    def __init__(self, batcher: DraftForwardBatcher):
        self.started, self.release = threading.Event(), threading.Event()

        def stalled():
            self.started.set()
            self.release.wait(10)
            return torch.zeros(1, 1)

        self.batcher = batcher
        self.thread = threading.Thread(target=batcher.forward, args=(stalled, None, [0], None, None, 1))
        self.thread.start()
        assert self.started.wait(10)

    def together(self, sessions) -> None:
        """Run each of `sessions` on its own thread; once every one has a forward queued, release the
        model thread, so those forwards go in one batch; wait for all."""
        threads = [threading.Thread(target=session) for session in sessions]
        for thread in threads:
            thread.start()
        while len(self.batcher._queue) < len(sessions):
            threading.Event().wait(0.01)
        self.release.set()
        for thread in threads + [self.thread]:
            thread.join(60)


def test_concurrent_sessions_get_their_own_logits_from_batched_forwards(draft):
    alone = [_build_tree(draft, prompt, seed=i) for i, prompt in enumerate(PROMPTS)]
    batcher = DraftForwardBatcher(draft)
    try:
        stall = _Stall(batcher)
        results: dict[int, tuple] = {}

        def run(i):
            results[i] = _build_tree(draft, PROMPTS[i], batcher.forward, seed=i)

        stall.together([lambda i=i: run(i) for i in range(len(PROMPTS))])
    finally:
        batcher.close()
    assert batcher.stats.batched_forwards >= 1 and batcher.stats.largest_batch == len(PROMPTS)
    for i, (tree, session) in enumerate(alone):
        batched_tree, batched_session = results[i]
        assert batched_tree.tokens == tree.tokens and batched_tree.parents == tree.parents, i
        for node, dist in tree.q.items():  # what the verifier is sent: the exact draft distributions
            assert torch.equal(batched_tree.q[node].probs, dist.probs) and torch.equal(batched_tree.q[node].ids, dist.ids)
        for mine, theirs in zip(batched_session.cache.layers, session.cache.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_a_failing_forward_fails_only_its_own_session(draft):
    batcher = DraftForwardBatcher(draft)
    good = HFDraftSession(draft, PROMPTS[0])
    reference = HFDraftSession(draft, PROMPTS[0])
    outcome: dict[str, object] = {}
    try:
        stall = _Stall(batcher)
        bad_cache = HFDraftSession(draft, PROMPTS[1]).cache

        def bad():
            # A mask with the wrong number of rows: the batched forward refuses it, then alone it fails too.
            def own():
                raise ValueError("bad draft rows")

            try:
                batcher.forward(own, bad_cache, [3, 4], torch.zeros(1, 1, 1, 2), torch.tensor([[0, 1]]), 2)
            except ValueError as error:
                outcome["bad"] = error

        def fine():
            outcome["good"] = _logits_via(batcher, good)

        stall.together([bad, fine])
    finally:
        batcher.close()
    assert "bad draft rows" in str(outcome["bad"])
    assert torch.equal(outcome["good"], _logits_via(None, reference))
    assert good.cache.get_seq_length() == reference.cache.get_seq_length() == len(PROMPTS[0])


def _logits_via(batcher, session: HFDraftSession) -> torch.Tensor:
    from dyspec.tree import ROOT, TokenTree

    session.forward_rows = batcher.forward if batcher is not None else None
    return session.logits(TokenTree(), [ROOT])


def test_a_closed_batcher_refuses_new_forwards(draft):
    batcher = DraftForwardBatcher(draft)
    batcher.close()
    with pytest.raises(RuntimeError, match="stopping"):
        batcher.forward(lambda: None, None, [1], None, None, 1)


def test_sessions_drafting_in_step_share_forwards_instead_of_alternating(draft, monkeypatch):
    """Two sessions start their trees (the same prompt, their own coins) 5 ms apart, as after
    verdicts from one target forward, each draft forward taking 30 ms: taking only what is queued,
    the quicker one's forward goes alone every time, the other's queues behind it, and the two
    alternate, sharing no forward. Waiting part of a forward for the last forward's sessions puts
    them in step: every forward after the first is shared while both draft. Each tree is still the
    one drafted alone."""
    import draft_service.draft_batcher as draft_batcher

    draft.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    alone = [_build_tree(draft, PROMPTS[0], seed=i, budget=64) for i in range(2)]

    def in_step() -> DraftForwardBatcher:
        batcher = DraftForwardBatcher(draft)
        batcher.forward_s = 0.03  # as after earlier forwards
        trees: dict[int, tuple] = {}

        def run(i):
            trees[i] = _build_tree(draft, PROMPTS[0], batcher.forward, seed=i, budget=64)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        try:
            threads[0].start()
            time.sleep(0.005)
            threads[1].start()
            for thread in threads:
                thread.join(60)
        finally:
            batcher.close()
        for i, (tree, _) in enumerate(alone):
            assert trees[i][0].tokens == tree.tokens and trees[i][0].parents == tree.parents, i
        return batcher

    stepped = in_step().stats
    monkeypatch.setattr(draft_batcher, "GATHER_FRACTION", 0.0)
    apart = in_step().stats
    assert apart.batched_forwards == 0 and apart.forwards == apart.session_forwards >= 6, apart
    # the first forward goes alone (the other session has not asked yet), the last too where one
    # session's tree needs a forward more; every other one is shared
    assert stepped.batched_forwards >= stepped.session_forwards // 2 - 1 and stepped.forwards < apart.forwards, stepped


def test_batch_share_prices_a_batch_mates_rows_against_a_forward_of_its_own(draft):
    """DraftForwardBatcher.batch_share: what a session's forward adds to one that runs anyway, from
    the fit of forward time against rows; 1 (as dear as alone) before forwards of two sizes. The
    joint budget's LoadShare prices drafting with it where the servicer wires it in."""
    from draft_service.shared_budget import LoadShare
    from orchestrator.estimators import BudgetTuner

    batcher = DraftForwardBatcher(draft)
    try:
        assert batcher.batch_share() == 1.0
        for _ in range(10):  # 24 ms to read the weights, 2 ms a row
            batcher.cost.update(1, 0.026)
            batcher.cost.update(8, 0.040)
        batcher.stats.rows, batcher.stats.session_forwards = 80, 20  # 4 rows a session forward
        assert batcher.batch_share() == pytest.approx(0.008 / 0.032, rel=1e-3)
        load = LoadShare()
        assert load.cost(BudgetTuner(max_budget=8)).draft_batch_share == 1.0
        load.draft_batch_share = batcher.batch_share
        assert load.cost(BudgetTuner(max_budget=8)).draft_batch_share == pytest.approx(0.25, rel=1e-3)
    finally:
        batcher.close()
