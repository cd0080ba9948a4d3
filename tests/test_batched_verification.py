"""Batched verification on the target (target_service.batcher over the engine), in-process.

The model thread is held by a gate while rounds queue, so each test knows exactly which rounds
share a forward. With the packed float32 kernels a batched forward gives every session the bits of
its forward alone, and each session draws its acceptance coins from its own stream: so a session's
verdicts, greedy or sampled, equal those of the same rounds verified alone, whatever its
batch-mates are and whatever their seeds. That equality, checked exactly over many seeds, is the
proof that batching keeps the sampled distribution (the per-session verifier is proven lossless in
tests/test_lossless_*.py); a statistical test could only check it less strictly.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
import torch

from engine.prepack import prepack_linears
from proto.dyspec.v1 import sampling_pb2, target_pb2
from serving.errors import ServiceError
from serving.wire import tree_from_proto
from target_service.backend import PROMPT_ROWS, LocalBackend
from target_service.batcher import RoundBatcher
from target_service.config import BatchingConfig
from target_service.engine import ModelInfo, VerificationEngine
from target_service.store import SessionStore
from tests.target_fuzz_cases import Limits, valid_tree
from tests.tiny_models import tiny_llama

VOCAB, MAX_NODES, MAX_CONTEXT = 64, 8, 256
LIMITS = Limits(VOCAB, MAX_NODES, MAX_CONTEXT, "tiny")
SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=8),
             dict(temperature=1.0, top_p=0.8), dict(temperature=0.0), dict(temperature=1.3)]
PROMPTS = [[1, 2, 3], [9] * 17, [4, 5], [60, 61, 62, 63, 0, 1, 2], [7], list(range(30))]


@pytest.fixture(scope="module")
def model():
    model = tiny_llama(seed=5)
    prepack_linears(model, "packed")
    return model


class Target:
    """An engine, its model thread and a batcher; `gate()` holds the model thread until released."""

    def __init__(self, model, batching: BatchingConfig = BatchingConfig()):
        store = SessionStore(max_sessions=64, max_cached_tokens=1 << 16, idle_timeout_s=600)
        self.engine = VerificationEngine(LocalBackend(model), ModelInfo("tiny", VOCAB, (), MAX_CONTEXT), store,
                                         MAX_NODES)
        self.executor = ThreadPoolExecutor(1)
        self.batcher = RoundBatcher(self.engine, self.executor, batching)

    def run(self, fn, *args):
        return self.executor.submit(fn, *args).result(30)

    def open(self, session_id: str, prompt: list[int], seed: int, **sampling) -> None:
        params = sampling_pb2.SamplingParams(seed=seed, **sampling)
        self.run(self.engine.open, target_pb2.OpenSession(session_id=session_id, prompt_token_ids=prompt,
                                                          sampling=params))

    def gate(self) -> threading.Event:
        release = threading.Event()
        self.executor.submit(release.wait, 30)
        return release

    def batch(self, rounds: list[tuple[str, target_pb2.Tree]]) -> list[Future]:
        """Submit every round while the model thread is held: they all meet in one drain."""
        release = self.gate()
        futures = [self.batcher.submit(sid, tree, time.perf_counter_ns()) for sid, tree in rounds]
        release.set()
        for future in futures:
            try:
                future.exception(30)
            except Exception:  # noqa: BLE001 - a cancelled future raises here; the test checks it
                pass
        return futures

    def close(self):
        self.executor.shutdown(wait=True)


def outcome(future: Future):
    verdict = future.result()
    return list(verdict.accepted_node_indices), verdict.next_token_id


def planned_trees(seed: int, sessions: int, rounds: int, nodes: int | None = None) -> list[list[target_pb2.Tree]]:
    rng = random.Random(seed)
    return [[valid_tree(rng, LIMITS, nodes, round_number=r + 1) for r in range(rounds)] for _ in range(sessions)]


def run_sessions(model, seeds: list[int], trees, batched: bool):
    """Every session's outcomes over its planned trees: all sessions' round r in one forward
    (batched), or each session alone on a target of its own."""
    results = []
    targets = [Target(model)] if batched else [Target(model) for _ in seeds]
    try:
        for i, seed in enumerate(seeds):
            targets[i % len(targets)].open(f"s{i}", PROMPTS[i], seed, **SAMPLINGS[i])
        if batched:
            target = targets[0]
            per_round = [target.batch([(f"s{i}", trees[i][r]) for i in range(len(seeds))])
                         for r in range(len(trees[0]))]
            results = [[outcome(futures[i]) for futures in per_round] for i in range(len(seeds))]
            assert target.engine.forwards == len(trees[0]), "each round of all sessions in one forward"
            assert target.engine.batched_rounds == len(seeds) * len(trees[0])
        else:
            for i in range(len(seeds)):
                results.append([outcome(targets[i].batch([(f"s{i}", tree)])[0]) for tree in trees[i]])
    finally:
        for target in targets:
            target.close()
    return results


def test_each_session_in_a_batch_gets_the_verdicts_it_gets_alone_greedy_and_sampled(model):
    trees = planned_trees(seed=11, sessions=6, rounds=6)
    seeds = [101, 102, 103, 104, 105, 106]
    alone = run_sessions(model, seeds, trees, batched=False)
    assert run_sessions(model, seeds, trees, batched=True) == alone
    assert any(accepted for session in alone for accepted, _ in session), "some drafts were accepted"


def test_a_sessions_sampled_tokens_do_not_depend_on_its_batch_mates_seeds(model):
    """Session 1 (T=1.0) keeps its seed; its five batch-mates change theirs. Over 12 variations of
    the mates (and 8 seeds of its own), its outcomes never move, while the mates' do."""
    trees = planned_trees(seed=12, sessions=6, rounds=4)
    for own_seed in range(8):
        mine, theirs = set(), set()
        for variation in range(12 if own_seed == 0 else 2):
            mates = [1000 * own_seed + 10 * variation + k for k in range(5)]
            seeds = [mates[0], own_seed, *mates[1:]]
            results = run_sessions(model, seeds, trees, batched=True)
            mine.add(repr(results[1]))
            theirs.add(repr(results[3]))
        assert len(mine) == 1, f"session 1 with seed {own_seed} changed with its batch-mates' seeds"
        if own_seed == 0:
            assert len(theirs) > 1, "the mates' seeds did change their own draws (the check has power)"


