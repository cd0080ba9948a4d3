"""Linear layers over weights packed once at load time, for the target's few-row forwards on a CPU.

- float32: engine/kernels/small_gemm.c. A tree of up to 16 rows costs 1.2-1.5x one row on an
  AVX-512 CPU where stock F.linear costs 2.7x (benchmarks/reports/verify_cost), and every output is
  computed in the same order for any row count: a tree row equals the one-token decode row bit for
  bit (the module docstring of the kernel says why).
- bfloat16 where the CPU has AVX512-BF16 (`Bf16Panels`): the same kernel family over bf16 pairs
  (vdpbf16ps), float32 sums rounded to bf16 once; batch-invariant like the float32 kernel, so bf16
  tree rows equal bf16 one-token decode rows bit for bit, and at the memory bound up to ~12 rows.
- bfloat16 elsewhere (`Bf16Packed`): oneDNN's prepacked matmul (the kernels inductor's freezing pass
  uses), bit-identical to stock F.linear, 5-20% faster on AMX, but not batch-invariant: a row's
  rounding depends on how many rows share the call.
- int8 weights (drafts only, `Q8x8Panels`): float32 weights rounded once to int8 per output channel,
  multiplied by int8-rounded rows in integers (engine/kernels/q8x8.c: AVX512-VNNI or AVX2); a
  few-row forward reads a quarter of float32's bytes and converts nothing to float32 per weight.

Numerics stay the model's: float32 products are float32 fused multiply-adds (a different summation
order than MKL's, so results differ from stock kernels in the last bits only); bf16 products are
bf16 x bf16 summed in float32 and rounded to bf16, as stock does, in another order. Inference only: the packed weights take no gradient.

DeepSpeed AutoTP's sharded layers are packed too, keeping their collectives: a column-parallel
shard multiplies its slice; a row-parallel shard multiplies, all-reduces, then adds the bias.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from engine import native
from engine.kernel_threads import kernel_threads

PANEL = 16  # output columns per packed panel (NR in the kernel)


class Fp32Panels:
    """A float32 weight [out, in] repacked into 16-column panels for dyspec_gemm."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"Fp32Panels takes a 2-D float32 CPU weight, got {weight.dtype} {tuple(weight.shape)} "
                             f"on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.n_panels = -(-self.out_features // PANEL)
        self.isa = native.isa()
        weight = weight.detach().contiguous()
        self.panels = torch.empty(self.n_panels * PANEL * self.in_features, dtype=torch.float32)
        native.library().dyspec_pack(weight.data_ptr(), self.panels.data_ptr(), self.out_features, self.in_features)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [rows, in] float32 -> [rows, out] (+ bias), split over engine.kernel_threads' count."""
        return panel_product("dyspec_gemm", self.isa, self.panels, x, bias, self.in_features, self.out_features,
                             self.n_panels)

    @property
    def nbytes(self) -> int:
        return self.panels.numel() * 4


