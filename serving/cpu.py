"""What this machine's CPU can do, read once from /proc/cpuinfo (Linux): the flags that choose the
kernels and dtypes (the int4 draft kernel, native bf16) and that benchmark reports name. Elsewhere
(no /proc/cpuinfo) no flags: callers then take their portable paths."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's flags, empty where /proc/cpuinfo is missing or has no flags line."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def runs_int4_kernel() -> bool:
    """Whether the CPU has what the int4 draft's kernel needs (AVX2, FMA and F16C; engine/kernels/q4x8.c)."""
    return {"avx2", "fma", "f16c"} <= cpu_flags()
