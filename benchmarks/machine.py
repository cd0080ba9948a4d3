"""What machine (and code) a benchmark ran on, for the reports: CPU, cores, memory, load, versions,
git commit. Times from a shared, noisy machine mean little without this."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")


def cpu_flags() -> list[str]:
    """The CPU flags that decide these kernels' speed (vector width, FMA, native bf16), in SPEED_FLAGS order."""
    from serving.cpu import cpu_flags as all_flags

    return [f for f in SPEED_FLAGS if f in all_flags()]


def describe(threads: int | None = None) -> dict:
    """`threads`: torch threads of the benchmark process's own model work, None if it runs none
    (the services run one each)."""
    import torch
    import transformers

    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "mem_gib": round(_mem_gib(), 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": threads,
        "gpu": bool(torch.cuda.is_available()), "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cpu_flags": cpu_flags(),
    }


def describe_markdown(info: dict) -> str:
    load = ", ".join(f"{x:g}" for x in info["load_avg"])
    threads = info.get("torch_threads")
    in_process = "" if threads is None else f", {threads} for in-process baselines"
    return (f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB RAM, "
            f"GPU: {'yes' if info['gpu'] else 'none'}; load average at the start {load} (shared machine: other "
            f"jobs ran alongside). Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}; "
            f"one torch thread per service process"
            f"{in_process}. Code: commit {info['commit']}"
            f"{' with uncommitted changes' if info['dirty'] else ''}.")
