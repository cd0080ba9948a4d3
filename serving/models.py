"""Where a service's model comes from: a transformers folder, or a factory callable (tests and
development use tiny random models built by code, e.g. `tests.tiny_models:tiny_llama`).

Both services parse the same flags, so a draft and a target are described the same way.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

from engine import KERNELS
from serving.cpu import has_native_bf16

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "int8", "int4", "auto")  # fp16 fails on CPU (DeepSpeed and most CPU kernels)
# A draft's numerics never change the output (the target verifies against the exact distribution each
# child was drawn from, which the draft ships), so a draft may run a cheaper, lossy dtype. A target's
# numerics are the user's model: it refuses these.
DRAFT_ONLY_DTYPES = ("int8", "int4")
TARGET_DTYPES = tuple(d for d in DTYPES if d not in DRAFT_ONLY_DTYPES)


@dataclass(frozen=True)
class ModelSource:
    model_dir: str | None = None  # a transformers causal LM folder (config + weights [+ tokenizer])
    factory: str | None = None  # "module:function" returning a causal LM
    factory_kwargs: str = "{}"  # JSON object of keyword arguments for the factory
    dtype: str = "float32"
    name: str = ""  # served model name; empty derives one from the folder or factory
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"
    kernels: str = "auto"  # linear layers on a CPU: engine.prepack.KERNELS (auto = packed where it runs)

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
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")

    def resolved_dtype(self) -> str:
        """"auto": bf16 on a GPU or a CPU with native bf16, else fp32. "int8" stays "int8"."""
        if self.dtype != "auto":
            return self.dtype
        # native bf16 forwards run 1.6-3x faster than fp32; emulated ones are slower
        return "bfloat16" if self.resolved_device().startswith("cuda") or has_native_bf16() else "float32"

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


def _target_dtype(text: str) -> str:
    if text in DRAFT_ONLY_DTYPES:
        raise argparse.ArgumentTypeError(
            f"{text} is for draft workers only: a target's numerics are the model whose output the system "
            f"reproduces exactly, so it runs one of {', '.join(TARGET_DTYPES)}")
    return text


def add_model_arguments(parser: argparse.ArgumentParser, draft: bool = False) -> None:
    """The model flags of both services; `draft` also offers the draft-only dtypes (int8, int4), which a
    target refuses with an error saying why."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model-dir", help="transformers causal LM folder")
    group.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                       help="callable returning a causal LM, e.g. tests.tiny_models:tiny_llama (tiny random models)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for --model-factory")
    parser.add_argument("--model-name", default="", help="served model name (default: folder name or factory spec)")
    auto = "auto = bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32"
    if draft:
        parser.add_argument("--dtype", choices=DTYPES, default="float32",
                            help=f"weights; {auto}; int8 = int8 weights per output channel (CPU only), int4 = 4-bit weights "
                                 "per group of 32 inputs (CPU only; fastest where the CPU has AVX512-VNNI); both "
                                 "lossless all the same: the target verifies against the distributions this draft "
                                 "actually drew from; see benchmarks/reports/draft_dtype")
    else:
        parser.add_argument("--dtype", type=_target_dtype, choices=TARGET_DTYPES, default="float32",
                            help=f"weights; {auto}")
    parser.add_argument("--device", default="auto",
                        help="auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--kernels", choices=KERNELS, default="auto",
                        help="linear layers on a CPU: packed = weights packed once at load for few-row forwards "
                             "(float32: engine/kernels/small_gemm.c, a 16-node tree ~1.3x one token instead of ~2.8x; "
                             "bfloat16: oneDNN's packed matmul), stock = torch's F.linear, auto = packed where it "
                             "can be built and run, else stock")


def model_source_from_args(args: argparse.Namespace) -> ModelSource:
    return ModelSource(args.model_dir, args.model_factory, args.model_kwargs, args.dtype, args.model_name,
                       args.device, args.kernels)


