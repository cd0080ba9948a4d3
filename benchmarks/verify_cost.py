"""What a tree verification costs the target: T_v(B), one forward over a B-node tree (plus its root
row) on a cached prompt, for B = 1..64, against the machine's measured bounds, per kernel set.

    python -m benchmarks.verify_cost                       # Qwen 1.5B target, every config this CPU runs (~10 min)
    python -m benchmarks.verify_cost --pair small --reps 3 --nodes 1,4,16    # SmolLM2-135M (quick)

Configs (each in its own process, since the ISA limits are read at library load):
- fp32-stock, fp32-packed: torch's F.linear against engine.packed_linear (small_gemm.c)
- fp32-stock-avx2, fp32-packed-avx2 (CPUs with AVX-512): the same with every library held to AVX2
  (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY, DYSPEC_GEMM_ISA): the closest
  this machine comes to an AVX2-only CPU (same memory system, so not the same machine)
- bf16-stock, bf16-packed (CPUs with native bf16): torch's F.linear against the packed bf16 layers
  (engine.packed_linear.Bf16Panels, small_gemm.c's vdpbf16ps kernel, on AVX512-BF16 CPUs)
- bf16-onednn (AVX512-BF16 CPUs): the packed layers on oneDNN's prepacked matmul instead
  (Bf16Packed, what bf16-packed was before our bf16 kernel; DYSPEC_GEMM_ISA=avx2 holds our kernel off)
Packed configs attend row by row (engine.row_attention), as the target service does.

Bounds, measured in the same process: `read` is one pass over every linear weight (a vectorised sum;
the floor of any forward that reads its weights once), `fma` is B + 1 rows times the linear layers'
multiply-adds at the packed kernel's own rate on cache-resident weights (the compute floor of this
kernel; configs on our float32 or bf16 kernel). bound(B) = max(read, fma(B)).

Writes OUT/results.jsonl and OUT/REPORT.md (benchmarks.verify_cost_report). One torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "reports" / "verify_cost"
NODES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            "DYSPEC_GEMM_ISA": "avx2"}
PROMPT_TOKENS = 128


def configs_for_this_cpu() -> dict[str, dict]:
    """name -> {dtype, kernels, env}."""
    from serving.cpu import cpu_flags, has_native_bf16

    flags = cpu_flags()
    out = {"fp32-stock": {"dtype": "float32", "kernels": "stock", "env": {}},
           "fp32-packed": {"dtype": "float32", "kernels": "packed", "env": {}}}
    if "avx512f" in flags:
        out["fp32-stock-avx2"] = {"dtype": "float32", "kernels": "stock", "env": AVX2_ENV}
        out["fp32-packed-avx2"] = {"dtype": "float32", "kernels": "packed", "env": AVX2_ENV}
    if has_native_bf16():
        out["bf16-stock"] = {"dtype": "bfloat16", "kernels": "stock", "env": {}}
        out["bf16-packed"] = {"dtype": "bfloat16", "kernels": "packed", "env": {}}
        if "avx512_bf16" in flags:
            out["bf16-onednn"] = {"dtype": "bfloat16", "kernels": "packed", "env": {"DYSPEC_GEMM_ISA": "avx2"}}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.verify_cost", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=("qwen", "small", "tiny"), default="qwen", help="whose target (benchmarks.model_pairs)")
    p.add_argument("--nodes", default=",".join(map(str, NODES)), help="tree sizes B")
    p.add_argument("--reps", type=int, default=5, help="timed forwards per tree size (after one untimed)")
    p.add_argument("--configs", default="", help="comma-separated subset of the configs (default: all this CPU runs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one config, in a child process
    return p


def binary_tree(size: int, vocab: int):
    """A B-node tree shaped like a drafted one (a few branches per level), tokens spread over the vocabulary."""
    from dyspec.tree import TokenTree

    return TokenTree.from_arrays([(7919 * (i + 1)) % vocab for i in range(size)],
                                 [-1] + [(i - 1) // 2 for i in range(1, size)])


def measure_config(name: str, config: dict, args) -> list[dict]:
    import torch

    from benchmarks.model_pairs import model_pair
    from dyspec.hf_runner import HFTargetSession
    from serving.models import load_target_lm

    torch.set_num_threads(1)
    pair = model_pair(args.pair, dtype=config["dtype"], kernels=config["kernels"])
    model = load_target_lm(pair.target)
    vocab = model.config.vocab_size
    prompt = [(31 * i + 11) % vocab for i in range(PROMPT_TOKENS)]
    session = HFTargetSession(model, prompt)
    session.forward_tree(binary_tree(1, vocab))  # prefill, then keep the prompt minus its last token cached
    base = PROMPT_TOKENS - 1
    with torch.inference_mode():
        for layer in session.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :base], layer.values[:, :, :base]
    session.n_cached = base
    rows = []
    for size in [int(b) for b in args.nodes.split(",")]:
        tree = binary_tree(size, vocab)
        times = []
        for rep in range(args.reps + 1):
            start = time.perf_counter()
            session.forward_tree(tree)
            elapsed = time.perf_counter() - start
            with torch.inference_mode():  # drop the tree again: every forward sees the same cache
                for layer in session.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, :base], layer.values[:, :, :base]
            if rep:
                times.append(elapsed)
        rows.append({"kind": "tv", "config": name, "nodes": size, "rows": size + 1, "times_s": times})
        print(f"  {name} B={size}: median {sorted(times)[len(times) // 2] * 1e3:.0f} ms", flush=True)
    rows.append({"kind": "bounds", "config": name, **bounds(model, config)})
    return rows


def bounds(model, config: dict) -> dict:
    """read_s: one vectorised pass over every linear weight; fma_s_per_row: the linear layers'
    multiply-adds for one row at the packed kernel's cache-resident rate (our float32 or bf16 kernel)."""
    import torch

    from engine.packed_linear import Bf16Panels, Fp32Panels, PackedLinear, PackedRowParallel

    weights, macs = [], 0
    for module in model.modules():
        if isinstance(module, (PackedLinear, PackedRowParallel)):
            kernel = module.kernel
            weights.append(kernel.panels if isinstance(kernel, (Fp32Panels, Bf16Panels)) else kernel.packed)
            macs += kernel.in_features * kernel.out_features
        elif type(module) is torch.nn.Linear:
            weights.append(module.weight)
            macs += module.weight.numel()
    # oneDNN's packed bf16 weights are opaque tensors that nothing but its matmul reads: time a dense
    # tensor of the same size instead (the same bytes through the same memory system).
    weights = [w.to_dense() if w.is_mkldnn else w for w in weights]
    reads = []
    for _ in range(3):
        start = time.perf_counter()
        for w in weights:
            w.sum()
        reads.append(time.perf_counter() - start)
    out = {"read_s": min(reads), "weight_bytes": sum(w.numel() * w.element_size() for w in weights), "macs_per_row": macs}
    packed = [m.kernel for m in model.modules() if isinstance(m, (PackedLinear, PackedRowParallel))]
    if config["dtype"] == "float32" and packed:
        out.update(kernel_rate(Fp32Panels, torch.float32, rows=6 if config["env"] else 24))  # each ISA's widest row group (MR in small_gemm.c)
        out["fma_s_per_row"] = macs / out["fma_macs_per_s"]
    elif packed and all(isinstance(kernel, Bf16Panels) for kernel in packed):
        out.update(kernel_rate(Bf16Panels, torch.bfloat16, rows=24))
        out["fma_s_per_row"] = macs / out["fma_macs_per_s"]
    return out


