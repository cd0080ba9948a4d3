"""The packed linear layers (engine): the float32 kernel against a float64 reference, its batch
invariance (a row's product does not depend on the other rows, the thread count or the block it
lands in), bf16 packing bit-identical to stock, the model walker, and the packed target's exactness:
tree rows against one-token decode rows, greedy identity with the target alone on the same kernels."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from dyspec.generate import generate
from dyspec.hf_runner import HFTargetSession
from dyspec.tree import TokenTree
from engine import native
from engine.packed_linear import Bf16Packed, Fp32Panels, PackedLinear
from engine.prepack import prepack_linears
from serving.cpu import cpu_flags
from tests.thread_split import on_one_and_two_threads
from tests.tiny_models import correlated_draft, greedy_reference, tiny_llama, tiny_qwen2

ISAS = [name for name, code in native.ISAS.items() if code <= native.library().dyspec_best_isa()]
# Shapes and row counts that cross every edge of the kernel: a partial last panel (N % 16), an odd K,
# a K beyond one k block (256), rows beyond one AVX2 group (6), one AVX-512 group (24) and one row
# block (at most 128 rows, fewer where K is large: 300 rows run as 3 blocks).
SHAPES = [(1, 1), (16, 8), (37, 21), (70, 1030)]
ROW_COUNTS = [1, 2, 5, 6, 7, 17, 24, 25, 65, 300]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, request.param)
    return request.param


def _weights(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(n, generator=g)


def _onednn_packs_bf16() -> bool:
    """oneDNN's bf16 reorder needs AVX-512 BW + VL + DQ or AVX-NE-CONVERT (an AVX2-only EPYC has neither)."""
    flags = cpu_flags()
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags


@pytest.mark.parametrize("n,k", SHAPES)
def test_fp32_kernel_matches_a_float64_product(isa, n, k):
    weight, bias = _weights(n, k)
    panels = Fp32Panels(weight)
    x = torch.randn(ROW_COUNTS[-1], k, generator=torch.Generator().manual_seed(1))
    for rows in ROW_COUNTS:
        exact = x[:rows].double() @ weight.double().t() + bias.double()
        got = panels.matmul(x[:rows], bias)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        # fp32 accumulation over k terms: error ~ k * eps * sum |x w|, far below this bound
        scale = (x[:rows].abs().double() @ weight.abs().double().t()).max().item() + 1
        assert (got.double() - exact).abs().max().item() <= 4 * k * 2**-24 * scale, (rows, n, k)
        assert torch.equal(panels.matmul(x[:rows], None) + bias, got)  # the bias is added last, once


@pytest.mark.parametrize("n,k", SHAPES)
def test_each_row_is_bit_identical_to_the_row_multiplied_alone(isa, n, k):
    weight, bias = _weights(n, k, seed=2)
    panels = Fp32Panels(weight)
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([panels.matmul(x[i:i + 1], bias) for i in range(x.shape[0])])
    for rows in ROW_COUNTS:
        assert torch.equal(panels.matmul(x[:rows], bias), alone[:rows]), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_products_are_zeros_plus_bias(dtype):
    """AutoTP can leave a rank no input columns of a small lm_head; a batch can have no rows."""
    bias = torch.arange(5, dtype=dtype)
    kernel = (Fp32Panels if dtype == torch.float32 else Bf16Packed)(torch.zeros(5, 0, dtype=dtype))
    assert torch.equal(kernel.matmul(torch.zeros(3, 0, dtype=dtype), bias), bias.expand(3, 5))
    if dtype == torch.bfloat16 and not _onednn_packs_bf16():
        with pytest.raises(native.KernelUnavailable):  # only the empty product needs no oneDNN
            PackedLinear(torch.ones(5, 4, dtype=dtype), None)
        return
    layer = PackedLinear(torch.ones(5, 4, dtype=dtype), None)
    assert layer(torch.zeros(0, 4, dtype=dtype)).shape == (0, 5)


def test_the_thread_split_does_not_change_a_bit(isa):
    weight, bias = _weights(1000, 96, seed=4)  # 63 panels: split over two threads
    panels = Fp32Panels(weight)
    x = torch.randn(20, 96)
    assert torch.equal(*on_one_and_two_threads(panels, x, bias))


