"""An int8 draft (engine.int8_draft: few-row calls on the int8 x int8 kernel, larger ones on
fbgemm): which kernel each call uses, logits close to the float32 draft's on both, the fallback to
fbgemm alone, and such a draft in front of a float32 target giving exactly the target's greedy
output. The kernel itself: tests/test_q8x8.py."""
from __future__ import annotations

import pytest
import torch

from dyspec.generate import generate
from engine import int8_draft, native
from engine.int8_draft import Int8DraftLinear
from serving.models import quantize_int8
from tests.tiny_models import correlated_draft, greedy_reference, tiny_llama


def test_an_int8_draft_uses_the_weight_kernel_for_few_rows_and_fbgemm_for_more(monkeypatch):
    model = tiny_llama(seed=5, vocab_size=64, hidden_size=64, num_layers=2)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits.float()
        quantize_int8(model, kernels="packed")
        layers = [m for m in model.modules() if isinstance(m, Int8DraftLinear)]
        assert layers and not any(type(m) is torch.nn.Linear for m in model.modules())  # lm_head too
        calls = {"panels": 0, "dynamic": 0}
        for layer in layers:
            for part in ("panels", "dynamic"):
                inner = getattr(layer, part)
                original = inner.matmul if part == "panels" else inner.forward

                def counted(*args, _original=original, _part=part):
                    calls[_part] += 1
                    return _original(*args)

                monkeypatch.setattr(inner, "matmul" if part == "panels" else "forward", counted)
        many = model(input_ids=ids).logits.float()  # 12 rows: fbgemm
        assert calls == {"panels": 0, "dynamic": len(layers)}
        few_rows = layers[0].few_rows  # by the kernel's instruction set
        assert few_rows == int8_draft.FEW_ROWS[2 if native.has_vnni() else 1] and few_rows < ids.shape[1]
        few = torch.cat([model(input_ids=ids[:, :i + 1]).logits[:, -1:].float()  # no cache: 1..12 rows
                         for i in range(few_rows)], dim=1)
        assert calls["panels"] == len(layers) * few_rows
    # Both round weights and activations: the few-row kernel each row with its own scale (7% of the
    # largest logit here, through two layers of this deliberately peaked tiny model), fbgemm the
    # whole call with one, which costs more.
    for got, want, tolerance in ((few, reference[:, :few_rows], 0.12), (many, reference, 0.25)):
        assert not torch.equal(got, want)  # the weights really were rounded
        assert (got - want).abs().max() < tolerance * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_int8_picks_its_kernels_by_the_kernels_setting(monkeypatch):
    def fresh():
        return tiny_llama(seed=1, vocab_size=64, hidden_size=32, num_layers=1)

    assert isinstance(quantize_int8(fresh(), kernels="auto").lm_head, Int8DraftLinear)
    assert type(quantize_int8(fresh(), kernels="stock").lm_head).__module__.startswith("torch.ao.nn.quantized")

    def unavailable():
        raise native.KernelUnavailable("no compiler here")

    monkeypatch.setattr(native, "library", unavailable)
    assert type(quantize_int8(fresh(), kernels="auto").lm_head).__module__.startswith("torch.ao.nn.quantized")
    with pytest.raises(native.KernelUnavailable):
        quantize_int8(fresh(), kernels="packed")


@pytest.mark.parametrize("method", ["dyspec", "chain"])
def test_an_int8_weight_draft_gives_the_float32_targets_greedy_output(method):
    target = tiny_llama(seed=11, vocab_size=64, hidden_size=64, num_layers=2)
    draft = quantize_int8(correlated_draft(target, noise=0.2, seed=12), kernels="packed")
    prompt = [3, 17, 42, 5, 9]
    result = generate(target, draft, prompt, max_new_tokens=24, method=method, budget=8, temperature=0.0)
    assert result.tokens == greedy_reference(target, prompt, 24)
    assert result.tokens_per_step > 1.0  # the draft still agrees with the target
