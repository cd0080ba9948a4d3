"""Tiny random-weight causal LMs for tests: transformers Llama / Qwen2, fp32, eval mode, seeded.

`tiny_llama` / `tiny_qwen2` build a 1-2 layer model with a small vocabulary in a few milliseconds.
Weights are drawn with a large init range (`init_std`) so next-token distributions are peaked
enough to be interesting (random 0.02-init models are almost uniform, which makes greedy argmax
ties likely and every draft "accepted" at T>0). `correlated_draft` copies a target and perturbs its
weights, so a draft agrees with the target often but not always.

The configs carry no bos/eos/pad ids: `dyspec.generate` falls back to the model's generation
config for EOS, and a tiny model must not stop at an arbitrary default id.
"""
from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def _finish(model, seed: int, init_std: float):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name:
                param.fill_(1.0)  # RMSNorm scales stay at 1
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * init_std)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    return model.float().eval()


def _common(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, max_positions):
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
                attn_implementation="sdpa")


def tiny_llama(seed: int = 0, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 256,
               init_std: float = 0.25) -> LlamaForCausalLM:
    """A seeded random Llama causal LM (fp32, eval). Same arguments => bit-identical weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(**_common(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, max_positions))
    return _finish(LlamaForCausalLM(config), seed, init_std)


def tiny_qwen2(seed: int = 0, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 256,
               init_std: float = 0.25) -> Qwen2ForCausalLM:
    """A seeded random Qwen2 causal LM (fp32, eval; Qwen2 has q/k/v biases)."""
    torch.manual_seed(seed)
    config = Qwen2Config(**_common(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, max_positions))
    return _finish(Qwen2ForCausalLM(config), seed, init_std)


def correlated_draft(target, noise: float = 0.3, seed: int = 1):
    """A deep copy of `target` with every weight w replaced by w + noise * std(w) * N(0, 1).

    noise ~0.1-0.5 gives a draft whose argmax agrees with the target's on most but not all steps,
    so speculative rounds see both acceptances and rejections."""
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            if param.ndim < 2:
                continue  # norms and biases unchanged
            param.add_(torch.randn(param.shape, generator=gen) * (noise * float(param.std())))
    return draft.eval()


def truncated_copy(model, num_layers: int):
    """A deep copy of `model` that keeps only its first `num_layers` decoder layers (a "self-draft")."""
    draft = copy.deepcopy(model)
    draft.model.layers = torch.nn.ModuleList(list(draft.model.layers)[:num_layers])
    draft.config.num_hidden_layers = num_layers
    if getattr(draft.config, "layer_types", None) is not None:
        draft.config.layer_types = list(draft.config.layer_types)[:num_layers]
    return draft.eval()


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                     use_cache: bool = False) -> list[int]:
    """Target-only greedy decoding with the model's plain forward: the independent oracle.

    use_cache=False recomputes the full sequence every step (no cache, no masks); use_cache=True
    is ordinary transformers incremental decoding (for real models, where recomputing is slow)."""
    seq = list(prompt)
    out: list[int] = []
    cache = DynamicCache() if use_cache else None
    with torch.inference_mode():
        while len(out) < max_new_tokens:
            if use_cache:
                fed = seq if not out else seq[-1:]
                logits = model(input_ids=torch.tensor([fed]), cache=cache, use_cache=True).logits[0, -1]
            else:
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            tok = int(torch.argmax(logits))
            out.append(tok)
            seq.append(tok)
            if tok == eos_token_id:
                break
    return out


def sequential_logits(model, tokens: list[int]) -> torch.Tensor:
    """float32 [len(tokens), V]: plain causal forward over `tokens` (default positions and mask)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()