def test_both_isas_give_the_same_bits_where_the_cpu_has_both(monkeypatch):
    if len(ISAS) < 2:
        pytest.skip("this CPU has AVX2 only: one ISA path to compare")
    weight, bias = _weights(100, 300, seed=5)
    x = torch.randn(30, 300)
    results = []
    for name in ISAS:
        monkeypatch.setenv(native.ISA_ENV, name)
        results.append(Fp32Panels(weight).matmul(x, bias))
    assert torch.equal(results[0], results[1])  # one FMA chain per output, in k order, on either width


def test_bf16_packing_is_bit_identical_to_stock_linear_or_refused_where_onednn_cannot_pack():
    weight, bias = (t.bfloat16() for t in _weights(300, 200, seed=6))
    if not _onednn_packs_bf16():
        with pytest.raises(native.KernelUnavailable, match="bf16"):
            Bf16Packed(weight)
        model = tiny_qwen2(seed=3).bfloat16()
        summary = prepack_linears(model, "auto")  # auto keeps the stock forward and says why
        assert summary.packed == 0 and list(summary.kept) == ["without a packed kernel for torch.bfloat16 on this CPU"]
        with pytest.raises(native.KernelUnavailable):
            prepack_linears(tiny_qwen2(seed=3).bfloat16(), "packed")
        return
    packed = Bf16Packed(weight)
    for rows in (1, 3, 16, 40):
        x = torch.randn(rows, 200).bfloat16()
        assert torch.equal(packed.matmul(x, bias), F.linear(x, weight, bias)), rows


def test_unknown_isa_setting_is_refused_with_its_name(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "avx1024")
    with pytest.raises(native.KernelUnavailable, match="avx1024"):
        Fp32Panels(torch.zeros(4, 4))


def test_prepack_swaps_every_linear_and_keeps_the_logits(isa):
    model = tiny_qwen2(seed=3)  # q/k/v carry biases
    tokens = torch.tensor([[3, 14, 15, 9, 26, 5]])
    with torch.inference_mode():
        before = model(input_ids=tokens).logits
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    summary = prepack_linears(model, "packed")
    assert summary.packed == linears and summary.kept == {} and summary.isa == isa
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == linears
    with torch.inference_mode():
        after = model(input_ids=tokens).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_stock_changes_nothing_and_auto_falls_back_where_the_kernel_cannot_run(monkeypatch, caplog):
    model = tiny_llama(seed=1)
    assert prepack_linears(model, "stock").packed == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())
    monkeypatch.setenv(native.ISA_ENV, "avx1024")  # the float32 kernel reports itself unavailable
    with pytest.raises(native.KernelUnavailable):
        prepack_linears(model, "packed")
    with caplog.at_level(logging.WARNING, logger="engine.prepack"):
        summary = prepack_linears(model, "auto")
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert summary.packed == 0 and summary.kept == {"without the float32 kernel": linears}
    assert "keep stock kernels" in caplog.text and "avx1024" in caplog.text
    with pytest.raises(ValueError, match="kernels must be one of"):
        prepack_linears(model, "fast")


