"""Shared test defaults: one torch thread and a fixed seed per test, so results do not depend on order or load."""

import random

import pytest
import torch

from engine import native

# Two cores per machine and other processes beside the tests: extra intra-op threads only add contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_seed():
    # Reseed before every test so a test's random draws do not depend on which tests ran before it.
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=["avx2", "widest"])
def int8_kernel_isa(request, monkeypatch):
    """The path of the int8-activation draft kernels (q8x8, q4x8) under test: AVX2 always; the widest
    is AVX512-VNNI where the CPU has it. Returns the path the kernels should then report."""
    if request.param == "avx2":
        monkeypatch.setenv(native.ISA_ENV, "avx2")
    else:
        monkeypatch.delenv(native.ISA_ENV, raising=False)
    return 2 if native.has_vnni() else 1
