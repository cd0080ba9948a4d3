"""serving.cpu: the CPU flags that choose kernels and dtypes, from a given /proc/cpuinfo text."""
from __future__ import annotations

import builtins
import io

import pytest

from serving import cpu

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\nbogomips\t: 4890\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 fma f16c avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    """Serve `text` (None: no such file) as /proc/cpuinfo to serving.cpu, with its cache cleared."""
    real_open = builtins.open

    def serve(text):
        def fake_open(path, *args, **kwargs):
            if path != "/proc/cpuinfo":
                return real_open(path, *args, **kwargs)
            if text is None:
                raise FileNotFoundError(path)
            return io.StringIO(text)

        monkeypatch.setattr(builtins, "open", fake_open)
        cpu.cpu_flags.cache_clear()

    yield serve
    cpu.cpu_flags.cache_clear()


def test_flags_of_an_avx2_only_cpu(cpuinfo):
    cpuinfo(ZEN3)
    assert cpu.cpu_flags() == {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}
    assert cpu.runs_int4_kernel() and not cpu.has_native_bf16()


def test_native_bf16_where_avx512_bf16_or_amx(cpuinfo):
    cpuinfo(SAPPHIRE_RAPIDS)
    assert cpu.has_native_bf16() and cpu.runs_int4_kernel()
    cpuinfo("flags\t\t: avx2 fma amx_bf16\n")
    assert cpu.has_native_bf16() and not cpu.runs_int4_kernel()  # no F16C: no int4 draft kernel


@pytest.mark.parametrize("text", [None, "processor\t: 0\n"])
def test_no_cpuinfo_or_no_flags_line_means_no_flags(cpuinfo, text):
    cpuinfo(text)
    assert cpu.cpu_flags() == frozenset()
    assert not cpu.runs_int4_kernel() and not cpu.has_native_bf16()
