"""int8 linear layers for a draft model on a CPU: few-row forwards on the project's int8 x int8
kernel (engine.packed_linear.Q8x8Panels), larger ones on torch's dynamic quantisation (fbgemm).

Why two kernels. A draft mostly forwards one to a few rows (a chain's next token, a tree's best
slots), where the weights' bytes are the cost: Q8x8Panels streams the int8 weights through integer
dot products with one pass for up to 8 rows (AVX512-VNNI) or 4 (AVX2). Measured over 24 layers of the
Qwen2.5-Coder-0.5B MLP, one thread, Zen 5 EPYC (ms at 1 / 2 / 4 / 8 rows): VNNI 2.9 / 3.1 / 3.4 /
5.1, AVX2 code 2.7 / 3.1 / 5.0 / 10.1, fbgemm 4.0 / 4.3 / 4.9 / 6.1; from 12 rows on (the prefill, wide
tree layers) fbgemm is ahead. Each layer keeps both forms of its weights (int8 twice, half of the
float32 model's bytes) and picks by the row count of the call.

A draft's numerics never change the output: the target verifies each child against the exact
distribution it was drawn from, which the draft sends. So the two kernels' different roundings (and a
row's logits depending on which kernel its call used) cost at most some acceptance, never exactness.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine import native
from engine.packed_linear import Q8x8Panels, _rows

log = logging.getLogger(__name__)

# Calls with at most this many rows run on Q8x8Panels, by its instruction set (the crossovers above)
FEW_ROWS = {2: 8, 1: 3}  # AVX512-VNNI, AVX2


class Int8DraftLinear(nn.Module):
    """A linear layer over int8 weights: Q8x8Panels for calls of <= FEW_ROWS[its isa] rows, else `dynamic`
    (torch's dynamically quantised Linear of the same float32 weight)."""

    def __init__(self, panels: Q8x8Panels, dynamic: nn.Module, bias: torch.Tensor | None):
        super().__init__()
        self.panels, self.dynamic = panels, dynamic
        self.few_rows = FEW_ROWS[panels.isa]
        self.in_features, self.out_features = panels.in_features, panels.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() > self.few_rows:
            return self.dynamic(x)
        y = self.panels.matmul(_rows(x, self.in_features), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, few rows <= {self.few_rows} on {type(self.panels).__name__}"


@torch.no_grad()
def few_row_panels(model: nn.Module, names: list[str]) -> dict[str, tuple[Q8x8Panels, torch.Tensor | None]]:
    """The int8 panels (and bias) of the float32 nn.Linear layers `names`, made before torch's dynamic
    quantisation replaces them. Raises native.KernelUnavailable where the kernel cannot run."""
    native.library()
    out = {}
    for name in names:
        module = model.get_submodule(name)
        out[name] = (Q8x8Panels(module.weight), module.bias)
    return out


def attach(model: nn.Module, panels: dict[str, tuple[Q8x8Panels, torch.Tensor | None]]) -> int:
    """Wrap each dynamically quantised layer named in `panels` in an Int8DraftLinear; returns how many."""
    for name, (q8, bias) in panels.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8DraftLinear(q8, getattr(parent, child), bias))
    isa = next(iter(panels.values()))[0].isa if panels else 1
    log.info("int8 draft: %d linear layers run <= %d rows on the int8 x int8 kernel (%s, %.2f GiB), more on fbgemm",
             len(panels), FEW_ROWS[isa], "AVX512-VNNI" if isa == 2 else "AVX2",
             sum(q8.nbytes for q8, _ in panels.values()) / 2**30)
    return len(panels)


__all__ = ["FEW_ROWS", "Int8DraftLinear", "attach", "few_row_panels"]