class Q8x8Panels:
    """A float32 weight [out, in] rounded to int8 per output row (int8_rows), packed for
    dyspec_gemm_q8x8: each call also rounds every row of x to int8 (its own scale) and multiplies in
    integers, on AVX512-VNNI where the CPU has it, else on AVX2, with the same bits either way. The
    sums are exact, so a row's result never depends on its batch-mates, the thread split or the ISA.
    For drafts only: it changes the model's numerics, which a draft may do and a target may not.

    Why integers: the float32-product int8 kernel this replaced converted every weight to float32
    in registers and was bound by that, not by memory. 24 layers of the Qwen2.5-Coder-0.5B MLP at
    one row, one thread, Zen 5 EPYC: 2.9 ms (VNNI) and 2.7 ms (AVX2 code) against 4.4 / 4.6 ms for
    the float32-product kernel and 4.0 for fbgemm; ahead of fbgemm up to 8 rows with VNNI, 3 on
    AVX2 (benchmarks/reports/draft_dtype)."""

    PANEL = 16  # NR_V in the kernel

    def __init__(self, weight: torch.Tensor):
        check_float32_cpu_matrix(type(self).__name__, weight)
        self.isa = native.int8_isa()
        self.out_features, self.in_features = weight.shape
        self.n_panels = -(-self.out_features // self.PANEL)
        q, scale = int8_rows(weight)
        self.scale = torch.zeros(self.n_panels * self.PANEL, dtype=torch.float32)  # the kernel reads whole panels
        self.scale[:self.out_features] = scale
        blocks = -(-self.in_features // 4)
        self.panels = torch.empty(self.n_panels * self.PANEL * blocks * 4, dtype=torch.int8)
        self.colsum = torch.empty(self.n_panels * self.PANEL, dtype=torch.int32)
        native.library().dyspec_pack_q8x8(q.contiguous().data_ptr(), self.out_features, self.in_features,
                                          self.panels.data_ptr(), self.colsum.data_ptr())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [rows, in] float32 -> [rows, out] (+ bias)."""
        rows = x.shape[0]
        if rows == 0 or self.in_features == 0:
            return _empty_product(rows, self.out_features, torch.float32, bias)
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        x = x.contiguous()
        args = (self.isa, x.data_ptr(), self.in_features, rows, self.panels.data_ptr(), self.scale.data_ptr(),
                self.colsum.data_ptr(), self.in_features, self.out_features,
                bias.data_ptr() if bias is not None else None, y.data_ptr(), self.out_features)
        _run_kernel("dyspec_gemm_q8x8", args, self.n_panels, f" (isa {self.isa})")
        return y

    @property
    def nbytes(self) -> int:
        return self.panels.numel() + (self.scale.numel() + self.colsum.numel()) * 4


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale float32 [out]): each output row rounded symmetrically to int8 with
    scale absmax / 127 (1 for an all-zero row), weight ~ q * scale."""
    weight = weight.detach()
    absmax = weight.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).contiguous()
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def check_float32_cpu_matrix(taker: str, weight: torch.Tensor) -> None:
    """ValueError unless `weight` is a 2-D float32 CPU tensor (what the draft kernels pack)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"{taker} takes a 2-D float32 CPU weight, got {weight.dtype} {tuple(weight.shape)} "
                         f"on {weight.device}")


def panel_product(kernel: str, isa: int, panels: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                  in_features: int, out_features: int, n_panels: int) -> torch.Tensor:
    """x [rows, in] float32 -> [rows, out] (+ bias) through the library's `kernel`(isa, x, ldx, rows,
    panels, k, n, bias, y, ldy, p0, p1), its panels split over engine.kernel_threads' count."""
    rows = x.shape[0]
    if rows == 0 or in_features == 0:
        return _empty_product(rows, out_features, torch.float32, bias)
    y = torch.empty(rows, out_features, dtype=torch.float32)
    x = x.contiguous()
    args = (isa, x.data_ptr(), in_features, rows, panels.data_ptr(), in_features, out_features,
            bias.data_ptr() if bias is not None else None, y.data_ptr(), out_features)
    _run_kernel(kernel, args, n_panels, f" (isa {isa})")
    return y


