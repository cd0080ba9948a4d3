"""Row-exact attention (engine.row_attention) and the bf16 kernel (Bf16Panels): a tree row equals
the same path decoded one token at a time bit for bit, in float32 and bf16, so greedy speculation
gives plain decoding's tokens even at near-ties; and the bf16 kernel against a float64 product."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dyspec.generate import generate
from dyspec.hf_runner import HFTargetSession
from dyspec.tree import TokenTree
from engine import native
from engine.packed_linear import Bf16Packed, Bf16Panels, pack_weight
from engine.prepack import prepack_linears
from engine import row_attention
from engine.row_attention import ATTENTION_NAME, row_exact_attention, use_row_exact_attention, visible_keys
from serving.models import enable_row_exact_attention
from tests.test_packed_linear import _onednn_packs_bf16
from tests.thread_split import on_one_and_two_threads
from tests.tiny_models import correlated_draft, greedy_reference, tiny_llama, tiny_qwen2

HAS_BF16 = native.has_bf16()
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """The C kernel (engine/kernels/row_attention.c), or the torch ops used where it cannot be built."""
    if request.param == "torch":
        monkeypatch.setattr(row_attention, "_kernel", lambda: None)
    else:
        assert row_attention._kernel() is not None  # every CPU these tests run on builds and runs it
    return request.param


class _Attention(torch.nn.Module):  # what the attention function reads off a model's attention module
    is_causal = True


def _qkv(dtype, rows=9, keys=30, heads=6, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, rows, dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    return q, k, v


def _tree_visibility(rows: int, keys: int, seed: int = 0) -> torch.Tensor:
    """A prefix every row sees, then each row sees a random subset of the other keys and itself."""
    g = torch.Generator().manual_seed(seed)
    visible = torch.zeros(rows, keys, dtype=torch.bool)
    prefix = keys - rows
    visible[:, :prefix] = True
    visible[:, prefix:] = torch.rand(rows, rows, generator=g) < 0.4
    visible[:, prefix:] &= torch.ones(rows, rows, dtype=torch.bool).tril()
    visible[torch.arange(rows), prefix + torch.arange(rows)] = True
    return visible


def test_visible_keys_reads_none_bool_and_additive_masks():
    causal = visible_keys(None, 1, 3, 5)
    assert causal[0].tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                  [True, True, True, True, True]]
    additive = torch.zeros(1, 1, 3, 5).masked_fill(~causal[:, None], torch.finfo(torch.float32).min)
    assert torch.equal(visible_keys(additive, 1, 3, 5), causal)
    assert torch.equal(visible_keys(causal[:, None], 1, 3, 5), causal)
    with pytest.raises(ValueError, match="per-head"):
        visible_keys(torch.zeros(1, 2, 3, 5), 1, 3, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_equals_its_visible_keys_attended_alone_and_matches_masked_sdpa(dtype, path):
    q, k, v = _qkv(dtype)
    visible = _tree_visibility(rows=9, keys=30)
    mask = torch.zeros(1, 1, 9, 30, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    out, _ = row_exact_attention(_Attention(), q, k, v, mask, scaling=0.25)
    assert out.shape == (1, 9, 6, 16)
    for row in range(9):
        cols = visible[row].nonzero().flatten()
        alone, _ = row_exact_attention(_Attention(), q[:, :, row:row + 1], k[:, :, cols], v[:, :, cols], None,
                                       scaling=0.25)
        assert torch.equal(out[0, row], alone[0, 0]), row  # bit for bit, as a one-row decode computes it
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible, scale=0.25,
                                               enable_gqa=True).transpose(1, 2)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), reference, rtol=tolerance, atol=tolerance)


def test_rows_that_see_no_key_are_zero_not_nan(path):
    q, k, v = _qkv(torch.float32, rows=2, keys=4)
    visible = torch.tensor([[[False] * 4, [True] * 4]])
    out, _ = row_exact_attention(_Attention(), q, k, v, visible[:, None])
    assert torch.equal(out[0, 0], torch.zeros(6, 16)) and torch.isfinite(out).all()


def _path_logits_decoded(model, tokens: list[int]) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        for token in tokens:
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
    return out.logits[0, -1].float()


def _exact_target(factory, dtype):
    model = factory(seed=4).to(dtype)
    summary = prepack_linears(model, "packed" if dtype == torch.float32 or HAS_BF16 else "auto")
    assert enable_row_exact_attention(model, "packed") and model.config._attn_implementation == ATTENTION_NAME
    return model, summary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_tree_rows_are_bit_identical_to_one_token_decode_rows(factory, dtype, path):
    """With batch-invariant linear layers (float32 panels; bf16 panels where the CPU has
    AVX512-BF16) and row-exact attention, every node's logits are the decode row's bits."""
    model, summary = _exact_target(factory, dtype)
    if dtype == torch.bfloat16 and not HAS_BF16:  # oneDNN's bf16 (or stock) is not batch-invariant: no claim
        assert all(not isinstance(m, Bf16Panels) for m in model.modules())
        with pytest.raises(native.KernelUnavailable, match="AVX512-BF16"):
            Bf16Panels(torch.zeros(4, 4, dtype=torch.bfloat16))
        return
    prompt = [5, 17, 2, 40, 33, 8, 19]
    tree = TokenTree.from_arrays([(7 * i + 3) % 60 for i in range(15)], [-1] + [(i - 1) // 2 for i in range(1, 15)])
    logits = HFTargetSession(model, prompt).forward_tree(tree)
    for node in range(len(tree)):
        path, walk = [], node
        while walk != -1:
            path.append(tree.tokens[walk])
            walk = tree.parents[walk]
        assert torch.equal(logits[node + 1], _path_logits_decoded(model, prompt + path[::-1])), node


@pytest.mark.parametrize("method", ["dyspec", "chain"])
def test_bf16_greedy_speculation_gives_plain_decodings_tokens(method):
    target, _ = _exact_target(tiny_llama, torch.bfloat16)
    draft = correlated_draft(tiny_llama(seed=4), noise=0.3).to(torch.bfloat16)
    prompt = [1, 9, 22, 4]
    reference = greedy_reference(target, prompt, 40, use_cache=True)
    plain = generate(target, draft, prompt, max_new_tokens=40, method="autoregressive").tokens
    assert plain == reference
    if HAS_BF16:  # bit-exact rows: the same tokens at every near-tie
        assert generate(target, draft, prompt, max_new_tokens=40, method=method, budget=16).tokens == reference


def test_the_kernel_and_the_torch_ops_agree_to_float32_rounding(monkeypatch):
    q, k, v = _qkv(torch.float32, rows=12, keys=200, heads=8, kv_heads=2, dim=36)  # a dim with a tail past 8 lanes
    visible = _tree_visibility(rows=12, keys=200, seed=3)
    native_out, _ = row_exact_attention(_Attention(), q, k, v, visible[None, None], scaling=0.3)
    monkeypatch.setattr(row_attention, "_kernel", lambda: None)
    torch_out, _ = row_exact_attention(_Attention(), q, k, v, visible[None, None], scaling=0.3)
    torch.testing.assert_close(native_out, torch_out, rtol=1e-5, atol=1e-6)


def test_the_stock_kernels_keep_the_models_attention():
    model = tiny_llama(seed=1)
    before = model.config._attn_implementation
    assert not enable_row_exact_attention(model, "stock") and model.config._attn_implementation == before
    assert use_row_exact_attention(model) == before


# ---- the bf16 kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (16, 8), (37, 21), (70, 1030)])
def test_bf16_kernel_matches_a_float64_product_and_is_batch_invariant(n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    weight, bias = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    if not HAS_BF16:
        with pytest.raises(native.KernelUnavailable, match="AVX512-BF16"):
            Bf16Panels(weight)
        if _onednn_packs_bf16():  # e.g. an AVX-512 CPU without AVX512-BF16: oneDNN's kernel
            assert isinstance(pack_weight(weight), Bf16Packed)
        else:  # an AVX2-only CPU: neither kernel, and prepack "auto" keeps stock F.linear
            with pytest.raises(native.KernelUnavailable, match="oneDNN cannot pack"):
                pack_weight(weight)
        return
    panels = Bf16Panels(weight)
    x = torch.randn(300, k, generator=g).bfloat16()
    alone = torch.cat([panels.matmul(x[i:i + 1], bias) for i in range(300)])
    for rows in (1, 2, 5, 17, 24, 25, 65, 300):
        got = panels.matmul(x[:rows], bias)
        assert got.dtype == torch.bfloat16 and torch.equal(got, alone[:rows]), rows
        exact = x[:rows].double() @ weight.double().t() + bias.double()
        # float32 sums (error ~ k * 2^-24 * sum |x w|) rounded once to bf16 (half a spacing: 2^-9 relative)
        scale = (x[:rows].abs().double() @ weight.abs().double().t()).max().item() + 1
        bound = 2**-8 * exact.abs() + 4 * k * 2**-24 * scale
        assert ((got.double() - exact).abs() <= bound).all(), rows


def test_bf16_kernel_thread_split_and_isa_hold_do_not_change_bits(monkeypatch):
    if not HAS_BF16:
        assert not native.has_bf16()
        return
    weight = torch.randn(1000, 96).bfloat16()  # 63 panels: split over two threads
    panels, x = Bf16Panels(weight), torch.randn(20, 96).bfloat16()
    assert torch.equal(*on_one_and_two_threads(panels, x, None))
    monkeypatch.setenv(native.ISA_ENV, "avx2")  # the benchmarks' way to hold our bf16 kernel off
    assert not native.has_bf16() and isinstance(pack_weight(weight), Bf16Packed)
