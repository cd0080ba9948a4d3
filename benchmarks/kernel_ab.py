"""A panel kernel of a git revision against the working tree's, side by side in one process: ms per
pass over a set of distinct weights at each row count, one thread.
- fp32 (engine/kernels/small_gemm.c, the target's): 24 weights of 8960 x 1536 (1.32 GB, the 1.5B
  target's MLP shapes, as in issue 12's table)
- int4 (engine/kernels/q4x8.c, the draft's): 72 weights of 4864 x 896 (the 0.5B draft's MLP
  weight count, 196 MB at 4 bits: past any L3 here)

    python -m benchmarks.kernel_ab --base 9daa203~1 --out benchmarks/reports/kernel_ab/avx2_zen3
    python -m benchmarks.kernel_ab --kernel int4 --base HEAD~1 --out benchmarks/reports/kernel_ab/avx2_zen3_int4

Why one process, alternating: a shared VM's memory bandwidth drifts by 10-15% between runs, more
than a kernel change may gain. Both libraries multiply the same packed weights (the panel layout is
the same) in turn, rep by rep, so each pair of timings shares the machine's state; the ratio is taken
per pair and summarised as a geometric mean with a 95% t-interval over the pairs.

Writes OUT/results.jsonl and OUT/REPORT.md.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import bench_stats, machine

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"fp32": (24, 8960, 1536), "int4": (72, 4864, 896)}  # kernel -> (weights, out features, in features)
GEMM = {"fp32": "dyspec_gemm", "int4": "dyspec_gemm_q4x8"}  # the same arguments: isa, x, ldx, rows, panels, k, n, ...


def build_at(revision: str, folder: Path) -> Path:
    """The kernel library built from `revision`'s kernel sources, with the flags of today's build."""
    from engine import native

    sources = []
    for source in native.SOURCES:
        relative = source.relative_to(REPO).as_posix()
        listed = subprocess.run(["git", "ls-tree", "--name-only", revision, relative], cwd=REPO, capture_output=True)
        if listed.returncode == 0 and not listed.stdout.strip():  # a kernel file newer than `revision`: today's
            (folder / source.name).write_bytes(source.read_bytes())  # (the library declares all its functions)
            sources.append(folder / source.name)
            continue
        shown = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=REPO, capture_output=True)
        if shown.returncode != 0:
            raise SystemExit(f"git show {revision}:{relative} failed: {shown.stderr.decode().strip()}")
        copy = folder / source.name
        copy.write_bytes(shown.stdout)
        sources.append(copy)
    try:
        return native.build(output=folder / "base.so", sources=tuple(sources))
    except native.KernelUnavailable as error:
        raise SystemExit(f"building {revision}'s kernel failed: {error}") from None


def packed_weights(kernel: str, generator) -> list:
    """SHAPES[kernel]'s random weights packed as the serving layers pack them (Fp32Panels, Q4x8Panels),
    by this process's library: the layout both revisions read."""
    import torch

    from engine.int4_draft import Q4x8Panels
    from engine.packed_linear import Fp32Panels

    count, n, k = SHAPES[kernel]
    panels = Fp32Panels if kernel == "fp32" else Q4x8Panels
    return [panels(torch.randn(n, k, generator=generator) * 0.02) for _ in range(count)]


