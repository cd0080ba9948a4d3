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
