"""REPORT.md for benchmarks.concurrency, from OUT/results.jsonl: the throughput and latency table,
the goals of issue 14 checked plainly, the greedy identity check, the budgets the joint policy chose
at each load, and a GPU projection from the measured H200 verification curve (labelled so).

    python -m benchmarks.concurrency_report OUT
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks.bench_stats import fmt, median
from benchmarks.results_log import ResultsLog

GPU_COSTS = Path(__file__).resolve().parent / "reports" / "gpu_costs" / "raw" / "gpu_costs.json"
BASELINES = ("plain-batched", "dyspec-unbatched", "hf-batched")


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                                 if f in have) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(rows: list[dict]) -> dict:
    """(system, level) -> medians over repeats of aggregate tok/s, p50/p95 latency and more."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["system"], row["level"]), []).append(row)
    out = {}
    for key, reps in cells.items():
        latencies = [[r["latency_s"] for r in rep["requests"]] for rep in reps]
        target = [rep.get("target") for rep in reps if rep.get("target")]
        rounds = sum(r["rounds"] for rep in reps for r in rep["requests"])
        out[key] = {
            "tok_s": median([rep["new_tokens"] / rep["wall_s"] for rep in reps]),
            "p50": median([percentile(lat, 0.5) for lat in latencies]),
            "p95": median([percentile(lat, 0.95) for lat in latencies]),
            "budget": statistics.fmean([r["mean_budget"] for rep in reps for r in rep["requests"]]),
            "tokens_per_round": sum(len(r["tokens"]) for rep in reps for r in rep["requests"]) / max(1, rounds),
            "rows_per_forward": (sum(t["rows_forwarded"] for t in target) / max(1, sum(t["forwards"] for t in target))
                                 if target else float("nan")),
            "rounds_per_forward": (sum(t["rounds_verified"] for t in target) / max(1, sum(t["forwards"] for t in target))
                                   if target else float("nan")),
        }
    return out


