"""Warm-up before READY (serving.warmup): each service runs a few real forwards through its serving
path before it serves -- a prefill, a multi-row tree over the KV cache and a 1-token decode -- and
logs it; under tensor parallelism the followers replay the very same forwards; `--no-warmup` skips it."""
from __future__ import annotations

import grpc
import pytest
import torch
from transformers import DynamicCache

from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from serving.warmup import WARMUP_SESSION_ID, warm_up_draft, warm_up_target
from target_service import tp
from target_service.backend import LocalBackend
from tests import service_models
from tests.service_process import ServiceProcess
from tests.worker_responses import streamed_tokens


class ForwardSpy:
    """Records each forward of `model`: query rows, cached tokens before it, and the mask/position inputs."""

    def __init__(self, model):
        self.calls: list[dict] = []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        cache = kwargs.get("cache")
        mask = kwargs.get("attention_mask")
        self.calls.append({"rows": kwargs["input_ids"].shape[1], "cache": cache,
                           "cached_before": cache.get_seq_length() if cache is not None else None,
                           "float_mask": mask is not None and mask.is_floating_point(),
                           "positions": kwargs.get("position_ids") is not None,
                           "ids": kwargs["input_ids"].tolist()})


def check_serving_like(calls: list[dict], rows: list[int]) -> None:
    assert [c["rows"] for c in calls] == rows
    assert all(isinstance(c["cache"], DynamicCache) for c in calls), "every warm-up forward runs with a KV cache"
    assert all(c["float_mask"] and c["positions"] for c in calls), "additive float mask and position ids, as serving"
    assert calls[0]["cached_before"] == 0 and all(c["cached_before"] > 0 for c in calls[1:]), \
        "a prefill, then forwards over the grown cache"
    assert len({id(c["cache"]) for c in calls}) == 1, "one session's cache throughout"


def test_target_warm_up_prefills_then_decodes_one_token_then_a_tree_over_the_cache():
    model = service_models.target()
    spy = ForwardSpy(model)
    result = warm_up_target(LocalBackend(model), vocab_size=64, max_context_tokens=256, max_tree_nodes=64)
    # prompt 8 + tree 6; the bonus token alone; the bonus token + tree 6
    check_serving_like(spy.calls, [14, 1, 7])
    assert result.forwards == 3 and result.rows == (14, 1, 7) and result.seconds > 0
    assert result.describe().startswith("warm-up: 3 forwards in ")


def test_target_warm_up_fits_small_limits():
    model = service_models.target()
    spy = ForwardSpy(model)
    warm_up_target(LocalBackend(model), vocab_size=64, max_context_tokens=32, max_tree_nodes=2)
    assert [c["rows"] for c in spy.calls] == [10, 1, 3]
    assert max(c["cached_before"] + c["rows"] for c in spy.calls) <= 32
    spy.calls.clear()
    warm_up_target(LocalBackend(model), vocab_size=64, max_context_tokens=4, max_tree_nodes=8)
    assert [c["rows"] for c in spy.calls] == [1, 1, 1]  # too small a context for a tree: plain tokens still warm up


def test_draft_warm_up_runs_the_draft_session_prefill_tree_rows_and_next_root():
    model = service_models.draft()
    spy = ForwardSpy(model)
    result = warm_up_draft(model)
    check_serving_like(spy.calls, [8, 6, 1])  # prompt ending in the root; 6 tree nodes; next round's root
    assert result.forwards == 3


def test_int8_draft_warms_up():
    from serving.models import quantize_int8

    model = quantize_int8(service_models.draft())
    spy = ForwardSpy(model)
    warm_up_draft(model)
    assert [c["rows"] for c in spy.calls] == [8, 6, 1]


def test_tensor_parallel_followers_replay_exactly_the_warm_up_forwards(monkeypatch):
    """Rank 0 warms up through the MirroredBackend: every command it broadcasts, fed to a follower,
    makes the follower run the same forwards in the same order (so AutoTP's all-reduces pair up),
    and the warm-up session is released on every rank."""
    sent = []
    monkeypatch.setattr(tp, "_broadcast", lambda command=None: sent.append(command))
    leader_model = service_models.target()
    leader = ForwardSpy(leader_model)
    warm_up_target(tp.MirroredBackend(leader_model), vocab_size=64, max_context_tokens=256, max_tree_nodes=64)
    assert isinstance(sent[0], tp.Open) and sent[0].session_id == WARMUP_SESSION_ID
    assert sent[-1] == tp.Release((WARMUP_SESSION_ID,))
    assert [type(c).__name__ for c in sent] == ["Open"] + ["Forward", "Commit"] * 3 + ["Release"]

    replay = iter([*sent, tp.Stop()])
    monkeypatch.setattr(tp, "_broadcast", lambda command=None: next(replay))
    follower_model = service_models.target()
    follower = ForwardSpy(follower_model)
    tp.follow(follower_model)
    strip = [{k: v for k, v in c.items() if k != "cache"} for c in leader.calls]
    assert [{k: v for k, v in c.items() if k != "cache"} for c in follower.calls] == strip


def _generate(address: str) -> list[int]:
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[3, 1, 4, 1, 5]), max_new_tokens=8,
                                             method="dyspec", sampling=sampling_pb2.SamplingParams(seed=0))
    with grpc.insecure_channel(address) as channel:
        responses = generation_pb2_grpc.DraftWorkerStub(channel).Generate(
            generation_pb2.WorkerGenerateRequest(request=request), timeout=60)
        return streamed_tokens(responses)


@pytest.mark.e2e
def test_services_log_the_warm_up_before_ready_and_no_warmup_skips_it(tmp_path):
    target = ServiceProcess.module("target_service", ["--model-factory", "tests.service_models:target"],
                                   tmp_path / "target.log")
    draft = None
    try:
        address = target.wait_ready(120)
        logged = target.log_path.read_text()  # the log line is flushed before READY is printed
        assert "target warm-up: 3 forwards in " in logged, logged
        draft = ServiceProcess.module("draft_service", ["--target-address", address, "--no-warmup", "--budget", "4",
                                                        "--model-factory", "tests.service_models:draft"],
                                      tmp_path / "draft.log")
        worker = draft.wait_ready(120)
        logged = draft.log_path.read_text()
        assert "warm-up: skipped (--no-warmup)" in logged and "forwards in" not in logged, logged
        assert len(_generate(worker)) == 8
        assert draft.stop() == 0 and target.stop() == 0
    finally:
        if draft is not None:
            draft.stop()
        target.stop()