def _empty_product(rows: int, out_features: int, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """A product with no rows (an empty batch) or no input columns (AutoTP can leave a rank no
    columns of a small lm_head): zeros, plus the bias."""
    y = torch.zeros(rows, out_features, dtype=dtype)
    return y + bias if bias is not None else y


def _run_kernel(name: str, args: tuple, n_panels: int, detail: str = "") -> None:
    """The library's `name`(*args, p0, p1) over all panels; KernelUnavailable if any span failed."""
    codes = _run_spans(getattr(native.library(), name), args, n_panels)
    if any(codes):
        raise native.KernelUnavailable(f"{name} returned {codes}{detail}")


def _run_spans(call, args: tuple, n_panels: int) -> list[int]:
    """`call(*args, p0, p1)` over the panels, split over engine.kernel_threads' count (torch's
    intra-op count unless a forward or the process set another); the return codes."""
    spans = _panel_spans(n_panels, kernel_threads())
    if len(spans) == 1:
        return [call(*args, 0, n_panels)]
    # ctypes drops the GIL for the call, so the spans run in parallel
    pending = [_pool(len(spans) - 1).submit(call, *args, p0, p1) for p0, p1 in spans[1:]]
    return [call(*args, *spans[0])] + [future.result() for future in pending]


def _panel_spans(n_panels: int, threads: int) -> list[tuple[int, int]]:
    """Contiguous panel ranges, one per thread, at least 8 panels each (a thread hand-off costs
    tens of microseconds: not worth it for a small matrix)."""
    parts = max(1, min(threads, n_panels // 8))
    bounds = [n_panels * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dyspec-gemm")
    return _POOLS[workers]


class Bf16Panels:
    """A bfloat16 weight [out, in] repacked into 16-column panels of k-pairs for dyspec_gemm_bf16
    (AVX512-BF16). An odd `in` gets a zero column (and each x a zero feature): pairs need even k."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"Bf16Panels takes a 2-D bfloat16 CPU weight, got {weight.dtype} {tuple(weight.shape)} "
                             f"on {weight.device}")
        if not native.has_bf16():
            raise native.KernelUnavailable("this CPU has no AVX512-BF16 for the bf16 kernel")
        self.out_features, self.in_features = weight.shape
        self.k = self.in_features + self.in_features % 2
        self.n_panels = -(-self.out_features // PANEL)
        weight = weight.detach()
        if self.k != self.in_features:
            weight = torch.nn.functional.pad(weight, (0, 1))
        weight = weight.contiguous()
        self.panels = torch.empty(self.n_panels * PANEL * self.k, dtype=torch.bfloat16)
        native.library().dyspec_pack_bf16(weight.data_ptr(), self.panels.data_ptr(), self.out_features, self.k)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [rows, in] bfloat16 -> [rows, out] bfloat16 (+ bias, added to the float32 sum before rounding)."""
        rows = x.shape[0]
        if rows == 0 or self.in_features == 0:
            return _empty_product(rows, self.out_features, torch.bfloat16, bias)
        if self.k != self.in_features:
            x = torch.nn.functional.pad(x, (0, 1))
        x = x.to(torch.bfloat16).contiguous()
        bias32 = bias.float().contiguous() if bias is not None else None
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        args = (x.data_ptr(), self.k, rows, self.panels.data_ptr(), self.k, self.out_features,
                bias32.data_ptr() if bias32 is not None else None, y.data_ptr(), self.out_features)
        _run_kernel("dyspec_gemm_bf16", args, self.n_panels)
        return y.to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.panels.numel() * 2


class Bf16Packed:
    """A bfloat16 weight in oneDNN's blocked layout (torch.ops.mkldnn), as inductor's freezing packs it."""

    ROWS_HINT = 16  # the row count the layout is tuned for; any count runs, at the same numerics

    def __init__(self, weight: torch.Tensor):
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"Bf16Packed takes a 2-D bfloat16 CPU weight, got {weight.dtype} on {weight.device}")
        if not torch.backends.mkldnn.is_available():
            raise native.KernelUnavailable("this torch build has no oneDNN")
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        if weight.numel() == 0:  # oneDNN has no primitive for an empty product (an AutoTP shard with no input columns)
            self.packed = weight
            return
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.ROWS_HINT)
        except RuntimeError as error:  # e.g. an AVX2-only CPU: oneDNN packs bf16 only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT
            raise native.KernelUnavailable(f"oneDNN cannot pack bf16 weights on this CPU: {error}") from error

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 0 or self.in_features == 0:
            return _empty_product(x.shape[0], self.out_features, torch.bfloat16, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


def pack_weight(weight: torch.Tensor):
    """The packed form of a 2-D CPU weight: Fp32Panels; for bf16, Bf16Panels where the CPU has
    AVX512-BF16, else Bf16Packed; ValueError for other dtypes."""
    if weight.dtype == torch.float32:
        return Fp32Panels(weight)
    if weight.dtype == torch.bfloat16:
        return Bf16Panels(weight) if native.has_bf16() else Bf16Packed(weight)
    raise ValueError(f"no packed kernel for {weight.dtype} weights")


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected {in_features} input features, got {x.shape[-1]}")
    return x.reshape(x.shape[:-1].numel(), in_features)  # not -1: an AutoTP shard may have 0 input features


class PackedLinear(nn.Module):
    """nn.Linear's forward over a packed weight (a plain layer, or an AutoTP column-parallel shard:
    its forward needs no collective)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel=None):
        """`kernel`: a packed form of `weight` made by the caller (Q8x8Panels for a draft); default pack_weight."""
        super().__init__()
        self.kernel = kernel if kernel is not None else pack_weight(weight)
        self.in_features, self.out_features = self.kernel.in_features, self.kernel.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.matmul(_rows(x, self.in_features), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={type(self.kernel).__name__}"


class PackedRowParallel(nn.Module):
    """AutoTP's LinearAllreduce (and its lm_head variant, which first cuts its slice of the input):
    this rank's partial product, all-reduced over the tensor-parallel group, then the bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mp_group, input_slice: tuple[int, int] | None):
        super().__init__()
        self.kernel = pack_weight(weight)
        self.in_features, self.out_features = self.kernel.in_features, self.kernel.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.mp_group, self.input_slice = mp_group, input_slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_slice is not None:
            start, stop = self.input_slice
            x = x[..., start:stop]
        y = self.kernel.matmul(_rows(x, self.in_features), None).view(*x.shape[:-1], self.out_features)
        from deepspeed import comm

        if self.mp_group is not None and comm.get_world_size(group=self.mp_group) > 1:
            comm.inference_all_reduce(y, group=self.mp_group)
        if self.bias is not None:
            y += self.bias
        return y


__all__ = ["Bf16Packed", "Bf16Panels", "Fp32Panels", "PackedLinear", "PackedRowParallel", "Q8x8Panels", "int8_rows", "pack_weight", "PANEL"]
