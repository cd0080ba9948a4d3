"""The int8-weight kernel for drafts (engine.packed_linear.Q8Panels, dyspec_gemm_q8): its product
against a float64 product of the rounded weights, rounding error of the weights themselves, batch and
thread invariance; and an int8 draft (engine.int8_draft: few-row calls on that kernel, larger ones on
fbgemm): which kernel each call uses, logits close to the float32 draft's on both, the fallback to
fbgemm alone, and such a draft in front of a float32 target giving exactly the target's greedy output."""
from __future__ import annotations

import pytest
import torch

from dyspec.generate import generate
from engine import int8_draft, native
from engine.int8_draft import Int8DraftLinear
from engine.packed_linear import PackedLinear, Q8Panels
from serving.models import quantize_int8
from tests.thread_split import on_one_and_two_threads
from tests.tiny_models import correlated_draft, greedy_reference, tiny_llama

# A partial last panel (N % 32), an odd K, K beyond one k block (256); rows beyond one group (3), one
# row block (fewer rows per block where K is large: 300 rows at K=1030 run in several blocks).
SHAPES = [(1, 1), (32, 8), (37, 21), (70, 1030)]
ROW_COUNTS = [1, 2, 3, 4, 7, 17, 33, 300]
ISAS = [name for name, code in native.ISAS.items() if code <= native.library().dyspec_best_isa()]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, request.param)
    return request.param


def _weights(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(n, generator=g)


def _rounded(panels: Q8Panels) -> torch.Tensor:
    """The int8 weights times their scales, [out, in], float64: what the kernel multiplies by."""
    q = panels.panels.transpose(1, 2).reshape(-1, panels.in_features)[:panels.out_features]
    return q.double() * panels.scale.double()[:, None]


@pytest.mark.parametrize("n,k", SHAPES)
def test_the_product_is_a_float32_product_of_the_rounded_weights(n, k, isa):
    weight, bias = _weights(n, k)
    panels = Q8Panels(weight)
    rounded = _rounded(panels)
    # per-row symmetric rounding: each weight within half a step of its own row's scale
    assert ((rounded - weight.double()).abs() <= panels.scale.double()[:, None] / 2 + 1e-12).all()
    x = torch.randn(ROW_COUNTS[-1], k, generator=torch.Generator().manual_seed(1))
    for rows in ROW_COUNTS:
        exact = x[:rows].double() @ rounded.t() + bias.double()
        got = panels.matmul(x[:rows], bias)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        bound = (x[:rows].abs().double() @ rounded.abs().t()).max().item() + 1
        assert (got.double() - exact).abs().max().item() <= 4 * (k + 2) * 2**-24 * bound, (rows, n, k)


@pytest.mark.parametrize("n,k", SHAPES)
def test_each_row_is_bit_identical_to_the_row_multiplied_alone(n, k, isa):
    weight, bias = _weights(n, k, seed=2)
    panels = Q8Panels(weight)
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([panels.matmul(x[i:i + 1], bias) for i in range(x.shape[0])])
    for rows in ROW_COUNTS:
        assert torch.equal(panels.matmul(x[:rows], bias), alone[:rows]), rows


def test_avx2_and_avx512_tiles_agree_to_float32_rounding(monkeypatch):
    """The AVX2 tile sums each output in one chain, the AVX-512 tile in four interleaved chains
    (to hide the multiply-add latency), so they agree to rounding, not bit for bit; on an AVX2-only
    CPU, asking for AVX-512 is refused with the CPU's widest named."""
    weight, bias = _weights(100, 300, seed=5)
    x = torch.randn(7, 300)
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    narrow = Q8Panels(weight).matmul(x, bias)
    monkeypatch.setenv(native.ISA_ENV, "avx512")
    if "avx512" not in ISAS:
        with pytest.raises(native.KernelUnavailable, match="widest is avx2"):
            Q8Panels(weight)
        return
    wide = Q8Panels(weight).matmul(x, bias)
    assert not torch.equal(wide, narrow)  # different summation orders: the four chains are in use
    torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=1e-4)


