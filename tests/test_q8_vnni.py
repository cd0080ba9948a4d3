"""The int8 x int8 kernel for drafts on AVX512-VNNI (engine.packed_linear.Q8VnniPanels,
dyspec_gemm_q8v): bit for bit the integer product of the rounded weights and the rows rounded as
the kernel documents (so batch and thread invariance need no separate argument, but are checked),
partial panels and k not a multiple of 4, and the int8 draft choosing it where the CPU has VNNI.
On a CPU without VNNI (or with DYSPEC_GEMM_ISA=avx2) the kernel is refused and the draft keeps
Q8Panels."""
from __future__ import annotations

import pytest
import torch

from engine import int8_draft, native
from engine.packed_linear import Q8Panels, Q8VnniPanels, int8_rows
from tests.thread_split import on_one_and_two_threads
from tests.tiny_models import tiny_llama

SHAPES = [(1, 1), (16, 4), (37, 21), (70, 1030)]  # partial panels, k % 4 != 0, k past several blocks
VNNI = native.has_vnni()


def _panels(weight: torch.Tensor) -> Q8VnniPanels | None:
    """The packed weight; on a CPU without VNNI, None after checking that it is refused (no skips:
    such a machine checks the refusal instead)."""
    if VNNI:
        return Q8VnniPanels(weight)
    with pytest.raises(native.KernelUnavailable, match="no AVX512-VNNI"):
        Q8VnniPanels(weight)
    return None


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
def test_the_product_is_the_integer_product_of_the_rounded_weights_and_rows(n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    weight, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(9, k, generator=g)
    panels = _panels(weight)
    if panels is None:
        return
    for rows in (1, 2, 3, 4, 5, 9):
        assert torch.equal(panels.matmul(x[:rows], bias), _reference(weight, x[:rows], bias)), rows
    assert torch.equal(panels.matmul(x, None), _reference(weight, x, None))
    # and it is a faithful product: within the two roundings of the float32 one
    exact = x.double() @ weight.double().t()
    assert (panels.matmul(x, None).double() - exact).abs().max() < 0.05 * exact.abs().max()


def test_rows_and_thread_split_change_no_bit():
    weight, x = torch.randn(600, 96), torch.randn(7, 96)  # 38 panels: split over two threads
    panels = _panels(weight)
    if panels is None:
        return
    alone = torch.cat([panels.matmul(x[i:i + 1], None) for i in range(7)])
    assert torch.equal(panels.matmul(x, None), alone)
    assert torch.equal(*on_one_and_two_threads(panels, x, None))
    assert panels.matmul(torch.zeros(0, 96), None).shape == (0, 600)
    assert torch.equal(panels.matmul(torch.zeros(2, 96), None), torch.zeros(2, 600))  # an all-zero row: scale 1


def test_the_int8_draft_uses_it_where_the_cpu_has_vnni(monkeypatch):
    model = tiny_llama(seed=2, vocab_size=64, hidden_size=32, num_layers=1)
    chosen = int8_draft.few_row_panels(model, ["lm_head"])["lm_head"][0]
    assert type(chosen) is (Q8VnniPanels if VNNI else Q8Panels)
    monkeypatch.setenv(native.ISA_ENV, "avx2")  # as on an AVX2-only machine
    assert type(int8_draft.few_row_panels(model, ["lm_head"])["lm_head"][0]) is Q8Panels


def test_without_vnni_the_kernel_is_refused(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    with pytest.raises(native.KernelUnavailable, match="no AVX512-VNNI"):
        Q8VnniPanels(torch.randn(4, 4))
    with pytest.raises(ValueError, match="2-D float32 CPU weight"):
        Q8VnniPanels(torch.randn(4, 4, dtype=torch.float64))
