"""Prefill at open: a target session forwards its prompt (but the last token) right after the open,
while the draft drafts tree 1. The cached rows are the bits round 1 would have computed (packed
kernels, row-exact attention), so every verdict is unchanged; through a real target server, round
1 then forwards only root and tree and the Stats count the prefilled tokens."""
from __future__ import annotations

import random

import pytest
import torch

from dyspec.coins import TorchCoins
from dyspec.decoding import LocalVerifier
from dyspec.hf_runner import HFTargetSession
from dyspec.warp import SamplingParams
from dyspec.tree import TokenTree
from engine.prepack import prepack_linears
from proto.dyspec.v1 import target_pb2, target_pb2_grpc
from serving.models import enable_row_exact_attention
from serving.wire import tree_from_proto
from target_service.config import TargetConfig
from tests.service_models import target as tiny_target
from tests.target_client import SessionStream, open_request, served_target
from tests.target_fuzz_cases import WITHOUT, Limits, valid_tree

PROMPT = [5, 17, 2, 40, 33, 8, 19, 3, 11]


def _tree() -> TokenTree:
    return TokenTree.from_arrays([(7 * i + 3) % 60 for i in range(9)], [-1] + [(i - 1) // 2 for i in range(1, 9)])


@pytest.fixture(scope="module")
def model():
    model = tiny_target()
    prepack_linears(model, "packed")
    enable_row_exact_attention(model, "packed")
    return model


def test_a_prefilled_session_verifies_with_the_same_bits(model):
    lazy, early = HFTargetSession(model, PROMPT), HFTargetSession(model, PROMPT)
    assert early.prefill() == len(PROMPT) - 1 and early.n_cached == len(PROMPT) - 1
    assert early.prefill() == 0  # only the root is left uncached
    assert torch.equal(early.forward_tree(_tree()), lazy.forward_tree(_tree()))
    for mine, theirs in zip(early.cache.layers, lazy.cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_a_failed_prefill_leaves_the_cache_as_it_was(model, monkeypatch):
    session = HFTargetSession(model, PROMPT)

    def broken(*args, **kwargs):
        session.cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)  # a layer got written
        raise RuntimeError("out of memory")

    monkeypatch.setattr(session, "_forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.prefill()
    assert session.n_cached == 0 and session.cache.get_seq_length() == 0


@pytest.mark.parametrize("prefill_at_open", [True, False])
def test_round_one_forwards_only_root_and_tree_after_a_prefill(model, prefill_at_open):
    config = TargetConfig(port=0, max_tree_nodes=16, drain_grace_s=1, warmup=False, prefill_at_open=prefill_at_open)
    with served_target(config, model) as (_, channel):
        stream = SessionStream(channel)
        assert stream.send(open_request("s", PROMPT)).WhichOneof("kind") == "opened"
        wire = valid_tree(random.Random(5), Limits(model.config.vocab_size, 16, 256, "tiny"), nodes=9, draw=WITHOUT)
        tree = tree_from_proto(wire)
        verdict = stream.send(target_pb2.TargetRequest(tree=wire)).verdict
        stats = target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)
        expected_rows = len(tree) + 1 if prefill_at_open else len(PROMPT) + len(tree)
        assert verdict.timings.batch_rows == expected_rows
        assert stats.prefilled_tokens == (len(PROMPT) - 1 if prefill_at_open else 0)
        alone = LocalVerifier(HFTargetSession(model, PROMPT), SamplingParams(0.0), TorchCoins(0)).verify(tree)
        assert list(verdict.accepted_node_indices) == alone.accepted and verdict.next_token_id == alone.next_token
        stream.half_close()


PROMPTS = [PROMPT, [9, 9, 1, 30, 2, 7], [44, 3], [12, 50, 6, 6, 21, 18, 4, 9, 27, 31, 8, 2]]


def _caches_equal(a: HFTargetSession, b: HFTargetSession) -> bool:
    return a.n_cached == b.n_cached and all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.cache.layers, b.cache.layers))