def load_causal_lm(source: ModelSource, device: str | None = None, prepack: bool = True):
    """The model in eval mode, in source.dtype, on `device` (default: the source's device), its
    linear layers packed per source.kernels when it runs on the CPU (engine.prepack).
    Tensor-parallel loading passes "cpu" and prepack=False: DeepSpeed shards and places the weights
    itself, and the shards are packed after that. int8 loads float32 weights and quantises them
    (quantize_int8), on the CPU only; its quantised layers are not repacked."""
    model, resolved, device = _load_weights(source, device)
    return _ready(model, source, resolved, device, prepack)


DRAFT_FORWARDS = ("native", "lean", "transformers")


def load_draft_lm(source: ModelSource, device: str | None = None, forward: str = "native", static_kv_tokens: int = 0):
    """load_causal_lm for a draft, run by `forward` (DRAFT_FORWARDS):

    - "lean": a Llama / Qwen2 model runs engine.lean_decoder's forward (stacked q/k/v and gate/up
      weights, ~3x fewer ops a layer), built before its linear layers are quantised or packed so the
      stacked layers get the fast kernels too; other models keep transformers' forward.
    - "native" (the default): the lean forward, and where the draft is 4-bit on the CPU its forwards of
      up to 8 rows run as one native call each (engine.native_draft; ~1.5x faster at one row than the
      lean forward); elsewhere the lean forward, with the reason logged.
    - "transformers": the model's own forward.

    A draft's numerics never change the output (the target verifies against the distributions the
    draft sends), so any faithful forward will do.
    `static_kv_tokens` > 0 (lean or native): each session's KV cache is allocated once at that many
    tokens and forwards of up to 64 rows run padded to a bucket, captured as CUDA graphs on a GPU
    (engine.graphed_forward; written for GPUs, not yet measured on one); it replaces the native forward."""
    if forward not in DRAFT_FORWARDS:
        raise ValueError(f"unknown draft forward {forward!r}; choose one of {', '.join(DRAFT_FORWARDS)}")
    model, resolved, device = _load_weights(source, device)
    if forward != "transformers":
        from engine.lean_decoder import LeanCausalLM, lean_supported

        reason = lean_supported(model)
        if reason is None:
            model = LeanCausalLM(model)
        else:
            log.info("the draft keeps transformers' forward: %s", reason)
    if static_kv_tokens and not hasattr(model, "use_static_cache"):
        raise ValueError("a static KV cache needs the lean draft forward (a Llama or Qwen2 draft, --draft-forward lean)")
    model = _ready(model, source, resolved, device, prepack=True)
    if static_kv_tokens:
        from engine.graphed_forward import StaticForwardRunner

        model.use_static_cache(static_kv_tokens, StaticForwardRunner(model))
    elif forward == "native" and hasattr(model, "use_static_cache"):
        from engine.native_draft import native_unsupported, use_native_draft

        reason = native_unsupported(model)
        if reason is None:
            use_native_draft(model)
            log.info("draft forwards of up to 8 rows run natively (engine.native_draft)")
        else:
            log.info("the draft runs the lean forward, not the native one: %s", reason)
    return model


def _load_weights(source: ModelSource, device: str | None):
    """(model in eval mode on `device`, resolved dtype, device); int8 and int4 load float32 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = source.resolved_dtype()  # the serving device decides, not the loading one
    device = device or source.resolved_device()
    if resolved in DRAFT_ONLY_DTYPES and device != "cpu":
        raise ValueError(f"dtype {resolved} (the draft's quantised CPU kernels) runs on the CPU only, not on {device!r}")
    dtype = torch.float32 if resolved in DRAFT_ONLY_DTYPES else getattr(torch, resolved)
    if source.model_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=dtype)
    else:
        module, function = source.factory.split(":", 1)
        model = getattr(importlib.import_module(module), function)(**json.loads(source.factory_kwargs)).to(dtype)
    return model.to(device).eval(), resolved, device


def _ready(model, source: ModelSource, resolved: str, device: str, prepack: bool):
    """Quantise (int8, int4) or pack (per source.kernels, CPU only) the loaded model's linear layers."""
    if resolved == "int8":
        return quantize_int8(model, kernels=source.kernels)
    if resolved == "int4":
        from engine.int4_draft import quantize_int4

        return quantize_int4(model)
    if prepack and device == "cpu":
        from engine.prepack import prepack_linears

        prepack_linears(model, source.kernels)
    return model


