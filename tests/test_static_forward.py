"""Static KV caches and the bucketed static forward (engine.static_cache, engine.graphed_forward,
LeanCausalLM.forward_static): the code a CUDA graph captures, run eagerly on the CPU. Trees and
distributions as on a DynamicCache; a whole speculative generation with the draft on static caches
still gives the target's greedy output; the cache's DynamicCache surface (views, truncation,
copies, overflow); the runner's buckets and fallbacks. Capture and replay need a GPU."""
from __future__ import annotations

import copy

import pytest
import torch

from dyspec.generate import generate
from dyspec.hf_runner import HFDraftSession
from engine.graphed_forward import BUCKETS, StaticForwardRunner
from engine.lean_decoder import LeanCausalLM
from engine.static_cache import StaticKVCache
from tests.draft_trees import assert_same_trees
from tests.tiny_models import correlated_draft, greedy_reference, tiny_llama, tiny_qwen2
from tests.worker_responses import streamed_tokens

PROMPTS = [[1, 9, 22, 4], [7, 3, 3, 51, 12, 8, 30], [2]]


def _static(model, tokens: int = 96) -> LeanCausalLM:
    lean = LeanCausalLM(copy.deepcopy(model))
    lean.use_static_cache(tokens, StaticForwardRunner(lean))
    return lean


@pytest.mark.parametrize("make", [lambda: tiny_llama(seed=3), lambda: tiny_qwen2(seed=4, num_kv_heads=1)])
def test_trees_on_static_caches_match_the_dynamic_ones(make):
    model = make()
    dynamic, static = LeanCausalLM(copy.deepcopy(model)), _static(model)
    sessions = assert_same_trees(static, dynamic, PROMPTS)
    assert all(isinstance(session.cache, StaticKVCache) for session in sessions)
    assert static.static_runner.eager_forwards == 0 and static.static_runner.static_forwards > 0  # all bucketed


@pytest.mark.parametrize("overlap", [False, True])
def test_a_draft_on_static_caches_keeps_the_targets_greedy_output(overlap):
    """Commits, checkpoints and restores (overlapped rounds) rewrite the static buffers in place."""
    target = tiny_llama(seed=11, vocab_size=64, hidden_size=64, num_layers=2)
    draft = _static(correlated_draft(target, noise=0.2, seed=12), tokens=128)
    prompt = [3, 17, 42, 5, 9]
    result = generate(target, draft, prompt, max_new_tokens=40, method="dyspec", budget=8, temperature=0.0,
                      overlap=overlap)
    assert result.tokens == greedy_reference(target, prompt, 40)
    assert result.tokens_per_step > 1.0 and draft.static_runner.static_forwards > 10


