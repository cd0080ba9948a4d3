"""The packed kernels split their panels over torch's intra-op threads: one product computed on one
thread and on two, to check the split changes no bit."""
from __future__ import annotations

import torch


def on_one_and_two_threads(kernel, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel.matmul(x, bias)` with torch on 1 thread, then on 2; the thread count is restored."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.matmul(x, bias)
        torch.set_num_threads(2)
        two = kernel.matmul(x, bias)
    finally:
        torch.set_num_threads(before)
    return one, two
