"""A cheap draft: `--dtype int8` (int8 weights) or `--dtype int4` (4-bit weights) is close to
the float32 draft, changes nothing in the output (greedy speculative output over the real services
equals plain target decoding), and is refused by the target, whose numerics are the user's model."""
from __future__ import annotations

import subprocess
import sys
import warnings

import grpc
import pytest
import torch

from dyspec import generate
from orchestrator.launch_local import resolve_draft_dtype
from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from engine.int4_draft import Int4DraftLinear, quantize_int4
from engine.int8_draft import Int8DraftLinear
from serving.models import ModelSource, load_causal_lm, quantize_int8
from target_service.model import load_target_model
from tests import service_models
from tests.service_process import REPO, ServiceProcess, child_env
from tests.tiny_models import sequential_logits, tiny_llama, tiny_qwen2

PROMPT = [3, 1, 4, 1, 5]
NEW_TOKENS = 24
IDS = [(7 * i + 3) % 64 for i in range(64)]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_int8_logits_are_close_to_float32(factory):
    reference = sequential_logits(factory(), IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quantisation's deprecation warnings are silenced, nothing else
        model = quantize_int8(factory())
    quantised = [name for name, m in model.named_modules() if type(m).__name__ == "Linear" and "dynamic" in type(m).__module__]
    assert "lm_head" in quantised and len(quantised) == 1 + 7 * model.config.num_hidden_layers
    assert next(model.parameters()).dtype == torch.float32, "embeddings stay float32 (the runners read it for masks)"
    logits = sequential_logits(model, IDS)
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree >= 0.75, agree
    assert (logits - reference).abs().mean() < 0.2 * reference.abs().mean()  # ~0.11 seen: hidden size 32, wide weights
    keep_head = quantize_int8(factory(), lm_head=False)
    assert isinstance(keep_head.lm_head, torch.nn.Linear) and keep_head.lm_head.weight.dtype == torch.float32


def test_model_source_int8_loads_a_quantised_draft_on_the_cpu_only():
    model = load_causal_lm(ModelSource(factory="tests.service_models:draft", dtype="int8", device="cpu"))
    assert isinstance(model.lm_head, Int8DraftLinear) and "dynamic" in type(model.lm_head.dynamic).__module__
    stock = load_causal_lm(ModelSource(factory="tests.service_models:draft", dtype="int8", device="cpu", kernels="stock"))
    assert "dynamic" in type(stock.lm_head).__module__  # fbgemm alone
    with pytest.raises(ValueError, match="CPU only"):
        load_causal_lm(ModelSource(factory="tests.service_models:draft", dtype="int8", device="cuda"))


def test_int8_draft_in_process_gives_the_target_greedy_output():
    target = service_models.target()
    draft = quantize_int8(service_models.draft())
    expected = generate(target, None, PROMPT, max_new_tokens=NEW_TOKENS, method="autoregressive").tokens
    for method in ("dyspec", "chain"):
        run = generate(target, draft, PROMPT, max_new_tokens=NEW_TOKENS, method=method, budget=8)
        assert run.tokens == expected, method
        assert sum(run.accepted_per_step) > 0, "the int8 draft never got a token accepted: the test lost its teeth"


def test_int4_draft_in_process_gives_the_target_greedy_output():
    target = service_models.grid_target()
    draft = quantize_int4(service_models.grid_target())
    assert isinstance(draft.lm_head, Int4DraftLinear)
    expected = generate(target, None, PROMPT, max_new_tokens=NEW_TOKENS, method="autoregressive").tokens
    for method in ("dyspec", "chain"):
        run = generate(target, draft, PROMPT, max_new_tokens=NEW_TOKENS, method=method, budget=8)
        assert run.tokens == expected, method
        # on the grid the draft differs from the target by its activations' int8 rounding alone
        assert sum(run.accepted_per_step) >= NEW_TOKENS // 4, (method, run.accepted_per_step)
    # and off the grid (random weights) the draft is still exact, though it rarely gets a token accepted
    off_grid = generate(service_models.target(), quantize_int4(service_models.draft()), PROMPT,
                        max_new_tokens=NEW_TOKENS, method="dyspec", budget=8)
    assert off_grid.tokens == generate(service_models.target(), None, PROMPT, max_new_tokens=NEW_TOKENS,
                                       method="autoregressive").tokens


def test_model_source_int4_loads_a_4bit_draft_on_the_cpu_only_and_a_target_refuses_it():
    model = load_causal_lm(ModelSource(factory="tests.service_models:draft", dtype="int4", device="cpu"))
    layers = [m for m in model.modules() if isinstance(m, Int4DraftLinear)]
    assert isinstance(model.lm_head, Int4DraftLinear) and len(layers) == 1 + 7 * model.config.num_hidden_layers
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert next(model.parameters()).dtype == torch.float32, "embeddings stay float32 (the runners read it for masks)"
    with pytest.raises(ValueError, match="CPU only"):
        load_causal_lm(ModelSource(factory="tests.service_models:draft", dtype="int4", device="cuda"))
    with pytest.raises(ValueError, match="draft workers only"):
        load_target_model(ModelSource(factory="tests.service_models:target", dtype="int4"), tp_size=1)


def test_target_refuses_int8_with_a_clear_error():
    done = subprocess.run([sys.executable, "-m", "target_service", "--port", "0", "--dtype", "int8", "--model-factory",
                           "tests.service_models:target"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "int8 is for draft workers only" in done.stderr, done.stderr
    assert "READY" not in done.stdout
    with pytest.raises(ValueError, match="draft workers only"):
        load_target_model(ModelSource(factory="tests.service_models:target", dtype="int8"), tp_size=1)


def test_launch_local_draft_dtype_rule():
    assert resolve_draft_dtype("auto", "float32", gpu=False, int4=False) == "int8"
    assert resolve_draft_dtype("auto", "float32", gpu=False, int4=True) == "int4"
    assert resolve_draft_dtype("auto", "float32", gpu=True, int4=True) == "float32"
    assert resolve_draft_dtype("auto", "bfloat16", gpu=True) == "bfloat16"
    assert resolve_draft_dtype("same", "auto", gpu=False) == "auto"
    assert resolve_draft_dtype("bfloat16", "float32", gpu=False) == "bfloat16"


@pytest.mark.e2e
@pytest.mark.parametrize("dtype,models", [("int8", ("target", "draft")), ("int4", ("grid_target", "grid_target"))])
def test_served_quantised_draft_gives_exactly_the_target_greedy_output(tmp_path, dtype, models):
    target = ServiceProcess.module("target_service", ["--dtype", "float32", "--model-factory",
                                                      f"tests.service_models:{models[0]}"], tmp_path / "target.log")
    draft = None
    try:
        address = target.wait_ready(120)
        draft = ServiceProcess.module("draft_service", ["--target-address", address, "--budget", "8", "--dtype", dtype,
                                                        "--model-factory", f"tests.service_models:{models[1]}"],
                                      tmp_path / "draft.log")
        worker = draft.wait_ready(120)
        assert "draft warm-up: 3 forwards in " in draft.log_path.read_text()
        expected = generate(getattr(service_models, models[0])(), None, PROMPT, max_new_tokens=NEW_TOKENS,
                            method="autoregressive").tokens
        accepted = 0
        with grpc.insecure_channel(worker) as channel:
            stub = generation_pb2_grpc.DraftWorkerStub(channel)
            for method in ("dyspec", "dyspec-layer", "chain"):
                request = generation_pb2.GenerateRequest(
                    token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=NEW_TOKENS, method=method,
                    sampling=sampling_pb2.SamplingParams(temperature=0, seed=0))
                tokens, summary = [], None
                for response in stub.Generate(generation_pb2.WorkerGenerateRequest(request=request), timeout=60):
                    if response.HasField("tokens"):
                        tokens += response.tokens.token_ids
                    else:
                        summary = response.summary
                assert tokens == expected, method
                accepted += summary.stats.accepted_tokens
        assert accepted > 0, f"no {dtype}-drafted token was ever accepted: the test lost its teeth"
        assert draft.stop() == 0 and target.stop() == 0
    finally:
        if draft is not None:
            draft.stop()
        target.stop()