def test_the_thread_split_does_not_change_a_bit():
    weight, bias = _weights(1000, 96, seed=4)  # 32 panels of 32 columns: split over two threads
    panels = Q8Panels(weight)
    x = torch.randn(20, 96)
    assert torch.equal(*on_one_and_two_threads(panels, x, bias))


def test_zero_rows_and_an_all_zero_weight_row():
    weight = torch.zeros(40, 16)
    weight[3] = torch.arange(16.0)
    panels = Q8Panels(weight)
    assert torch.isfinite(panels.scale).all() and panels.scale[0] == 1.0  # an all-zero row keeps scale 1
    y = panels.matmul(torch.ones(2, 16), None)
    assert torch.equal(y[:, 0], torch.zeros(2)) and torch.allclose(y[:, 3], torch.full((2,), 120.0), rtol=1e-2)
    assert PackedLinear(weight, None, kernel=panels)(torch.zeros(0, 16)).shape == (0, 40)


def test_an_int8_draft_uses_the_weight_kernel_for_few_rows_and_fbgemm_for_more(monkeypatch):
    model = tiny_llama(seed=5, vocab_size=64, hidden_size=64, num_layers=2)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits.float()
        quantize_int8(model, kernels="packed")
        layers = [m for m in model.modules() if isinstance(m, Int8DraftLinear)]
        assert layers and not any(type(m) is torch.nn.Linear for m in model.modules())  # lm_head too
        calls = {"panels": 0, "dynamic": 0}
        for layer in layers:
            for part in ("panels", "dynamic"):
                inner = getattr(layer, part)
                original = inner.matmul if part == "panels" else inner.forward

                def counted(*args, _original=original, _part=part):
                    calls[_part] += 1
                    return _original(*args)

                monkeypatch.setattr(inner, "matmul" if part == "panels" else "forward", counted)
        many = model(input_ids=ids).logits.float()  # 12 rows: fbgemm
        assert calls == {"panels": 0, "dynamic": len(layers)}
        few_rows = layers[0].few_rows  # FEW_ROWS, or FEW_ROWS_VNNI on an AVX512-VNNI CPU
        assert few_rows == (int8_draft.FEW_ROWS_VNNI if native.has_vnni() else int8_draft.FEW_ROWS)
        few = torch.cat([model(input_ids=ids[:, :i + 1]).logits[:, -1:].float()  # no cache: 1..12 rows
                         for i in range(few_rows)], dim=1)
        assert calls["panels"] == len(layers) * few_rows
    # Few rows stay close (weights rounded; with VNNI each row too); fbgemm also rounds the
    # activations, per tensor.
    for got, want, tolerance in ((few, reference[:, :few_rows], 0.05), (many, reference, 0.25)):
        assert not torch.equal(got, want)  # the weights really were rounded
        assert (got - want).abs().max() < tolerance * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_int8_picks_its_kernels_by_the_kernels_setting(monkeypatch):
    def fresh():
        return tiny_llama(seed=1, vocab_size=64, hidden_size=32, num_layers=1)

    assert isinstance(quantize_int8(fresh(), kernels="auto").lm_head, Int8DraftLinear)
    assert type(quantize_int8(fresh(), kernels="stock").lm_head).__module__.startswith("torch.ao.nn.quantized")

    def unavailable():
        raise native.KernelUnavailable("no compiler here")

    monkeypatch.setattr(native, "library", unavailable)
    assert type(quantize_int8(fresh(), kernels="auto").lm_head).__module__.startswith("torch.ao.nn.quantized")
    with pytest.raises(native.KernelUnavailable):
        quantize_int8(fresh(), kernels="packed")


@pytest.mark.parametrize("method", ["dyspec", "chain"])
def test_an_int8_weight_draft_gives_the_float32_targets_greedy_output(method):
    target = tiny_llama(seed=11, vocab_size=64, hidden_size=64, num_layers=2)
    draft = quantize_int8(correlated_draft(target, noise=0.2, seed=12), kernels="packed")
    prompt = [3, 17, 42, 5, 9]
    result = generate(target, draft, prompt, max_new_tokens=24, method=method, budget=8, temperature=0.0)
    assert result.tokens == greedy_reference(target, prompt, 24)
    assert result.tokens_per_step > 1.0  # the draft still agrees with the target
