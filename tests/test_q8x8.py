"""The int8 x int8 kernel for drafts (engine.packed_linear.Q8x8Panels, dyspec_gemm_q8x8): bit for
bit the integer product of the rounded weights and the rows rounded as the kernel documents, on
its AVX2 path and (where the CPU has it) its AVX512-VNNI path, which give the same bits; partial
panels and k not a multiple of 4; batch and thread invariance; refusals."""
from __future__ import annotations

import pytest
import torch

from engine import native
from engine.packed_linear import PackedLinear, Q8x8Panels, int8_rows
from tests.thread_split import on_one_and_two_threads

SHAPES = [(1, 1), (16, 4), (37, 21), (70, 1030)]  # partial panels, k % 4 != 0, k past several blocks
ROW_COUNTS = (1, 2, 3, 4, 5, 8, 9, 17)  # one pass and several, on either ISA (4 / 8 rows a pass)


def _reference(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, step by step in float32 / exact integers: each row rounded to int8
    with scale absmax/127 (q = rint(x * (1/s))), the exact integer product, then (sum * column
    scale) * row scale + bias."""
    q, scale = int8_rows(weight)
    amax = x.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    xq = torch.round(x * (1.0 / s)[:, None]).clamp(-127, 127).to(torch.int64)
    sums = (xq @ q.to(torch.int64).t()).to(torch.int32).to(torch.float32)
    y = (sums * scale[None, :]) * s[:, None]
    return y + bias if bias is not None else y


@pytest.mark.parametrize("n,k", SHAPES)
def test_the_product_is_the_integer_product_of_the_rounded_weights_and_rows(n, k, int8_kernel_isa):
    g = torch.Generator().manual_seed(n * 1000 + k)
    weight, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(17, k, generator=g)
    panels = Q8x8Panels(weight)
    assert panels.isa == int8_kernel_isa
    for rows in ROW_COUNTS:
        assert torch.equal(panels.matmul(x[:rows], bias), _reference(weight, x[:rows], bias)), rows
    assert torch.equal(panels.matmul(x, None), _reference(weight, x, None))
    # and it is a faithful product: within the two roundings of the float32 one
    exact = x.double() @ weight.double().t()
    assert (panels.matmul(x, None).double() - exact).abs().max() < 0.05 * exact.abs().max()


def test_both_isas_give_the_same_bits(monkeypatch):
    """Exact integer sums, then the same float32 steps: the AVX2 path equals the VNNI path bit for
    bit (on a CPU without VNNI, the widest path is the AVX2 one)."""
    weight, bias, x = torch.randn(100, 300), torch.randn(100), torch.randn(11, 300)
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    widest = Q8x8Panels(weight)
    assert widest.isa == (2 if native.has_vnni() else 1)
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    narrow = Q8x8Panels(weight)
    assert narrow.isa == 1
    assert torch.equal(widest.matmul(x, bias), narrow.matmul(x, bias))


def test_rows_and_thread_split_change_no_bit(int8_kernel_isa):
    weight, x = torch.randn(600, 96), torch.randn(11, 96)  # 38 panels: split over two threads
    panels = Q8x8Panels(weight)
    alone = torch.cat([panels.matmul(x[i:i + 1], None) for i in range(11)])
    assert torch.equal(panels.matmul(x, None), alone)
    assert torch.equal(*on_one_and_two_threads(panels, x, None))


def test_zero_rows_and_all_zero_rows():
    weight = torch.zeros(40, 16)
    weight[3] = torch.arange(16.0)
    panels = Q8x8Panels(weight)
    assert panels.scale[0] == 1.0  # an all-zero weight row keeps scale 1
    assert torch.equal(panels.matmul(torch.zeros(2, 16), None), torch.zeros(2, 40))  # an all-zero x row too
    y = panels.matmul(torch.ones(2, 16), None)
    assert torch.equal(y[:, 0], torch.zeros(2)) and torch.allclose(y[:, 3], torch.full((2,), 120.0), rtol=1e-2)
    assert PackedLinear(weight, None, kernel=panels)(torch.zeros(0, 16)).shape == (0, 40)


def test_refusals(monkeypatch):
    with pytest.raises(ValueError, match="2-D float32 CPU weight"):
        Q8x8Panels(torch.randn(4, 4, dtype=torch.float64))

    def unavailable():
        raise native.KernelUnavailable("no compiler here")

    monkeypatch.setattr(native, "library", unavailable)
    with pytest.raises(native.KernelUnavailable, match="no compiler here"):
        Q8x8Panels(torch.randn(4, 4))