def test_prompts_prefilled_in_one_forward_get_the_bits_of_their_own_prefills(model, monkeypatch):
    """engine.batched_forward.prefill_sessions: several sessions' prompts in one forward; each cache
    equals its own prefill's bit for bit (packed kernels, row-exact attention), a session with
    nothing left to cache gets 0, and a failed forward leaves every cache as it was."""
    from engine import batched_forward
    from engine.batched_forward import prefill_sessions

    alone = [HFTargetSession(model, p) for p in PROMPTS]
    for session in alone:
        session.prefill()
    together = [HFTargetSession(model, p) for p in PROMPTS]
    done = HFTargetSession(model, [7])  # a one-token prompt: only its root, nothing to prefill
    assert prefill_sessions(model, [*together, done]) == [len(p) - 1 for p in PROMPTS] + [0]
    assert all(_caches_equal(a, b) for a, b in zip(alone, together))
    assert torch.equal(together[1].forward_tree(_tree()), alone[1].forward_tree(_tree()))

    fresh = [HFTargetSession(model, p) for p in PROMPTS]
    real = batched_forward.forward_segments

    def breaks_after_writing(m, segments):
        real(m, segments)  # every cache got its rows
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batched_forward, "forward_segments", breaks_after_writing)
    with pytest.raises(RuntimeError, match="out of memory"):
        prefill_sessions(model, fresh)
    assert all(s.n_cached == 0 and s.cache.get_seq_length() == 0 for s in fresh)


def test_the_engine_prefills_a_bursts_queued_prompts_together(model, monkeypatch):
    """VerificationEngine.prefill_queued: the prompts queued by then, still open and before round 1,
    in forwards of up to prefill_batch_rows rows (0: one a forward); a failed forward of several is
    retried one prompt at a time; the Stats count every prefilled token once."""
    from target_service.backend import LocalBackend
    from target_service.engine import ModelInfo, VerificationEngine
    from target_service.store import SessionStore

    def engine(batch_rows: int) -> tuple[VerificationEngine, list[int]]:
        store = SessionStore(max_sessions=8, max_cached_tokens=1 << 12, idle_timeout_s=600)
        e = VerificationEngine(LocalBackend(model), ModelInfo("tiny", model.config.vocab_size, (), 256), store, 16,
                               prefill_batch_rows=batch_rows)
        sizes: list[int] = []  # sessions in each prefill_many call
        real = e.backend.prefill_many
        monkeypatch.setattr(e.backend, "prefill_many", lambda sessions: sizes.append(len(sessions)) or real(sessions))
        for i, prompt in enumerate(PROMPTS):
            e.open(open_request(f"s{i}", prompt).open)
            e.queue_prefill(f"s{i}")
        e.queue_prefill("gone")  # closed before its prefill ran: skipped
        return e, sizes

    wanted = sum(len(p) - 1 for p in PROMPTS)
    together, sizes = engine(4096)
    assert together.prefill_queued() == wanted == together.prefilled_tokens and sizes == [4]
    assert together.prefill_queued() == 0  # the others' calls find nothing queued
    expected = [HFTargetSession(model, p) for p in PROMPTS]
    for session in expected:
        session.prefill()
    assert all(_caches_equal(together.store.get(f"s{i}").target, expected[i]) for i in range(len(PROMPTS)))

    # a limit of the first two prompts' uncached rows: they share one forward, the last two another
    limited, sizes = engine(len(PROMPTS[0]) + len(PROMPTS[1]))
    assert limited.prefill_queued() == wanted and sizes == [2, 2]
    one_by_one, sizes = engine(0)
    assert one_by_one.prefill_queued() == wanted and sizes == []

    failing, sizes = engine(4096)
    monkeypatch.setattr(failing.backend, "prefill_many", lambda sessions: (_ for _ in ()).throw(RuntimeError("oom")))
    assert failing.prefill_queued() == wanted == failing.prefilled_tokens
    assert all(_caches_equal(failing.store.get(f"s{i}").target, expected[i]) for i in range(len(PROMPTS)))