def greedy_check(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(mismatches among service systems, mismatches of hf-batched), as lines."""
    reference: dict[int, list[int]] = {}
    services, hf = [], []
    for row in sorted(rows, key=lambda r: (r["system"] == "hf-batched", r["system"] != "plain-batched")):
        for i, request in enumerate(row["requests"]):
            tokens = request["tokens"]
            if i not in reference:
                reference[i] = tokens
            elif tokens != reference[i]:
                at = next((j for j, (a, b) in enumerate(zip(tokens, reference[i])) if a != b), min(len(tokens), len(reference[i])))
                line = f"{row['system']} x{row['level']} prompt {i}: differs from token {at}"
                (hf if row["system"] == "hf-batched" else services).append(line)
    return services, hf


def gpu_projection(summary: dict, levels: list[int]) -> list[str]:
    if not GPU_COSTS.exists():
        return ["No GPU cost curve is committed (benchmarks/reports/gpu_costs/raw/gpu_costs.json): no projection."]
    data = json.loads(GPU_COSTS.read_text())
    curve = sorted((p["rows"], p["verify_greedy_s"]) for p in data["verify"].get("qwen2.5-coder-1.5b", []))
    if not curve:
        return ["The GPU cost file has no qwen2.5-coder-1.5b verification curve: no projection."]

    def t_v(rows: float) -> float:  # piecewise-linear in the measured rows, flat past the last point
        for (r0, s0), (r1, s1) in zip(curve, curve[1:]):
            if rows <= r1:
                return s0 + (s1 - s0) * max(0.0, rows - r0) / (r1 - r0)
        return curve[-1][1]

    lines = ["**Projection, not measured.** The H200's measured verification time of the Qwen2.5-Coder-1.5B shape "
             f"(bf16, random weights; benchmarks/reports/gpu_costs) for a forward of R rows, T_v(R), from {curve[0][0]} to "
             f"{curve[-1][0]} rows, applied to a batch of c sessions: plain batched decoding makes c tokens per "
             "forward of c rows; speculation makes c x (tokens per round measured above at that level on the CPU) per "
             "forward of c x (mean tree + 1) rows, assuming drafting fully hidden behind verification (overlap, and "
             "batched drafting, which is not built yet) and the batched forward costing what one forward of the same "
             "rows costs. Tokens/s:", "", "| streams | T_v(c) ms | plain batched | dyspec (CPU trees) | ratio |",
             "|---|---|---|---|---|"]
    for c in levels:
        cell = summary.get(("dyspec", c))
        plain = c / t_v(c)
        if cell is None:
            continue
        rows = c * (cell["budget"] + 1)
        spec = c * cell["tokens_per_round"] / t_v(rows)
        lines.append(f"| {c} | {t_v(c) * 1e3:.1f} | {plain:.0f} | {spec:.0f} (R = {rows:.0f}) | {spec / plain:.2f}x |")
    return lines


def write_report(out: Path) -> Path:
    out = Path(out)
    log = ResultsLog(out / "results.jsonl")
    runs = log.rows("run")
    rows = list({r["key"]: r for r in log.rows("level")}.values())
    summary = summarise(rows)
    levels = sorted({r["level"] for r in rows})
    systems = [s for s in ("dyspec", *BASELINES) if any(k[0] == s for k in summary)]
    run = runs[-1] if runs else {}
    from benchmarks.machine import describe_markdown

    lines = ["# Many users at once: throughput and latency by concurrency", "",
             f"Produced by `python -m benchmarks.concurrency {' '.join(run.get('argv', [])[1:])}`; "
             f"{run.get('pair_description', '')}; {run.get('prompt_tokens', '?')}-token prompts, "
             f"{run.get('new_tokens', '?')} new tokens per request, greedy.", ""]
    if run.get("machine"):
        lines += [describe_markdown(run["machine"]), ""]
    lines += [f"CPU flags: {cpu_flags()}.", "",
              "Systems: **dyspec** = the target batching rounds across sessions + one draft worker with the joint "
              "budget; **plain-batched** = plain decoding through the same services; **dyspec-unbatched** = the "
              "services before batching (`--no-batching` target, `--no-joint-budget` worker); **hf-batched** = "
              "transformers' batched greedy `generate` of the target alone, left-padded, in-process on every core. "
              "A level sends that many requests at once; aggregate = all new tokens / (first send to last answer); "
              "latency per request (for hf-batched every request waits for the whole batch).", "",
              "## Aggregate tokens/s, latency (s)", "",
              "| streams | " + " | ".join(f"{s} tok/s | p50 | p95" for s in systems) + " |",
              "|---|" + "---|---|---|" * len(systems)]
    for c in levels:
        cells = []
        for s in systems:
            cell = summary.get((s, c))
            cells += [fmt(cell["tok_s"]), fmt(cell["p50"]), fmt(cell["p95"])] if cell else ["-", "-", "-"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")

    lines += ["", "## What the policy chose, and how the target batched", "",
              "| streams | system | mean tree budget | tokens per round | rounds per target forward | rows per forward |",
              "|---|---|---|---|---|---|"]
    for c in levels:
        for s in ("dyspec", "dyspec-unbatched", "plain-batched"):
            cell = summary.get((s, c))
            if cell:
                lines.append(f"| {c} | {s} | {cell['budget']:.1f} | {cell['tokens_per_round']:.2f} | "
                             f"{fmt(cell['rounds_per_forward'])} | {fmt(cell['rows_per_forward'], 1)} |")

    lines += ["", "## The goals (issue 14), checked", ""]
    single = summary.get(("dyspec", 1))
    for c in levels:
        ours = summary.get(("dyspec", c))
        if ours is None:
            continue
        base = {s: summary[(s, c)]["tok_s"] for s in BASELINES if (s, c) in summary}
        if base:
            best = max(base, key=base.get)
            ratio = ours["tok_s"] / base[best]
            lines.append(f"- {c} streams: dyspec {ours['tok_s']:.2f} tok/s vs the best baseline ({best}) "
                         f"{base[best]:.2f}: {ratio:.2f}x, goal >= 1: **{'met' if ratio >= 1 else 'missed'}**.")
    ours8, off8 = summary.get(("dyspec", 8)), summary.get(("dyspec-unbatched", 8))
    if ours8 and off8:
        r = ours8["tok_s"] / off8["tok_s"]
        lines.append(f"- 8 streams vs batching off: {r:.2f}x, goal >= 2x: **{'met' if r >= 2 else 'missed'}**.")
    ours4 = summary.get(("dyspec", 4))
    if ours4 and single:
        r = ours4["p95"] / single["p95"]
        lines.append(f"- p95 latency at 4 streams / one stream's: {r:.2f}, goal <= 2: **{'met' if r <= 2 else 'missed'}**.")
    services, hf = greedy_check(rows)
    lines += ["", "## Greedy identity", "",
              ("Every service system gave every prompt the same tokens at every level." if not services else
               "**Service outputs differ** (a bug):\n" + "\n".join(f"- {m}" for m in services)),
              "",
              ("hf-batched gave the same tokens too." if not hf else
               "hf-batched (padded batches change the kernels' shapes; near-ties may break either way) differs: " +
               "; ".join(hf[:8]) + (f"; and {len(hf) - 8} more" if len(hf) > 8 else "") + ".")]
    lines += ["", "## GPU projection", "", *gpu_projection(summary, levels), ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/reports/concurrency")))
