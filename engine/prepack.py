"""Swap a loaded model's linear layers for packed ones (engine.packed_linear), in place.

Called once after loading (and after DeepSpeed AutoTP has sharded the model), before warm-up.
Layers it cannot pack (on a GPU, in a dtype without a packed kernel, an AutoTP class it does not
know) keep their stock forward; the returned summary says how many of each.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from engine import KERNELS, native
from engine.packed_linear import PackedLinear, PackedRowParallel

log = logging.getLogger(__name__)


@dataclass
class PackSummary:
    packed: int = 0
    packed_bytes: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # reason -> layers left on stock kernels
    isa: str = ""

    def describe(self) -> str:
        kept = ", ".join(f"{n} {reason}" for reason, n in sorted(self.kept.items())) or "none"
        isa = f", float32 kernel {self.isa}" if self.isa else ""
        return f"packed {self.packed} linear layers ({self.packed_bytes / 2**30:.2f} GiB{isa}); stock: {kept}"


def _autotp_layer(module: nn.Module):
    """(kind, mp_group, input_slice) for DeepSpeed AutoTP's sharded linear layers, else None."""
    if not type(module).__module__.startswith("deepspeed.module_inject"):
        return None
    name = type(module).__name__
    if getattr(type(module), "tp_overlap_comm", False) or getattr(module, "defer_collectives_to_compiler", False):
        return None  # those forwards interleave their collectives with the matmul: keep DeepSpeed's
    if name == "LinearLayer":
        return "column", None, None
    if name == "LinearAllreduce":
        return "row", module.mp_group, None
    if name == "LmHeadLinearAllreduce":
        sizes, rank = module._partition_sizes, module.tp_index
        start = sum(sizes[:rank])
        return "row", module.mp_group, (start, start + sizes[rank])
    return None


def _replacement(module: nn.Module) -> nn.Module | str:
    """The packed layer for `module`, or why it keeps its own forward."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return "without a 2-D weight"
    if weight.device.type != "cpu":
        return f"on {weight.device.type}"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"in {weight.dtype}"
    if type(module) is nn.Linear:
        return PackedLinear(weight, module.bias)
    tp = _autotp_layer(module)
    if tp is None:
        return f"of class {type(module).__name__}"
    kind, group, input_slice = tp
    if kind == "column":
        return PackedLinear(weight, module.bias)
    return PackedRowParallel(weight, module.bias, group, input_slice)


def _is_linear_like(module: nn.Module) -> bool:
    return type(module) is nn.Linear or _autotp_layer(module) is not None or (
        type(module).__module__.startswith("deepspeed.module_inject") and hasattr(module, "weight"))


def _on_our_kernel(module: nn.Module) -> bool:
    """A layer over our panels: packed here (float32, bf16 on AVX512-BF16), or a quantised draft's int8 / int4."""
    return hasattr(getattr(module, "kernel", getattr(module, "panels", None)), "n_panels")


def only_our_kernels(model: nn.Module) -> bool:
    """Whether every linear layer of `model` runs on our kernels only: none left on stock ones, no
    oneDNN-packed bf16 layer, no int8 draft layer that hands larger calls to fbgemm (all of which
    thread on torch's intra-op count)."""
    ours = False
    for module in model.modules():
        if _on_our_kernel(module):
            ours = True
            if hasattr(module, "dynamic"):  # Int8DraftLinear: calls of many rows go to fbgemm
                return False
        elif _is_linear_like(module) or isinstance(module, PackedLinear) or "quantized" in type(module).__module__:
            return False
    return ours


@torch.no_grad()
def prepack_linears(model: nn.Module, kernels: str = "auto") -> PackSummary:
    """Pack every packable linear layer of `model` in place. kernels: "packed" raises where the float32
    kernel cannot be built or run (native.KernelUnavailable); "auto" then keeps stock kernels and
    logs why; "stock" changes nothing."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    summary = PackSummary()
    if kernels == "stock":
        return summary
    try:
        summary.isa = native.isa_name(native.isa())
    except native.KernelUnavailable as error:
        if kernels == "packed":
            raise
        log.warning("float32 layers keep stock kernels: %s", error)
    targets = [(name, module) for name, module in model.named_modules() if _is_linear_like(module)]
    for name, module in targets:
        if not summary.isa and module.weight.dtype == torch.float32:
            summary.kept["without the float32 kernel"] = summary.kept.get("without the float32 kernel", 0) + 1
            continue
        try:
            replacement = _replacement(module)
        except native.KernelUnavailable as error:  # bf16 where oneDNN cannot pack it
            if kernels == "packed":
                raise
            replacement = f"without a packed kernel for {module.weight.dtype} on this CPU"
            log.debug("%s keeps its stock forward: %s", name, error)
        if isinstance(replacement, str):
            summary.kept[replacement] = summary.kept.get(replacement, 0) + 1
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        summary.packed += 1
        summary.packed_bytes += replacement.kernel.nbytes
    log.info("%s", summary.describe())
    return summary