def _tree(size: int) -> TokenTree:
    return TokenTree.from_arrays([(7 * i + 3) % 60 for i in range(size)], [-1] + [(i - 1) // 2 for i in range(1, size)])


def test_tree_rows_equal_one_token_decode_rows_on_the_packed_target(isa):
    """Each tree node's logits against the same path decoded one token at a time over the cache:
    fp32 tolerance, and the same argmax."""
    model = tiny_llama(seed=4, num_layers=3)
    prepack_linears(model, "packed")
    prompt = [5, 17, 2, 40, 33, 8, 19]
    tree = _tree(15)
    logits = HFTargetSession(model, prompt).forward_tree(tree)  # row 0: the root, row i + 1: node i
    for node in range(len(tree)):
        path = []
        walk = node
        while walk != -1:
            path.append(tree.tokens[walk])
            walk = tree.parents[walk]
        decoded = greedy_free_logits(model, prompt + path[::-1])
        torch.testing.assert_close(logits[node + 1], decoded, rtol=1e-5, atol=1e-5)
        assert int(logits[node + 1].argmax()) == int(decoded.argmax())


def greedy_free_logits(model, tokens: list[int]) -> torch.Tensor:
    """The last position's logits, decoding `tokens` one at a time over a cache (1-row forwards)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        for token in tokens:
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
    return out.logits[0, -1].float()


@pytest.mark.parametrize("method", ["dyspec", "chain", "best-first"])
def test_greedy_output_of_the_packed_target_equals_its_plain_decoding(isa, method):
    target = tiny_llama(seed=5, num_layers=3)
    draft = correlated_draft(tiny_llama(seed=5, num_layers=3), noise=0.3)
    prepack_linears(target, "packed")
    prepack_linears(draft, "packed")
    prompt = [1, 9, 22, 4]
    reference = greedy_reference(target, prompt, 40)
    assert generate(target, draft, prompt, max_new_tokens=40, method=method, budget=16).tokens == reference


@pytest.mark.slow
def test_real_model_tree_rows_match_decode_rows_and_stock_greedy():
    """SmolLM2-135M (real weights, 30 layers, tied head): a 16-node tree's rows against one-token
    decoding on the packed model, and the packed model's greedy continuation against stock kernels'."""
    from model_store import load_model

    stock, tokenizer = load_model("smollm2-135m")
    packed, _ = load_model("smollm2-135m")
    assert prepack_linears(packed, "packed").packed == sum(type(m) is torch.nn.Linear for m in stock.modules())
    prompt = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n").input_ids
    greedy = greedy_reference(stock, prompt, 17, use_cache=True)
    assert greedy_reference(packed, prompt, 17, use_cache=True) == greedy
    chain = TokenTree.from_arrays(greedy[:16], [-1] + list(range(15)))  # the greedy path as a tree
    logits = HFTargetSession(packed, prompt).forward_tree(chain)  # row d + 1 follows greedy[:d + 1]
    assert int(logits[0].argmax()) == greedy[0]
    for depth in (0, 7, 15):
        decoded = greedy_free_logits(packed, prompt + greedy[:depth + 1])
        torch.testing.assert_close(logits[depth + 1], decoded, rtol=1e-4, atol=1e-4)
        assert int(logits[depth + 1].argmax()) == int(decoded.argmax()) == greedy[depth + 1]


def test_a_prebuilt_library_loads_where_no_compiler_is(tmp_path):
    # Container images build the kernel in their build stage and run without gcc (deploy/docker).
    import os
    import subprocess
    import sys

    library = tmp_path / "lib" / "small_gemm.so"
    done = subprocess.run([sys.executable, "-m", "engine.native", str(library)], capture_output=True, text=True)
    assert done.returncode == 0 and library.is_file(), done.stderr
    probe = ("from engine import native, packed_linear; import torch; "
             "w = torch.randn(20, 9); x = torch.randn(3, 9); "
             "p = packed_linear.Fp32Panels(w); "
             "torch.testing.assert_close(p.matmul(x, None), x @ w.T, rtol=1e-5, atol=1e-5); "
             "print(native.library_path())")
    bare = {"PATH": str(tmp_path / "empty"), "CC": "", "DYSPEC_KERNEL_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**bare, native.PREBUILT_ENV: str(library)})
    assert run.returncode == 0 and run.stdout.strip() == str(library), run.stderr
    assert not (tmp_path / "cache").exists()  # nothing was compiled
    without = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=bare)
    assert without.returncode != 0 and "no C compiler" in without.stderr
    missing = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={**bare, native.PREBUILT_ENV: str(tmp_path / "nope.so")})
    assert missing.returncode != 0 and f"{native.PREBUILT_ENV}=" in missing.stderr and "no such file" in missing.stderr


def test_the_installed_package_carries_the_kernel_source(tmp_path):
    # The images `pip install /src`, then build from the installed copy: the .c must be package data.
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "engine/kernels/small_gemm.c" in names and "engine/kernels/row_attention.c" in names