def test_a_bad_round_a_cancelled_round_and_a_replay_inside_a_batch_leave_the_others_exact(model):
    trees = planned_trees(seed=13, sessions=5, rounds=2)
    alone = run_sessions(model, [1, 2, 3, 4, 5], trees, batched=False)
    target = Target(model)
    try:
        for i in range(5):
            target.open(f"s{i}", PROMPTS[i], i + 1, **SAMPLINGS[i])
        first = target.batch([(f"s{i}", trees[i][0]) for i in range(5)])
        assert [outcome(f) for f in first] == [a[0] for a in alone]

        bad = target_pb2.Tree()
        bad.CopyFrom(trees[1][1])
        bad.token_ids.append(VOCAB + 5)  # out of vocabulary, and one token more than parents
        wrong_round = target_pb2.Tree()
        wrong_round.CopyFrom(trees[2][1])
        wrong_round.round = 7
        release = target.gate()
        futures = [target.batcher.submit("s0", trees[0][1], 0), target.batcher.submit("s1", bad, 0),
                   target.batcher.submit("s2", wrong_round, 0), target.batcher.submit("s3", trees[3][1], 0),
                   target.batcher.submit("s4", trees[4][0], 0)]  # a replay: the cached verdict
        cancelled = target.batcher.submit("s2", trees[2][1], 0)
        assert cancelled.cancel()  # its stream went away while it queued
        forwards = target.engine.forwards
        release.set()
        assert outcome(futures[0]) == alone[0][1] and outcome(futures[3]) == alone[3][1]
        with pytest.raises(ServiceError) as invalid:
            futures[1].result(30)
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ServiceError) as precondition:
            futures[2].result(30)
        assert precondition.value.code == grpc.StatusCode.FAILED_PRECONDITION
        replay = futures[4].result(30)
        assert replay.replayed and outcome(futures[4]) == alone[4][0]
        assert target.engine.forwards == forwards + 1, "the two good rounds shared one forward"
        assert target.engine.store.get("s2").last_round == 1, "the cancelled round was skipped, not run"
        # the failed and the skipped sessions carry on (a bad round ends a stream in the servicer, not here)
        assert outcome(target.batch([("s2", trees[2][1])])[0]) == alone[2][1]
    finally:
        target.close()


def test_a_walk_that_fails_fails_its_own_round_only(model):
    trees = planned_trees(seed=14, sessions=3, rounds=1)
    alone = run_sessions(model, [1, 2, 3], trees, batched=False)
    target = Target(model)
    try:
        for i in range(3):
            target.open(f"s{i}", PROMPTS[i], i + 1, **SAMPLINGS[i])

        def broken(*args):
            raise RuntimeError("walk failed")

        target.engine.store.get("s1").verifier.finish = broken
        futures = target.batch([(f"s{i}", trees[i][0]) for i in range(3)])
        assert outcome(futures[0]) == alone[0][0] and outcome(futures[2]) == alone[2][0]
        with pytest.raises(RuntimeError, match="walk failed"):
            futures[1].result()
    finally:
        target.close()


