"""The target/draft pairs the speed benchmarks run, described once for both the services (flags)
and the in-process baselines (serving.models loaders, so both load the very same weights).

- qwen:  Qwen2.5-Coder 1.5B target, 0.5B draft (model_store; MODELS.md)
- small: SmolLM2-135M target, a self-draft of its first layers (serving.models:first_layers)
- tiny:  random tiny Llamas from tests.service_models (no tokenizer; prompts are random ids)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from serving.models import ModelSource


@dataclass(frozen=True)
class ModelPair:
    name: str
    target: ModelSource
    draft: ModelSource
    description: str

    @staticmethod
    def service_args(source: ModelSource) -> list[str]:
        common = ["--dtype", source.dtype, "--kernels", source.kernels]
        if source.model_dir is not None:
            return ["--model-dir", source.model_dir, *common]
        return ["--model-factory", source.factory, "--model-kwargs", source.factory_kwargs, *common]

    def load(self):
        """(target, draft, tokenizer or None) in eval mode and the pair's dtype, as the services load them."""
        from serving.models import load_causal_lm, load_target_lm, load_tokenizer

        return load_target_lm(self.target), load_causal_lm(self.draft), load_tokenizer(self.target)


def model_pair(name: str, draft_layers: int = 8, draft_noise: float = 0.3, dtype: str = "float32",
               draft_dtype: str | None = None, kernels: str = "auto") -> ModelPair:
    """`draft_layers`: the small pair's self-draft depth; `draft_noise`: how far the tiny draft's
    weights are perturbed from the target's (tests use 0.3; smaller means higher acceptance);
    `dtype`: weights of both models, in the services and in-process alike; `draft_dtype`: the
    draft's instead (e.g. int8, serving.models.DRAFT_ONLY_DTYPES), None for `dtype`; `kernels`: the
    linear layers of both models (engine.KERNELS), in the services and in-process alike.
    The description keys resumable results: it names a draft dtype or kernels only when they differ
    from the defaults."""
    pair = _model_pair(name, draft_layers, draft_noise, dtype)
    if draft_dtype is not None and draft_dtype != dtype:
        pair = ModelPair(pair.name, pair.target, dataclasses.replace(pair.draft, dtype=draft_dtype),
                         f"{pair.description} (draft {draft_dtype})")
    if kernels != "auto":
        pair = ModelPair(pair.name, dataclasses.replace(pair.target, kernels=kernels),
                         dataclasses.replace(pair.draft, kernels=kernels), f"{pair.description}, {kernels} kernels")
    return pair


def _model_pair(name: str, draft_layers: int, draft_noise: float, dtype: str) -> ModelPair:
    if name == "tiny":
        return ModelPair("tiny", ModelSource(factory="tests.service_models:target", dtype=dtype),
                         ModelSource(factory="tests.service_models:draft", factory_kwargs=json.dumps({"noise": draft_noise}),
                                     dtype=dtype),
                         f"tiny random Llamas (tests.service_models: vocab 64, 2 layers; the draft is a copy of the "
                         f"target with weight noise {draft_noise:g}), {dtype}")
    from model_store import fetch_model

    if name == "small":
        target_dir = str(fetch_model("smollm2-135m"))
        kwargs = json.dumps({"model_dir": target_dir, "num_layers": draft_layers})
        return ModelPair("small", ModelSource(model_dir=target_dir, dtype=dtype),
                         ModelSource(factory="serving.models:first_layers", factory_kwargs=kwargs, dtype=dtype),
                         f"SmolLM2-135M-Instruct target (30 layers), draft = its first {draft_layers} layers "
                         f"(serving.models:first_layers), {dtype}")
    if name == "qwen":
        return ModelPair("qwen", ModelSource(model_dir=str(fetch_model("qwen2.5-coder-1.5b")), dtype=dtype),
                         ModelSource(model_dir=str(fetch_model("qwen2.5-coder-0.5b")), dtype=dtype),
                         f"Qwen2.5-Coder-1.5B-Instruct target, Qwen2.5-Coder-0.5B-Instruct draft, {dtype}")
    raise ValueError(f"unknown model pair {name!r}; choose qwen, small or tiny")


def prompts_for(pair: ModelPair, tokenizer, sets: list[str], count: int, prompt_tokens: int,
                vocab_size: int) -> dict[str, list[list[int]]]:
    """{set name: prompts}; the tiny pair has no tokenizer and gets seeded random ids (set 'random')."""
    if tokenizer is None:
        import random

        rng = random.Random(0)
        return {"random": [[rng.randrange(vocab_size) for _ in range(prompt_tokens)] for _ in range(count)]}
    from benchmarks.prompts import prompt_set

    return {s: prompt_set(s, count, prompt_tokens, tokenizer) for s in sets}
