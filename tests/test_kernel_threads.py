"""engine.kernel_threads: the packed kernels' thread count apart from torch's."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from engine import kernel_threads
from engine.packed_linear import Fp32Panels
from engine.prepack import only_our_kernels, prepack_linears
from tests.tiny_models import tiny_llama


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    kernel_threads.give_back_to_torch()
    torch.set_num_threads(before)


def test_using_overrides_this_thread_only_and_nests(torch_threads):
    torch.set_num_threads(1)
    assert kernel_threads.kernel_threads() == 1
    seen_elsewhere = []
    with kernel_threads.using(3):
        assert kernel_threads.kernel_threads() == 3 and torch.get_num_threads() == 1
        other = threading.Thread(target=lambda: seen_elsewhere.append(kernel_threads.kernel_threads()))
        other.start()
        other.join()
        with kernel_threads.using(2):
            assert kernel_threads.kernel_threads() == 2
        assert kernel_threads.kernel_threads() == 3
        with pytest.raises(RuntimeError):
            with kernel_threads.using(5):
                raise RuntimeError("a forward failed")
        assert kernel_threads.kernel_threads() == 3
    assert kernel_threads.kernel_threads() == 1 and seen_elsewhere == [1]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with kernel_threads.using(0):
            pass


def test_take_from_torch_moves_the_count_and_gives_it_back(torch_threads):
    torch.set_num_threads(1)
    assert kernel_threads.take_from_torch() == 1 and torch.get_num_threads() == 1  # one thread: nothing to move
    torch.set_num_threads(2)
    assert kernel_threads.take_from_torch() == 2
    assert torch.get_num_threads() == 1 and kernel_threads.kernel_threads() == 2
    with kernel_threads.using(1):  # a forward may still ask for fewer
        assert kernel_threads.kernel_threads() == 1
    kernel_threads.give_back_to_torch()
    assert torch.get_num_threads() == 2 and kernel_threads.kernel_threads() == 2


def test_the_split_follows_the_kernel_count_and_changes_no_bit(torch_threads, monkeypatch):
    import engine.packed_linear as packed_linear

    torch.set_num_threads(1)
    panels = Fp32Panels(torch.randn(512, 96, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(4))
    spans = []
    real = packed_linear._panel_spans
    monkeypatch.setattr(packed_linear, "_panel_spans", lambda n, threads: spans.append(real(n, threads)) or spans[-1])
    one = panels.matmul(x, None)
    with kernel_threads.using(2):
        two = panels.matmul(x, None)
    assert [len(s) for s in spans] == [1, 2]  # 32 panels: two spans of 16
    assert torch.equal(one, two)


def test_which_models_hand_their_threads_to_the_kernels():
    stock = tiny_llama(seed=1, hidden_size=64, vocab_size=128)
    assert not only_our_kernels(stock)
    packed = tiny_llama(seed=1, hidden_size=64, vocab_size=128)
    prepack_linears(packed, "packed")
    assert only_our_kernels(packed)
    packed.extra = nn.Linear(4, 4)  # one layer left on torch's kernels
    assert not only_our_kernels(packed)


def test_quantised_drafts_hand_theirs_over_unless_fbgemm_takes_larger_calls():
    from engine.int4_draft import quantize_int4
    from serving.models import quantize_int8

    int4 = quantize_int4(tiny_llama(seed=2, hidden_size=64, vocab_size=128))
    assert only_our_kernels(int4)
    int8 = quantize_int8(tiny_llama(seed=2, hidden_size=64, vocab_size=128), kernels="packed")
    assert not only_our_kernels(int8)  # calls of many rows run on fbgemm
