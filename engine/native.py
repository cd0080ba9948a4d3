"""The native kernels (engine/kernels/small_gemm.c, the packed linear layers; q8x8.c, the int8
draft's few-row int8 x int8 products; q4x8.c, the int4 draft's 4-bit x int8 products; and
row_attention.c, row-exact attention): one library built with the machine's C compiler on first
use, cached per source and compiler, loaded with ctypes.

Why ctypes and not a torch extension: the kernel takes raw float pointers and needs no torch
headers, so it builds in about a second (a torch extension takes a minute), and one build serves
every torch version. ctypes releases the GIL for the call, so panels can be split over threads.

The cache folder is `$DYSPEC_KERNEL_CACHE`, else `~/.cache/dyspec/kernels`. Processes that build at
once each compile to a private file and rename it into place, so none reads a half-written library.

Container images have no compiler at run time: their build stage runs `python -m engine.native
PATH` and the runtime stage sets `$DYSPEC_KERNEL_LIBRARY` to that prebuilt library, which is then
loaded as it is (no compiler, no cache).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name("kernels") / name
                for name in ("small_gemm.c", "q8x8.c", "q4x8.c", "row_attention.c", "draft_layers.c"))
CFLAGS = ("-O3", "-shared", "-fPIC", "-std=c11")  # no -march: the ISA is chosen per call at run time
ISAS = {"avx2": 1, "avx512": 2}  # dyspec_gemm's isa argument
PREBUILT_ENV = "DYSPEC_KERNEL_LIBRARY"  # a library built ahead (container images); loaded without a compiler
ISA_ENV = "DYSPEC_GEMM_ISA"  # "avx2" forces the AVX2 path on an AVX-512 CPU (benchmarks of AVX2 machines)
log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here: no C compiler, a failed build, or a CPU without AVX2 + FMA."""


def cache_dir() -> Path:
    return Path(os.environ.get("DYSPEC_KERNEL_CACHE") or Path.home() / ".cache" / "dyspec" / "kernels")


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise KernelUnavailable("no C compiler (gcc or cc) on PATH to build the small-GEMM kernel")
    return compiler


def build(compiler: str | None = None, output: Path | None = None, sources: tuple[Path, ...] = SOURCES) -> Path:
    """The path of the built library, compiling it if these sources and compiler have not been built
    (into the cache), or compiling it to `output` where one is given. `sources`: other copies of the
    kernel files (benchmarks.kernel_ab builds an earlier revision's), in SOURCES' order."""
    compiler = compiler or _compiler()
    if output is None:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        source_bytes = b"".join(Path(source).read_bytes() for source in sources)
        key = hashlib.sha256(source_bytes + " ".join(CFLAGS).encode() + version.encode()).hexdigest()[:16]
        target = cache_dir() / f"small_gemm-{key}.so"
        if target.exists():
            return target
    else:
        target = Path(output).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, private = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *CFLAGS, "-o", private, *map(str, sources), "-lm"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            names = " and ".join(Path(source).name for source in sources)
            raise KernelUnavailable(f"building {names} with {compiler} failed:\n{done.stderr.strip()}")
        os.replace(private, target)
    finally:
        if os.path.exists(private):
            os.unlink(private)
    log.info("built the small-GEMM kernel: %s", target)
    return target


def library_path() -> Path:
    """`$DYSPEC_KERNEL_LIBRARY` where set (it must exist), else the cached build of this source."""
    prebuilt = os.environ.get(PREBUILT_ENV, "").strip()
    if not prebuilt:
        return build()
    if not Path(prebuilt).is_file():
        raise KernelUnavailable(f"{PREBUILT_ENV}={prebuilt}: no such file (build it with `python -m engine.native PATH`)")
    return Path(prebuilt)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """This process's kernel library (library_path), loaded once."""
    return load_library(library_path())


