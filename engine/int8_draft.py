"""int8 linear layers for a draft model on a CPU: few-row forwards on the project's int8-weight
kernel (engine.packed_linear.Q8Panels; Q8VnniPanels, int8 x int8, where the CPU has AVX512-VNNI),
larger ones on torch's dynamic quantisation (fbgemm).

Why two kernels. A draft mostly forwards one or two rows (a chain's next token, a tree's best
slots), where the weights' bytes are the cost: Q8Panels reads int8 weights and multiplies in
float32, and on a 2-core AVX2 EPYC (one thread) the Qwen2.5-Coder-0.5B draft's forward took 52 ms
at 1 row against fbgemm's 75 ms, and about the same at 2 rows. From 4 rows on, fbgemm's integer
dot products (activations quantised too) win: 85 against 100 ms at 4 rows, 173 against 330 ms at
16 (the prefill's 128 rows even more). Each layer keeps both forms of its weights (int8 twice, half
of the float32 model's bytes) and picks by the row count of the call.

A draft's numerics never change the output: the target verifies each child against the exact
distribution it was drawn from, which the draft sends. So the two kernels' different roundings (and a
row's logits depending on which kernel its call used) cost at most some acceptance, never exactness.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine import native
from engine.packed_linear import Q8Panels, Q8VnniPanels, _rows

log = logging.getLogger(__name__)

FEW_ROWS = 2  # calls with at most this many rows run on Q8Panels (measured crossover: 3-4 rows)
# Q8VnniPanels makes one pass over the weights for up to 4 rows (MR_V); fbgemm wins from 6 rows (Zen 5,
# one thread, 24 layers of the 0.5B MLP: 3.6/3.9/3.7/4.1 ms at 1-4 rows against fbgemm's 4.2-5.3, 7.4 against 5.8 at 6)
FEW_ROWS_VNNI = 4


class Int8DraftLinear(nn.Module):
    """A linear layer over int8 weights: Q8Panels for calls of <= FEW_ROWS rows, else `dynamic`
    (torch's dynamically quantised Linear of the same float32 weight)."""

    def __init__(self, panels: Q8Panels | Q8VnniPanels, dynamic: nn.Module, bias: torch.Tensor | None):
        super().__init__()
        self.panels, self.dynamic = panels, dynamic
        self.few_rows = FEW_ROWS_VNNI if isinstance(panels, Q8VnniPanels) else FEW_ROWS
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
def few_row_panels(model: nn.Module, names: list[str]) -> dict[str, tuple[Q8Panels | Q8VnniPanels, torch.Tensor | None]]:
    """The int8 panels (and bias) of the float32 nn.Linear layers `names`, made before torch's dynamic
    quantisation replaces them: Q8VnniPanels where the CPU has AVX512-VNNI, else Q8Panels. Raises
    native.KernelUnavailable where neither kernel can run."""
    native.library()
    panels = Q8VnniPanels if native.has_vnni() else Q8Panels
    out = {}
    for name in names:
        module = model.get_submodule(name)
        out[name] = (panels(module.weight), module.bias)
    return out


def attach(model: nn.Module, panels: dict[str, tuple[Q8Panels | Q8VnniPanels, torch.Tensor | None]]) -> int:
    """Wrap each dynamically quantised layer named in `panels` in an Int8DraftLinear; returns how many."""
    for name, (q8, bias) in panels.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8DraftLinear(q8, getattr(parent, child), bias))
    kernel = next(iter(panels.values()))[0] if panels else None
    log.info("int8 draft: %d linear layers run <= %d rows on %s (%.2f GiB), more on fbgemm", len(panels),
             FEW_ROWS_VNNI if isinstance(kernel, Q8VnniPanels) else FEW_ROWS, type(kernel).__name__,
             sum(q8.nbytes for q8, _ in panels.values()) / 2**30)
    return len(panels)


__all__ = ["FEW_ROWS", "FEW_ROWS_VNNI", "Int8DraftLinear", "attach", "few_row_panels"]
