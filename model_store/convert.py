"""One-time conversion of a GGUF file into a transformers fp32 model folder (safetensors + tokenizer).

Loading GGUF dequantises every tensor and converts the tokenizer (tens of seconds); reloading the
saved fp32 safetensors takes about a second, so the conversion runs once per machine.
"""

import time
from pathlib import Path
from typing import Callable

# Writes a transformers-loadable model folder into `out_dir` from the GGUF file at `gguf_path`.
Converter = Callable[[Path, Path, Callable[[str], None]], None]


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Callable[[str], None]) -> None:
    """Dequantise `gguf_path` to fp32 and save model, generation config and tokenizer into `out_dir`."""
    # Imported here: the rest of the store (CLI listing, hash checks, tests) must not pay for torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    progress(f"dequantised weights to fp32 ({time.monotonic() - t0:.1f} s)")
    # The loaded model still carries the GGUF quantiser, and save_pretrained refuses to serialise a
    # "quantised" model; the tensors are plain fp32 by now, so dropping both markers is safe.
    model.hf_quantizer = None
    del model.config.quantization_config

    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    progress(f"converted tokenizer ({time.monotonic() - t0:.1f} s)")

    t0 = time.monotonic()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    progress(f"saved fp32 safetensors and tokenizer ({time.monotonic() - t0:.1f} s)")