def load_library(path: Path) -> ctypes.CDLL:
    """The kernel library at `path`, its functions' argument and result types declared (another
    build can be loaded beside library(): benchmarks.kernel_ab loads an earlier revision's)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:  # not a shared library, or one for another platform
        raise KernelUnavailable(f"loading the small-GEMM kernel failed: {error}") from error
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dyspec_pack.argtypes = [ptr, ptr, i64, i64]
    lib.dyspec_pack.restype = None
    lib.dyspec_gemm.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, i64]
    lib.dyspec_gemm.restype = ctypes.c_int
    lib.dyspec_best_isa.restype = ctypes.c_int
    lib.dyspec_pack_bf16.argtypes = [ptr, ptr, i64, i64]
    lib.dyspec_pack_bf16.restype = None
    lib.dyspec_gemm_bf16.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, i64]
    lib.dyspec_gemm_bf16.restype = ctypes.c_int
    lib.dyspec_has_bf16.restype = ctypes.c_int
    lib.dyspec_has_vnni.restype = ctypes.c_int
    lib.dyspec_pack_q8x8.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.dyspec_pack_q8x8.restype = None
    lib.dyspec_gemm_q8x8.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64]
    lib.dyspec_gemm_q8x8.restype = ctypes.c_int
    lib.dyspec_pack_q4x8.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.dyspec_pack_q4x8.restype = None
    lib.dyspec_gemm_q4x8.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, i64]
    lib.dyspec_gemm_q4x8.restype = ctypes.c_int
    lib.dyspec_row_attention.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr]
    lib.dyspec_row_attention.restype = ctypes.c_int
    lib.dyspec_draft_layers.argtypes = [ctypes.c_int, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                        ctypes.c_float, ctypes.c_float, ptr, ptr, ptr, ptr, ptr]
    lib.dyspec_draft_layers.restype = ctypes.c_int
    return lib


def has_bf16() -> bool:
    """Whether the bf16 kernel runs here (AVX512-BF16); False (not an error) where it cannot:
    callers fall back to oneDNN's bf16."""
    return _cpu_runs("dyspec_has_bf16")


def has_vnni() -> bool:
    """Whether the int8 x int8 kernel's AVX512-VNNI path runs here; False (not an error) where it
    cannot: that kernel then runs its AVX2 path."""
    return _cpu_runs("dyspec_has_vnni")


def _cpu_runs(probe: str) -> bool:
    """The library's CPU probe `probe`, unless `$DYSPEC_GEMM_ISA` holds the kernels to avx2 (as on
    an AVX2-only machine) or the library cannot be built."""
    if os.environ.get(ISA_ENV, "").strip().lower() == "avx2":
        return False
    try:
        return bool(getattr(library(), probe)())
    except KernelUnavailable:
        return False


def isa() -> int:
    """The ISA the kernel runs: the CPU's widest, or `$DYSPEC_GEMM_ISA` (avx2 / avx512) where the CPU has it."""
    best = library().dyspec_best_isa()
    if best == 0:
        raise KernelUnavailable("this CPU has neither AVX2 + FMA nor AVX-512F")
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted:
        return best
    if wanted not in ISAS:
        raise KernelUnavailable(f"{ISA_ENV}={wanted!r}: expected one of {', '.join(ISAS)}")
    if ISAS[wanted] > best:
        raise KernelUnavailable(f"{ISA_ENV}={wanted} but this CPU's widest is {'avx512' if best == 2 else 'avx2'}")
    return ISAS[wanted]


def int8_isa() -> int:
    """The path the int8-activation draft kernels (q8x8.c, q4x8.c) run: 2 = AVX512-VNNI where the
    CPU has it and `$DYSPEC_GEMM_ISA` does not hold the kernels to avx2, else 1 = AVX2 (the same
    bits either way). KernelUnavailable without AVX2."""
    return 2 if isa() == 2 and has_vnni() else 1


def isa_name(code: int) -> str:
    return next(name for name, value in ISAS.items() if value == code)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.native",
                                     description="Build the small-GEMM kernel ahead of time, e.g. in an image's build stage.")
    parser.add_argument("output", type=Path, help="where to write the shared library; point $DYSPEC_KERNEL_LIBRARY at it")
    parser.add_argument("--cc", help="the C compiler (default: $CC, else gcc, else cc)")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    print(build(args.cc, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