def test_a_failed_forward_fails_every_round_in_it(model):
    trees = planned_trees(seed=15, sessions=2, rounds=1)
    target = Target(model)
    try:
        for i in range(2):
            target.open(f"s{i}", PROMPTS[i], i + 1)

        def broken(rounds):
            raise MemoryError("no room for the batch")

        target.engine.backend.forward_trees = broken
        futures = target.batch([(f"s{i}", trees[i][0]) for i in range(2)])
        for future in futures:
            with pytest.raises(MemoryError):
                future.result()
    finally:
        target.close()


def test_the_row_limit_splits_a_queue_into_forwards_in_order(model):
    trees = planned_trees(seed=16, sessions=6, rounds=2, nodes=6)
    alone = run_sessions(model, list(range(6)), trees, batched=False)
    rows_limit = 20
    target = Target(model, BatchingConfig(max_batch_rows=rows_limit))
    try:
        for i in range(6):
            target.open(f"s{i}", PROMPTS[i], i, **SAMPLINGS[i])
        for r in range(2):
            forwards, rows = target.engine.forwards, target.engine.rows_forwarded
            futures = target.batch([(f"s{i}", trees[i][r]) for i in range(6)])
            assert [outcome(f) for f in futures] == [a[r] for a in alone]
            for future in futures:
                timings = future.result().timings
                assert timings.batch_rows <= rows_limit or timings.batch_sessions == 1, timings
            packed, forwards_wanted = 0, 0  # first-come packing of each round's rows under the limit
            for i in range(6):
                rows_i = (len(PROMPTS[i]) if r == 0 else 1) + len(trees[i][r].token_ids)
                if forwards_wanted == 0 or packed + rows_i > rows_limit:
                    forwards_wanted, packed = forwards_wanted + 1, 0
                packed += rows_i
            assert 1 < forwards_wanted < 6, "the plan splits this queue, and still batches"
            assert target.engine.forwards - forwards == forwards_wanted
            shared = {(f.result().timings.forward_ns, f.result().timings.batch_rows) for f in futures}  # one per forward
            assert target.engine.rows_forwarded - rows == sum(batch_rows for _, batch_rows in shared)
    finally:
        target.close()


def test_batching_off_runs_one_round_per_forward(model):
    trees = planned_trees(seed=17, sessions=3, rounds=1)
    alone = run_sessions(model, [1, 2, 3], trees, batched=False)
    target = Target(model, BatchingConfig(enabled=False))
    try:
        for i in range(3):
            target.open(f"s{i}", PROMPTS[i], i + 1, **SAMPLINGS[i])
        futures = target.batch([(f"s{i}", trees[i][0]) for i in range(3)])
        assert [outcome(f) for f in futures] == [a[0] for a in alone]
        assert target.engine.forwards == 3 and target.engine.batched_rounds == 0
        assert all(f.result().timings.batch_sessions == 1 for f in futures)
    finally:
        target.close()


def test_the_window_waits_for_open_sessions_only(model):
    trees = planned_trees(seed=18, sessions=2, rounds=2)
    target = Target(model, BatchingConfig(window_s=0.5))
    try:
        target.open("s0", PROMPTS[0], 1)
        started = time.monotonic()
        target.batcher.submit("s0", trees[0][0], 0).result(30)
        assert time.monotonic() - started < 0.4, "a lone session does not wait for the window"
        target.open("s1", PROMPTS[1], 2)
        first = target.batcher.submit("s0", trees[0][1], 0)
        time.sleep(0.1)  # the drain is waiting for s1's round
        second = target.batcher.submit("s1", trees[1][0], 0)
        assert first.result(30).timings.batch_sessions == 2 and second.result(30).timings.batch_sessions == 2
    finally:
        target.close()