def test_the_cache_behaves_like_a_dynamic_cache_where_the_sessions_use_it():
    cache = StaticKVCache(num_layers=2, kv_heads=2, head_dim=4, max_tokens=10, dtype=torch.float32, device="cpu")
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 2, 0, 4) and cache.get_seq_length() == 0
    first = torch.randn(1, 2, 6, 4)
    keys, _ = cache.update(first, first + 1, 0)
    assert torch.equal(keys, first) and keys.data_ptr() == layer.key_buffer.data_ptr()
    layer.keys[:, :, 1:3] = layer.keys[:, :, [4, 5]]  # an in-place write through a view: the buffer
    assert torch.equal(layer.key_buffer[0, :, 1:3], first[0, :, 4:6])
    layer.keys = layer.keys[:, :, :3]  # truncation: a prefix view only moves the length
    assert layer.key_length == 3
    tail = torch.randn(1, 2, 2, 4)
    layer.keys = torch.cat([layer.keys[:, :, :1], tail], dim=2)  # a restore: copied in
    assert layer.key_length == 3 and torch.equal(layer.keys[:, :, 1:], tail)
    layer.values = layer.values[:, :, 2:4]  # a view at an offset of the same buffer: copied safely
    assert torch.equal(layer.values, (first + 1)[:, :, 2:4])
    cache.crop(-1)
    assert layer.key_length == 2
    with pytest.raises(ValueError, match="holds 10 tokens"):
        cache.update(torch.zeros(1, 2, 9, 4), torch.zeros(1, 2, 9, 4), 0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        StaticKVCache(1, 1, 4, 0, torch.float32, "cpu")


def test_the_runner_pads_to_buckets_and_falls_back_past_them():
    model = _static(tiny_llama(seed=5), tokens=256)
    runner = model.static_runner
    session = HFDraftSession(model, [1 + t % 60 for t in range(80)])  # 80 prompt rows: past the largest bucket
    from dyspec.tree import ROOT, TokenTree

    tree = TokenTree()
    session.logits(tree, [ROOT])
    assert runner.eager_forwards == 1 and session.cache.get_seq_length() == 80
    nodes = [tree.add(ROOT, t, 0.0) for t in (5, 6, 7)]  # 3 rows: the 4-row bucket
    session.logits(tree, nodes)
    assert runner.eager_forwards == 1 and runner.static_forwards == 1 and session.cache.get_seq_length() == 83
    ids, positions, slots, mask = runner.padded(session.cache, torch.tensor([1, 2, 3]), torch.tensor([83, 84, 84]),
                                                torch.zeros(1, 1, 3, 86), 4)
    assert slots.tolist() == [83, 84, 85, 86] and ids.tolist() == [1, 2, 3, 0]
    assert (mask[:3, :86] == 0).all() and (mask[:3, 86:] < -1e30).all() and mask[3, 0] == 0 and (mask[3, 1:] < -1e30).all()
    assert BUCKETS[-1] == 64
    with pytest.raises(ValueError, match="CUDA graphs need the model on a GPU"):
        StaticForwardRunner(model, graphs=True)


def _worker_generate(draft_model, prompt, max_new_tokens):
    """A real target and draft worker on loopback (in-process), one greedy request: (tokens, finish reason)
    or the gRPC error."""
    import grpc

    from draft_service.config import DraftConfig
    from draft_service.server import DraftServer
    from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc
    from target_service.config import TargetConfig
    from target_service.server import TargetServer
    from tests import service_models
    from tests.background_loop import BackgroundLoop

    loop = BackgroundLoop()

    async def start():
        target = TargetServer(TargetConfig(port=0), service_models.target(), "tiny")
        await target.start()
        draft = DraftServer(DraftConfig(target_address=target.address, port=0), draft_model)
        await draft.start()
        return target, draft

    target, draft = loop.run(start())
    try:
        with grpc.insecure_channel(draft.address) as channel:
            request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt),
                                                     max_new_tokens=max_new_tokens, method="dyspec", budget=6)
            try:
                responses = list(generation_pb2_grpc.DraftWorkerStub(channel).Generate(
                    generation_pb2.WorkerGenerateRequest(request=request), timeout=60))
            except grpc.RpcError as error:
                return error
    finally:
        loop.run(draft.stop(grace_s=1))
        loop.run(target.stop(grace_s=1))
        loop.close()
    tokens = streamed_tokens(responses)
    return tokens, responses[-1].summary.finish_reason


def test_a_worker_on_static_caches_stops_at_their_end_and_refuses_prompts_past_it():
    """--static-kv-tokens: the draft's cache size is a context limit (FINISH_REASON_CONTEXT, the
    target's greedy tokens up to there); a prompt that does not fit is INVALID_ARGUMENT, named."""
    import grpc

    from proto.dyspec.v1 import generation_pb2
    from serving.models import ModelSource, load_draft_lm
    from tests import service_models

    draft = load_draft_lm(ModelSource(factory="tests.service_models:draft", device="cpu"), static_kv_tokens=24)
    assert isinstance(draft, LeanCausalLM) and draft.static_tokens == 24
    prompt = [2, 7, 1, 8]
    tokens, finish = _worker_generate(draft, prompt, max_new_tokens=40)
    assert finish == generation_pb2.FINISH_REASON_CONTEXT and len(prompt) + len(tokens) <= 24
    assert tokens == greedy_reference(service_models.target(), prompt, len(tokens))
    assert draft.static_runner.static_forwards > 0
    error = _worker_generate(draft, list(range(1, 31)), max_new_tokens=4)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "--static-kv-tokens" in error.details()
    with pytest.raises(ValueError, match="needs the lean draft forward"):
        load_draft_lm(ModelSource(factory="tests.service_models:draft", device="cpu"), forward="transformers", static_kv_tokens=8)