def hand_threads_to_kernels(model) -> int:
    """A service process's torch threads go to our kernels once its model runs on them only (torch's
    ops then run on one thread; engine.kernel_threads says why). Returns the kernels' thread count."""
    from engine import kernel_threads
    from engine.prepack import only_our_kernels

    if not only_our_kernels(model):
        return kernel_threads.kernel_threads()
    threads = kernel_threads.take_from_torch()
    if threads > 1:
        log.info("our kernels split over %d threads; torch's own ops run on one", threads)
    return threads


def threads_for(model) -> Callable[[int], ContextManager[None]]:
    """`with threads_for(model)(n):` runs forwards of `model` on n threads: our kernels take them where
    its linear layers run on ours only (torch's ops keep their count: engine.kernel_threads), else
    torch's intra-op count is n inside the block. Decided once per model: call it at setup."""
    from engine import kernel_threads
    from engine.prepack import only_our_kernels

    return kernel_threads.using if only_our_kernels(model) else _torch_threads


@contextlib.contextmanager
def _torch_threads(threads: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_target_lm(source: ModelSource, device: str | None = None, prepack: bool = True):
    """load_causal_lm for a target. On a CPU with packed kernels its attention is made row-exact
    too (engine.row_attention): with batch-invariant linear layers a tree row then equals the row
    decoded alone bit for bit, in bf16 as in float32, so greedy speculation gives plain decoding's
    tokens even at near-ties."""
    model = load_causal_lm(source, device, prepack)
    if (device or source.resolved_device()) == "cpu":
        enable_row_exact_attention(model, source.kernels)
    return model


def enable_row_exact_attention(model, kernels: str) -> bool:
    """Row-exact attention for a CPU target unless its kernels are stock (whose linear layers are
    not batch-invariant, so the attention alone would buy nothing); whether it was switched on."""
    if kernels == "stock":
        return False
    from engine.row_attention import use_row_exact_attention

    use_row_exact_attention(model)
    return True


# torch 2.10+ deprecates torch.ao.quantization (in favour of torchao, not installed here) but 2.13 still
# ships and runs it; these are the only warnings quantisation raises, each matched by its own text.
_QUANTISATION_DEPRECATIONS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
)


def quantize_int8(model, lm_head: bool = True, kernels: str = "stock"):
    """Dynamic int8 quantisation (torch.ao.quantization.quantize_dynamic, fbgemm kernels) of every
    nn.Linear, in place; returns the model. Weights are int8 per output channel; activations are
    quantised per forward, per tensor. Embeddings, norms and the KV cache stay float32, so the model's
    first parameter (which the runners read for mask dtype and device) is still float32.

    With kernels "auto" or "packed", calls of one or two rows (most of a draft's forwards) run on the
    project's int8-weight kernel instead (engine.int8_draft: on a 2-core AVX2 EPYC the 0.5B draft's
    1-row forward 52 ms instead of 75); "auto" keeps fbgemm alone where that kernel cannot run,
    "packed" raises.

    Measured on Qwen2.5-Coder-0.5B (benchmarks/reports/draft_dtype, an AVX512-BF16 CPU, one thread):
    3-5x faster than float32 and 2-3x faster than native bf16 at 1-16 rows, with the same tokens per
    step against the float32 1.5B target. `lm_head=False` keeps the output projection float32: about
    half the speed-up gone (its 152k x 896 matrix is a quarter of the weights) for no measured gain."""
    import warnings

    import torch

    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and (lm_head or name != "lm_head")]
    few_rows = {}
    if kernels != "stock":
        from engine import int8_draft, native

        try:
            few_rows = int8_draft.few_row_panels(model, names)
        except native.KernelUnavailable as error:
            if kernels == "packed":
                raise
            log.warning("the int8 draft runs on fbgemm alone: %s", error)
    with warnings.catch_warnings():
        for category, message in _QUANTISATION_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        if "fbgemm" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "fbgemm"  # process-wide: the x86 kernels for server CPUs
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    if few_rows:
        int8_draft.attach(model, few_rows)
    return model.eval()


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