def kernel_rate(kind, dtype, rows: int, trials: int = 5, calls: int = 400) -> dict:
    """A packed kernel's (Fp32Panels or Bf16Panels) multiply-adds per second on a 0.4-1.5 MB weight
    that stays in L2 (its compute floor): best of `trials` runs of `calls` products of `rows` rows."""
    import torch

    n, k = 768, 512
    panels, x = kind(torch.randn(n, k).to(dtype)), torch.randn(rows, k).to(dtype)
    panels.matmul(x, None)
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            panels.matmul(x, None)
        best = min(best, time.perf_counter() - start)
    return {"fma_macs_per_s": calls * rows * n * k / best, "fma_rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configs = configs_for_this_cpu()
    if args.worker:
        for row in measure_config(args.worker, configs[args.worker], args):
            print("RESULT " + json.dumps(row), flush=True)
        return 0
    from benchmarks.machine import cpu_flags, describe
    from benchmarks.verify_cost_report import write_report

    wanted = [c for c in args.configs.split(",") if c] or list(configs)
    unknown = set(wanted) - set(configs)
    if unknown:
        raise SystemExit(f"configs not available on this CPU: {sorted(unknown)}; choose from {sorted(configs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = [{"kind": "run", "argv": list(sys.argv[1:] if argv is None else argv), "pair": args.pair,
                "machine": describe(1), "cpu_flags": cpu_flags(), "started": time.time()}]
    for name in wanted:
        print(f"{name} ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **configs[name]["env"]}
        cmd = [sys.executable, "-m", "benchmarks.verify_cost", "--worker", name, "--pair", args.pair,
               "--nodes", args.nodes, "--reps", str(args.reps)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        for line in done.stdout.splitlines():
            if line.startswith("RESULT "):
                results.append(json.loads(line[len("RESULT "):]))
            else:
                print(line, flush=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed (rc={done.returncode}):\n{done.stderr[-3000:]}")
    with open(args.out / "results.jsonl", "w") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    print(f"report: {write_report(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
