"""Shared test defaults: one torch thread and a fixed seed per test, so results do not depend on order or load."""

import random

import pytest
import torch

# Two cores per machine and other processes beside the tests: extra intra-op threads only add contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_seed():
    # Reseed before every test so a test's random draws do not depend on which tests ran before it.
    random.seed(0)
    torch.manual_seed(0)