def test_the_automatic_window_is_a_tenth_of_the_forward_and_stops_plain_sessions_ping_ponging(model):
    """Without a window, a round that arrives just after another's drain began waits a whole forward
    and then runs alone (two plain sessions alternate forever); the automatic window (the default)
    waits a tenth of the recent forward time for open sessions in plain decoding, so both share one
    forward. It does not wait for a session whose last round carried a tree (it is drafting)."""
    slow = tiny_llama(seed=5)
    prepack_linears(slow, "packed")
    slow.register_forward_pre_hook(lambda module, args: time.sleep(0.3))
    plain = planned_trees(seed=19, sessions=2, rounds=3, nodes=0)
    drafted = planned_trees(seed=20, sessions=1, rounds=1, nodes=4)[0]
    for window, first_tree, together in ((0.0, plain[0][0], False), (None, plain[0][0], True),
                                         (None, drafted[0], False)):
        target = Target(slow, BatchingConfig(window_s=window))
        try:
            target.open("s0", PROMPTS[0], 1)
            target.open("s1", PROMPTS[1], 2)
            assert target.batcher.submit("s0", first_tree, 0).result(30).timings.batch_sessions == 1
            forward_s = target.batcher.forward_s
            assert forward_s >= 0.3
            assert target.batcher.window_s() == (0.0 if window == 0.0 else pytest.approx(min(0.05, 0.1 * forward_s)))
            first = target.batcher.submit("s1", plain[1][0], 0)
            time.sleep(0.01)  # s0's next round comes 10 ms after s1's drain began
            second = target.batcher.submit("s0", plain[0][1], 0)
            sessions = {first.result(30).timings.batch_sessions, second.result(30).timings.batch_sessions}
            assert sessions == ({2} if together else {1}), (window, len(first_tree.token_ids), sessions)
        finally:
            target.close()


def test_the_automatic_window_waits_for_drafting_sessions_due_within_a_forward(model):
    """Two drafting sessions whose trees come 50 ms after their verdicts, the second started 150 ms
    after the first (so queued behind the first one's forward): without waiting for drafting
    sessions each round arrives during the other's forward and they alternate, never sharing one;
    the automatic window waits for a session whose next round is due (its measured think time after
    its verdict) within a forward (~0.3 s here), so after a round or two they are verified
    together, also when that is most of a forward away (0.2 s). A session due later than a forward
    is not waited for."""
    slow = tiny_llama(seed=5)
    prepack_linears(slow, "packed")
    slow.register_forward_pre_hook(lambda module, args: time.sleep(0.3))
    rounds = 6
    trees = planned_trees(seed=21, sessions=2, rounds=rounds, nodes=4)

    def run(batching: BatchingConfig, think_s: float, second_after_s: float = 0.15) -> list[list[int]]:
        target = Target(slow, batching)
        shared: list[list[int]] = [[], []]
        try:
            target.open("s0", PROMPTS[0], 1)
            target.open("s1", PROMPTS[1], 2)

            def drafting_session(i: int) -> None:
                for r in range(rounds):
                    verdict = target.batcher.submit(f"s{i}", trees[i][r], time.perf_counter_ns()).result(30)
                    shared[i].append(verdict.timings.batch_sessions)
                    time.sleep(think_s)  # the worker drafts the next tree

            workers = [threading.Thread(target=drafting_session, args=(i,)) for i in (0, 1)]
            workers[0].start()
            time.sleep(second_after_s)
            workers[1].start()
            for w in workers:
                w.join(60)
        finally:
            target.close()
        return shared

    together = run(BatchingConfig(), think_s=0.05)
    # each session's first round or two run alone until the think times are measured, and the one
    # that started first has its last round alone
    assert all(sum(b == 2 for b in session) >= rounds - 2 for session in together), together
    apart = run(BatchingConfig(window_s=0.0), think_s=0.05)  # no window at all: they alternate
    assert sum(b == 2 for session in apart for b in session) <= 2, apart
    late = run(BatchingConfig(), think_s=0.2)  # due within the forward all the same
    assert all(sum(b == 2 for b in session) >= rounds - 2 for session in late), late
    # started after the first one's forward and drafting for a second: each due 0.6-0.7 s after the
    # other's round, more than a forward: not awaited
    slow_drafts = run(BatchingConfig(), think_s=1.0, second_after_s=0.6)
    assert sum(b == 2 for session in slow_drafts for b in session) <= 2, slow_drafts


