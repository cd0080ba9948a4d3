"""4-bit linear layers for a draft model on a CPU (engine/kernels/q4x8.c), for every row count.

Why: a draft forward at a few rows streams its weights once, and their bytes are its cost (the
int8 x int8 kernel runs the Qwen2.5-Coder-0.5B draft's one-row forward at ~33 GB/s of weights).
Here a weight costs 0.625 bytes instead of one: 4 bits, plus a float16 scale and zero per 32 inputs.
The drafts this project ships come from GGUF Q4_K files, whose weights already lie on such a grid
(an unsigned 4-bit code times a scale, minus a minimum, per 32 inputs), so re-rounding them costs
almost nothing; any other draft loses what 4-bit rounding loses, which shows as acceptance, never
as output: the target verifies each child against the exact distribution the draft drew it from,
which the draft sends.

One kernel serves every row count (no second copy of the weights, unlike the int8 draft, which keeps
fbgemm's for its larger calls): passes of up to 8 rows (AVX512-VNNI) or 4 (AVX2) over the weights.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine import native
from engine.packed_linear import _rows, check_float32_cpu_matrix, panel_product

log = logging.getLogger(__name__)

GROUP = 32  # inputs per scale and zero (the kernel's GROUP; Q4_K's sub-block)
LEVELS = 15  # codes 0..15


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [out, groups*32] in 0..15, scale float16 [out, groups], zero float16 [out, groups]):
    each output row's groups of 32 inputs (the last padded with zeros) rounded asymmetrically,
    weight ~ q * scale + zero, with scale = (max - min) / 15 and zero = min, both rounded to float16
    before the codes are chosen (the kernel multiplies by the float16 values)."""
    weight = weight.detach().to(torch.float32)
    out, k = weight.shape
    groups = -(-k // GROUP)
    padded = torch.zeros(out, groups * GROUP, dtype=torch.float32)
    padded[:, :k] = weight
    grid = padded.view(out, groups, GROUP)
    if k % GROUP:  # the padding must not widen the last group's range
        last = grid[:, -1, : k % GROUP]
        grid[:, -1, k % GROUP:] = last[:, :1]
    low, high = grid.amin(dim=2), grid.amax(dim=2)
    zero = low.to(torch.float16)
    scale = ((high - zero.float()) / LEVELS).to(torch.float16)
    tiny = scale.float() <= 0  # constant groups (and scales below float16's range): any scale works
    scale = torch.where(tiny, torch.ones_like(scale), scale)
    q = torch.round((grid - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, LEVELS)
    q = q.to(torch.uint8).view(out, groups * GROUP)
    if k % GROUP:
        q[:, k:] = 0
    return q, scale, zero


def dequantise(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int) -> torch.Tensor:
    """The float32 weight [out, in] that int4_groups' codes stand for (tests, error measurements)."""
    out = q.shape[0]
    grid = q.view(out, -1, GROUP).float() * scale.float()[..., None] + zero.float()[..., None]
    return grid.view(out, -1)[:, :in_features]


class Q4x8Panels:
    """A float32 weight [out, in] rounded to 4 bits (int4_groups) and packed for dyspec_gemm_q4x8:
    each call rounds every row of x to int8 (its own scale), sums each group's products exactly in
    integers and the groups in float32 in a fixed order, on AVX512-VNNI where the CPU has it, else
    on AVX2, with the same bits either way; a row's result never depends on its batch-mates or the
    thread split. For drafts only: it changes the model's numerics, which a draft may do and a
    target may not."""

    PANEL = 16  # NR in the kernel
    GROUP_BYTES = 320  # GBYTES in the kernel

    def __init__(self, weight: torch.Tensor):
        check_float32_cpu_matrix(type(self).__name__, weight)
        self.isa = native.int8_isa()
        self.out_features, self.in_features = weight.shape
        self.n_panels = -(-self.out_features // self.PANEL)
        q, scale, zero = int4_groups(weight)
        self.groups = scale.shape[1] if self.in_features else 0
        self.panels = torch.empty(self.n_panels * self.groups * self.GROUP_BYTES, dtype=torch.uint8)
        native.library().dyspec_pack_q4x8(q.contiguous().data_ptr(), scale.contiguous().view(torch.int16).data_ptr(),
                                          zero.contiguous().view(torch.int16).data_ptr(), self.out_features,
                                          self.groups, self.panels.data_ptr())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [rows, in] float32 -> [rows, out] (+ bias)."""
        return panel_product("dyspec_gemm_q4x8", self.isa, self.panels, x, bias, self.in_features,
                             self.out_features, self.n_panels)

    @property
    def nbytes(self) -> int:
        return self.panels.numel()


class Int4DraftLinear(nn.Module):
    """nn.Linear's forward over Q4x8Panels (a draft's layer: lossy by design)."""

    def __init__(self, panels: Q4x8Panels, bias: torch.Tensor | None):
        super().__init__()
        self.panels = panels
        self.in_features, self.out_features = panels.in_features, panels.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.panels.matmul(_rows(x, self.in_features), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit groups of {GROUP}"


@torch.no_grad()
def quantize_int4(model: nn.Module, lm_head: bool = True) -> nn.Module:
    """Every float32 nn.Linear of `model` (the lm_head too unless `lm_head` is False) replaced by an
    Int4DraftLinear, in place; embeddings, norms and the KV cache stay float32. Raises
    native.KernelUnavailable where the kernel cannot run (no compiler, no AVX2)."""
    native.library()
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and (lm_head or name != "lm_head")]
    total = 0
    for name in names:
        module = model.get_submodule(name)
        layer = Int4DraftLinear(Q4x8Panels(module.weight.to(torch.float32)), module.bias)
        total += layer.panels.nbytes
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    log.info("int4 draft: %d linear layers on the 4-bit kernel (%s, %.2f GiB)", len(names),
             "AVX512-VNNI" if native.int8_isa() == 2 else "AVX2", total / 2**30)
    return model.eval()


__all__ = ["GROUP", "Int4DraftLinear", "Q4x8Panels", "dequantise", "int4_groups", "quantize_int4"]