def one_pass(kernel: str, lib: ctypes.CDLL, isa: int, weights: list, x, y) -> float:
    """Seconds for x times every weight."""
    _, n, k = SHAPES[kernel]
    gemm = getattr(lib, GEMM[kernel])
    start = time.perf_counter()
    for weight in weights:
        status = gemm(isa, x.data_ptr(), k, x.shape[0], weight.panels.data_ptr(), k, n, None, y.data_ptr(), n, 0,
                      weight.n_panels)
        if status != 0:
            raise SystemExit(f"{GEMM[kernel]} returned {status} (isa {isa})")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=tuple(SHAPES), default="fp32")
    p.add_argument("--base", required=True, help="the git revision whose kernel is the baseline")
    p.add_argument("--rows", default="1,2,4,8,9,12,16,17,24,32,48,64", help="row counts")
    p.add_argument("--reps", type=int, default=11, help="timed passes per library and row count (after one untimed)")
    p.add_argument("--isa", choices=("avx2", "avx512"), default=None,
                   help="default: the CPU's widest (int4: avx512 = AVX512-VNNI)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import torch

    from engine import native

    torch.set_num_threads(1)
    isa = native.ISAS[args.isa] if args.isa else native.isa() if args.kernel == "fp32" else native.int8_isa()
    with tempfile.TemporaryDirectory() as folder:
        libs = {"base": native.load_library(build_at(args.base, Path(folder))), "new": native.library()}
        generator = torch.Generator().manual_seed(0)
        panels = packed_weights(args.kernel, generator)
        _, n, k = SHAPES[args.kernel]
        info = machine.describe(threads=1)
        rows_out = []
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=generator)
            y = torch.empty(rows, n)
            for lib in libs.values():
                one_pass(args.kernel, lib, isa, panels, x, y)
            times = {name: [] for name in libs}
            for _ in range(args.reps):
                for name, lib in libs.items():
                    times[name].append(one_pass(args.kernel, lib, isa, panels, x, y) * 1e3)
            speedup = bench_stats.ratio_summary([b / n for b, n in zip(times["base"], times["new"])])
            row = {"rows": rows, "base_ms": times["base"], "new_ms": times["new"], "speedup": speedup}
            rows_out.append(row)
            print(f"rows {rows:3d}: base {statistics.median(times['base']):7.1f} ms, new "
                  f"{statistics.median(times['new']):7.1f} ms, {bench_stats.fmt_ratio(speedup)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"kind": "run", "argv": argv if argv is not None else sys.argv[1:], "base": args.base,
              "kernel": args.kernel, "isa": native.isa_name(isa), "machine": info}
    with open(args.out / "results.jsonl", "w") as f:
        for record in (header, *rows_out):
            f.write(json.dumps(record) + "\n")
    write_report(args.out, header, rows_out)
    print(f"report: {args.out / 'REPORT.md'}")
    return 0


def write_report(out: Path, header: dict, rows: list[dict]) -> None:
    info = header["machine"]
    one = statistics.median(rows[0]["new_ms"]) if rows and rows[0]["rows"] == 1 else None
    kernel = header.get("kernel", "fp32")
    count, n, k = SHAPES[kernel]
    described = {"fp32": "float32 weights (1.32 GB)", "int4": "weights at 4 bits (the int4 draft kernel, 196 MB)"}
    lines = [
        f"# The {kernel} panel kernel: a revision against the working tree (benchmarks/kernel_ab.py)", "",
        f"Produced by `python -m benchmarks.kernel_ab {' '.join(header['argv'])}`.", "",
        machine.describe_markdown(info),
        f"CPU flags: {', '.join(info['cpu_flags'])}. Kernel path: {header['isa']}.", "",
        f"ms per pass over {count} distinct {n} x {k} {described[kernel]}, one thread; "
        f"base = `{header['base']}`'s kernel sources, new = the working tree's ({info['commit']}"
        f"{', uncommitted changes' if info['dirty'] else ''}), built with the same flags and run in turn on the "
        "same packed weights. Medians of the timed passes; speed-up = base / new per pair of passes, geometric "
        "mean [95% t-interval] (median, n pairs).", "",
        "| rows | base ms | new ms | speed-up | new ms / new ms at 1 row |", "|---|---|---|---|---|",
    ]
    for row in rows:
        new = statistics.median(row["new_ms"])
        lines.append(f"| {row['rows']} | {statistics.median(row['base_ms']):.1f} | {new:.1f} | "
                     f"{bench_stats.fmt_ratio(row['speedup'])} | {bench_stats.fmt(new / one) if one else '-'} |")
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