def test_batched_threads_under_load_change_no_bit_and_a_lone_session_keeps_its_thread(monkeypatch):
    """--batched-threads: while two or more sessions are open, prompt prefills, and round forwards
    while no session outside them is being drafted for (its last round carried a tree), split the packed
    kernels' panels over more threads (torch's own ops keep their one: engine.kernel_threads), with
    the same logits bit for bit as on one thread; round forwards while some other session's last round
    carried a tree (its draft worker drafts on the same machine), and every forward of a lone
    session, keep one thread. A target on stock kernels gives the threads to torch instead."""
    import engine.packed_linear as packed_linear

    wide = tiny_llama(seed=7, hidden_size=256, num_heads=4, num_kv_heads=2, vocab_size=512)  # panels to split
    prepack_linears(wide, "packed")
    limits = Limits(512, MAX_NODES, MAX_CONTEXT, "tiny")
    prompts = [[1, 2, 3, 4], [9] * 11, [400, 401]]

    def tree(seed: int, nodes: int):
        return tree_from_proto(valid_tree(random.Random(seed), limits, nodes, round_number=1))

    def forward(backend, count, nodes=(0, 0, 0)):
        sessions = [backend.create(f"s{i}", prompts[i]) for i in range(count)]
        assert backend.prefill(sessions[0]) == len(prompts[0]) - 1
        return backend.forward_trees([(s, tree(i, nodes[i])) for i, s in enumerate(sessions)]), sessions

    split = []  # the thread count of every panel product, as the kernels saw it
    real_threads = packed_linear.kernel_threads
    monkeypatch.setattr(packed_linear, "kernel_threads", lambda: split.append(real_threads()) or split[-1])
    torch_switches = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (torch_switches.append(n), real(n)))

    def threads_of(call) -> set[int]:
        split.clear()
        call()
        return set(split)

    before = torch.get_num_threads()
    try:
        real(1)
        one_thread, _ = forward(LocalBackend(wide), 3)
        assert set(split) == {1}
        loaded = LocalBackend(wide, batched_threads=2)
        split.clear()
        two_threads, sessions = forward(loaded, 3)  # three open, plain rounds: prefill and batched forward switch
        assert set(split) == {2} and loaded.loaded_forwards == 2 and torch.get_num_threads() == 1
        assert all(torch.equal(a, b) for a, b in zip(one_thread, two_threads, strict=True))
        loaded.release(["s1", "s2"])
        # a session whose round carries a tree is being drafted for once its verdict is out: no other
        # session's forward switches while its last round had one (each session forwards once here: a
        # second round would need the first committed); its own round's forward, which its draft
        # waits for, does
        a, b, c = (loaded.create(name, [5, 6, 7]) for name in ("a", "b", "c"))
        assert threads_of(lambda: loaded.forward_trees([(a, tree(11, 5))])) == {2}
        assert loaded.drafting() and not loaded.drafting([a]) and loaded.loaded_forwards == 3
        # a plain round of another session: one thread, a's draft drafting meanwhile
        assert threads_of(lambda: loaded.forward_trees([(b, tree(12, 0))])) == {1}
        assert loaded.loaded_forwards == 3
        # a prompt's prefill (compute-bound) switches all the same
        assert threads_of(lambda: loaded.prefill(loaded.create("d", [7, 8, 9]))) == {2}
        assert loaded.loaded_forwards == 4
        # and so does a round that carries its prompt (it overtook the prefill at open), beside a
        # short one; a round whose uncached stretch is just short of a prompt's does not
        e, f = loaded.create("e", list(range(10, 10 + PROMPT_ROWS))), loaded.create("f", [3, 4])
        assert threads_of(lambda: loaded.forward_trees([(e, tree(14, 0)), (f, tree(15, 0))])) == {2}
        assert loaded.loaded_forwards == 5
        g = loaded.create("g", list(range(10, 10 + PROMPT_ROWS - 1)))
        assert threads_of(lambda: loaded.forward_trees([(g, tree(16, 0))])) == {1}
        assert loaded.loaded_forwards == 5
        loaded.release(["a"])  # the drafted session goes, and its tree with it: the switch resumes
        assert not loaded.drafting()
        assert threads_of(lambda: loaded.forward_trees([(c, tree(13, 0))])) == {2}
        assert loaded.loaded_forwards == 6
        loaded.release(["b", "c", "d", "e", "f", "g"])
        loaded.forward_trees([(loaded.create("s9", [5, 6]), tree(9, 0))])
        assert loaded.loaded_forwards == 7  # s0 and s9 open: still under load
        loaded.release(["s0"])
        assert threads_of(lambda: forward(LocalBackend(wide, batched_threads=2), 1)) == {1}  # a lone session
        assert torch_switches == [] and torch.get_num_threads() == 1  # torch's ops never left their thread

        stock = tiny_llama(seed=7, hidden_size=256, num_heads=4, num_kv_heads=2, vocab_size=512)
        forward(LocalBackend(stock, batched_threads=2), 3)
        assert torch_switches == [2, 1, 2, 1] and torch.get_num_threads() == 1
    finally:
        real(before)
