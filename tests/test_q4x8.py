"""The 4-bit draft kernel (engine.int4_draft.Q4x8Panels, dyspec_gemm_q4x8): the rounding of the
weights (int4_groups), the product against a float64 reference of the same rounded operands, the
same bits on its AVX2 and (where the CPU has it) AVX512-VNNI paths, batch and thread invariance,
partial panels and groups, the drop-in layer, and refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import native
from engine.int4_draft import GROUP, Int4DraftLinear, Q4x8Panels, dequantise, int4_groups, quantize_int4
from tests.thread_split import on_one_and_two_threads

SHAPES = [(1, 1), (16, 32), (37, 21), (70, 1030)]  # partial panels, k % 32 != 0, several groups
ROW_COUNTS = (1, 2, 3, 4, 5, 8, 9, 17)  # one pass and several, on either ISA (4 / 8 rows a pass)


def _reference(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's product in float64 from the same rounded operands: the codes, float16 scales and
    zeros of int4_groups; each row of x rounded to int8 with scale absmax/127."""
    q, scale, zero = int4_groups(weight)
    k = weight.shape[1]
    amax = x.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    xq = torch.zeros(x.shape[0], q.shape[1], dtype=torch.float64)
    xq[:, :k] = torch.round(x * (1.0 / s)[:, None]).clamp(-127, 127).double()
    w = q.double().view(q.shape[0], -1, GROUP) * scale.double()[..., None] + zero.double()[..., None]
    y = (xq @ w.view(q.shape[0], -1).t()) * s.double()[:, None]
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("n,k", SHAPES)
def test_the_product_is_that_of_the_rounded_weights_and_rows(n, k, int8_kernel_isa):
    g = torch.Generator().manual_seed(n * 1000 + k)
    weight, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(17, k, generator=g)
    panels = Q4x8Panels(weight)
    assert panels.isa == int8_kernel_isa
    for rows in ROW_COUNTS:
        ref = _reference(weight, x[:rows], bias)
        got = panels.matmul(x[:rows], bias).double()
        assert (got - ref).abs().max() <= 1e-5 * (1 + ref.abs().max()), rows
    # and a faithful product of the float32 operands, within the two roundings (4-bit weights dominate)
    exact = x.double() @ weight.double().t()
    assert (panels.matmul(x, None).double() - exact).abs().max() < 0.25 * exact.abs().max()


def test_both_isas_give_the_same_bits(monkeypatch):
    """Exact integer sums per group, then the same float32 steps in the same order: the AVX2 path
    equals the VNNI path bit for bit (on a CPU without VNNI, the widest path is the AVX2 one)."""
    weight, bias, x = torch.randn(100, 300), torch.randn(100), torch.randn(11, 300)
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    widest = Q4x8Panels(weight)
    assert widest.isa == (2 if native.has_vnni() else 1)
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    narrow = Q4x8Panels(weight)
    assert narrow.isa == 1
    assert torch.equal(widest.matmul(x, bias), narrow.matmul(x, bias))


def test_rows_and_thread_split_change_no_bit(int8_kernel_isa):
    weight, x = torch.randn(600, 96), torch.randn(11, 96)  # 38 panels: split over two threads
    panels = Q4x8Panels(weight)
    alone = torch.cat([panels.matmul(x[i:i + 1], None) for i in range(11)])
    assert torch.equal(panels.matmul(x, None), alone)
    assert torch.equal(*on_one_and_two_threads(panels, x, None))


def test_rounding_recovers_a_weight_already_on_a_4bit_grid():
    """GGUF Q4_K weights (the Qwen drafts' source) are code * scale + min per 32 inputs: a group
    whose codes span 0..15 comes back exactly; any weight within half a step of its group's grid."""
    g = torch.Generator().manual_seed(7)
    scale = (torch.rand(8, 4, generator=g) * 0.01 + 0.001).half().float()
    low = (torch.randn(8, 4, generator=g) * 0.05).half().float()
    codes = torch.randint(0, 16, (8, 4, GROUP), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans the whole range
    weight = (codes * scale[..., None] + low[..., None]).view(8, 4 * GROUP)
    q, s, z = int4_groups(weight)
    assert torch.equal(q.view(8, 4, GROUP).long(), codes)
    assert torch.allclose(dequantise(q, s, z, weight.shape[1]), weight, rtol=0, atol=1e-6)
    other = torch.randn(5, 70, generator=g)
    q, s, z = int4_groups(other)
    assert q.max() <= 15 and torch.equal(q[:, 70:], torch.zeros(5, q.shape[1] - 70, dtype=torch.uint8))
    step = s.float().repeat_interleave(GROUP, dim=1)[:, :70]
    assert ((dequantise(q, s, z, 70) - other).abs() <= step * 0.5 + 1e-3 * other.abs().max()).all()


def test_constant_and_zero_weights():
    weight = torch.zeros(40, 48)
    weight[3] = 0.5  # a constant row: scale 1, codes 0, zero 0.5
    panels = Q4x8Panels(weight)
    assert torch.equal(panels.matmul(torch.zeros(2, 48), None), torch.zeros(2, 40))  # an all-zero x row
    y = panels.matmul(torch.ones(2, 48), None)
    assert torch.equal(y[:, 0], torch.zeros(2)) and torch.allclose(y[:, 3], torch.full((2,), 24.0))
    assert Int4DraftLinear(panels, None)(torch.zeros(0, 48)).shape == (0, 40)


def test_quantize_int4_replaces_every_linear_layer_and_keeps_shapes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10, bias=False))
    x = torch.randn(3, 5, 64)
    want = model(x)
    quantize_int4(model)
    assert isinstance(model[0], Int4DraftLinear) and isinstance(model[2], Int4DraftLinear)
    got = model(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.2 * want.abs().max()  # a draft's rounding, not another function


def test_refusals(monkeypatch):
    with pytest.raises(ValueError, match="2-D float32 CPU weight"):
        Q4x8Panels(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 4 input features"):
        Int4DraftLinear(Q4x8Panels(torch.randn(3, 4)), None)(torch.randn(2, 5))

    def unavailable():
        raise native.KernelUnavailable("no compiler here")

    monkeypatch.setattr(native, "library", unavailable)
    with pytest.raises(native.KernelUnavailable, match="no compiler here"):
        Q4x8Panels(torch.randn(4, 4))
