"""Where a service's model comes from: a transformers folder, or a factory callable (tests and
development use tiny random models built by code, e.g. `tests.tiny_models:tiny_llama`).

Both services parse the same flags, so a draft and a target are described the same way.
"""
from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "auto")  # fp16 fails on CPU (DeepSpeed and most CPU kernels)


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 forwards run
    1.6-3x faster than fp32; elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class ModelSource:
    model_dir: str | None = None  # a transformers causal LM folder (config + weights [+ tokenizer])
    factory: str | None = None  # "module:function" returning a causal LM
    factory_kwargs: str = "{}"  # JSON object of keyword arguments for the factory
    dtype: str = "float32"
    name: str = ""  # served model name; empty derives one from the folder or factory
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"

    def __post_init__(self):
        if (self.model_dir is None) == (self.factory is None):
            raise ValueError("give exactly one of a model folder or a model factory")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"model factory must look like 'module:function', got {self.factory!r}")
        if not isinstance(json.loads(self.factory_kwargs), dict):
            raise ValueError("model factory kwargs must be a JSON object")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def resolved_dtype(self) -> str:
        """"auto": bf16 on a GPU or a CPU with native bf16, else fp32."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device().startswith("cuda") or cpu_has_bf16() else "float32"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.model_dir is not None:
            return Path(self.model_dir).resolve().name
        kwargs = json.loads(self.factory_kwargs)
        return self.factory + "".join(f",{k}={v}" for k, v in sorted(kwargs.items()))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model-dir", help="transformers causal LM folder")
    group.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                       help="callable returning a causal LM, e.g. tests.tiny_models:tiny_llama (tiny random models)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for --model-factory")
    parser.add_argument("--model-name", default="", help="served model name (default: folder name or factory spec)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights; auto = bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32")
    parser.add_argument("--device", default="auto",
                        help="auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N")


def model_source_from_args(args: argparse.Namespace) -> ModelSource:
    return ModelSource(args.model_dir, args.model_factory, args.model_kwargs, args.dtype, args.model_name,
                       args.device)


def load_causal_lm(source: ModelSource, device: str | None = None):
    """The model in eval mode, in source.dtype, on `device` (default: the source's device).
    Tensor-parallel loading passes "cpu": DeepSpeed shards and places the weights itself."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, source.resolved_dtype())  # the serving device decides, not the loading one
    if source.model_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=dtype)
    else:
        module, function = source.factory.split(":", 1)
        model = getattr(importlib.import_module(module), function)(**json.loads(source.factory_kwargs)).to(dtype)
    return model.to(device or source.resolved_device()).eval()


def load_tokenizer(source: ModelSource):
    """The folder's tokenizer, or None (factories and weight-only folders have none)."""
    if source.model_dir is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.model_dir)
    except (OSError, ValueError):
        return None


def first_layers(model_dir: str, num_layers: int):
    """A factory (`--model-factory serving.models:first_layers`): the model in `model_dir` cut to its
    first `num_layers` decoder layers, keeping its embeddings, final norm and head. A "self-draft"
    with the target's vocabulary, for targets without a small sibling (e.g. SmolLM2-135M)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not 1 <= num_layers <= model.config.num_hidden_layers:
        raise ValueError(f"num_layers must be in [1, {model.config.num_hidden_layers}], got {num_layers}")
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:  # per-layer attention kinds must match the count
        model.config.layer_types = list(model.config.layer_types)[:num_layers]
    return model.eval()
