"""REPORT.md for benchmarks.concurrency, from OUT/results.jsonl: the throughput and latency table,
what the budget policy chose and how the target batched at each load, the goals of issue 14
checked plainly, the greedy identity check, and a GPU projection from the measured H200
verification curve (benchmarks/reports/gpu_costs), labelled as a projection.

    python -m benchmarks.concurrency_report [OUT]      # default benchmarks/reports/concurrency
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from benchmarks.bench_stats import fmt, median
from benchmarks.results_log import ResultsLog

DEFAULT_OUT = Path(__file__).resolve().parent / "reports" / "concurrency"
GPU_COSTS = Path(__file__).resolve().parent / "reports" / "gpu_costs" / "raw" / "gpu_costs.json"
GPU_MODEL = "qwen2.5-coder-1.5b"  # the target's shape in the GPU cost file
DEFAULT_ROLES = {"ours": "dyspec", "batching_off": "dyspec-unbatched", "plain": "plain-batched", "hf": "hf-batched"}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> str:
    """The flags that decide fp32/bf16 speed on these CPUs, from /proc/cpuinfo; AMX named as `amx`."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    if line is None:
        return "unknown (no flags line in /proc/cpuinfo)"
    have = set(line.split(":", 1)[1].split())
    present = [f for f in CPU_FLAGS if f in have]
    missing = [f for f in ("avx2", "avx512f", "avx512_bf16") if f not in have] + ([] if any(f.startswith("amx") for f in have)
                                                                                  else ["amx"])
    return (", ".join(present) or "none of them") + (f" (absent: {', '.join(missing)})" if missing else "")


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def summarise(rows: list[dict]) -> dict:
    """(system, level) -> medians over repeats of aggregate tok/s, p50/p95 latency and TTFT; the
    policy's mean budget and the target's batching, pooled over repeats."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["system"], row["level"]), []).append(row)
    out = {}
    for key, reps in cells.items():
        requests = [r for rep in reps for r in rep["requests"]]
        rounds = sum(r["rounds"] for r in requests)
        target = [rep["target"] for rep in reps if rep.get("target")]
        forwards = sum(t["forwards"] for t in target)
        verified = sum(t["rounds_verified"] for t in target)
        queued = [t["queued_mean"] for t in target if "queued_mean" in t]
        out[key] = {
            "repeats": len(reps),
            "tok_s": median([rep["new_tokens"] / rep["wall_s"] for rep in reps]),
            "p50": median([percentile([r["latency_s"] for r in rep["requests"]], 0.5) for rep in reps]),
            "p95": median([percentile([r["latency_s"] for r in rep["requests"]], 0.95) for rep in reps]),
            "ttft50": median([percentile([r.get("first_chunk_s") for r in rep["requests"]], 0.5) for rep in reps]),
            # per round, pooled over requests (older rows carry only the per-request mean)
            "budget": sum(r["mean_budget"] * r["rounds"] for r in requests) / rounds if rounds else float("nan"),
            "drafted": (sum(r["mean_drafted"] * r["rounds"] for r in requests) / rounds
                        if rounds and all("mean_drafted" in r for r in requests) else float("nan")),
            "tokens_per_round": sum(len(r["tokens"]) for r in requests) / rounds if rounds else float("nan"),
            "forwards": forwards / len(target) if target else float("nan"),
            "rounds_verified": verified / len(target) if target else float("nan"),
            "rows_per_forward": _ratio(sum(t["rows_forwarded"] for t in target), forwards) if target else float("nan"),
            "rounds_per_forward": _ratio(verified, forwards) if target else float("nan"),
            "batched_share": _ratio(sum(t["batched_rounds"] for t in target), verified) if target else float("nan"),
            "queued_mean": sum(queued) / len(queued) if queued else float("nan"),
        }
    return out


def greedy_check(rows: list[dict], hf: str = "hf-batched") -> tuple[list[str], list[str]]:
    """(mismatches among the service systems, mismatches of hf-batched with them), as lines. The
    reference for a prompt is the first service row holding it (plain decoding first)."""
    reference: dict[int, tuple[str, list[int]]] = {}
    services, hf_lines = [], []
    order = sorted(rows, key=lambda r: (r["system"] == hf, not r["system"].startswith("plain"), r["system"], r["level"],
                                        r.get("repeat", 0)))
    for row in order:
        for i, request in enumerate(row["requests"]):
            tokens = request["tokens"]
            if i not in reference:
                if row["system"] != hf:
                    reference[i] = (f"{row['system']} x{row['level']}", tokens)
                continue
            source, ref = reference[i]
            if tokens != ref:
                at = next((j for j, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
                line = f"{row['system']} x{row['level']} prompt {i}: differs from {source} at token {at}"
                (hf_lines if row["system"] == hf else services).append(line)
    return services, hf_lines


# --- GPU projection -------------------------------------------------------------------------------


def gpu_curve(path: Path = GPU_COSTS, model: str = GPU_MODEL, sampled: bool = False) -> list[tuple[int, float]] | None:
    """(rows, seconds) of the measured verification of one tree on the GPU, made non-decreasing
    (each point the largest time at or below its rows: the noise of a flat, launch-bound curve
    never makes a bigger forward cheaper)."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    field = "verify_sampled_s" if sampled else "verify_greedy_s"
    points = sorted((p["rows"], p[field]) for p in data.get("verify", {}).get(model, []))
    if not points:
        return None
    curve, top = [], 0.0
    for rows, s in points:
        top = max(top, s)
        curve.append((rows, top))
    return curve


def t_v(curve: list[tuple[int, float]], rows: float) -> float:
    """Piecewise linear in the measured points; past the last one, in proportion to rows (a
    pessimistic bound: the measured curve is still flat there)."""
    if rows <= curve[0][0]:
        return curve[0][1]
    for (r0, s0), (r1, s1) in zip(curve, curve[1:]):
        if rows <= r1:
            return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
    return curve[-1][1] * rows / curve[-1][0]


def gpu_projection(summary: dict, levels: list[int], roles: dict, temperature: float = 0.0) -> list[str]:
    curve = gpu_curve(sampled=temperature > 0)
    rel = "benchmarks/reports/gpu_costs/raw/gpu_costs.json"
    if curve is None:
        return [f"No measured GPU verification curve of the {GPU_MODEL} shape was found ({rel} is absent or holds "
                "none), so there is no projection."]
    data = json.loads(GPU_COSTS.read_text())
    device = data.get("gpu") or data.get("device") or "GPU"
    ours, off = roles.get("ours"), roles.get("batching_off")
    lines = ["**Projection, not measured.** Inputs: the measured verification time T_v(R) of one forward of R rows "
             f"on the {device} for the {GPU_MODEL} shape ({data.get('dtype', '?')}, random weights, context "
             f"{data.get('context', '?')}; {rel}, {'sampled' if temperature > 0 else 'greedy'} verification), "
             f"{curve[0][0]} to {curve[-1][0]} rows, made non-decreasing, linear between points and proportional to R "
             "past the last one; and from this CPU run, at each level, the tokens per round per session and the mean "
             "tree size the policy chose. A batch of c sessions is one forward of all their rounds: plain batched "
             "decoding makes c tokens per T_v(c); speculation c x (tokens per round) per T_v(c x (mean tree + 1)); "
             "batching off runs the c rounds one after the other, c x (tokens per round) per c x T_v(tree + 1). "
             "Assumed: drafting fully hidden behind verification (overlap; the draft is batched on its own device), "
             "no network time, a batched forward of R rows costing what one tree of R rows costs. The trees are the "
             "ones chosen for CPU costs; on a GPU, where rows are nearly free, the policy would choose larger ones.", "",
             "| streams | plain batched: T_v(c) ms | tok/s | ours: tokens/round | rows R | T_v(R) ms | tok/s | "
             "vs plain | batching off tok/s | ours vs off |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in levels:
        cell = summary.get((ours, c))
        if cell is None or math.isnan(cell["tokens_per_round"]):
            continue
        plain = c / t_v(curve, c)
        tree = cell["drafted"] if not math.isnan(cell["drafted"]) else cell["budget"]
        rows = c * (tree + 1)
        spec = c * cell["tokens_per_round"] / t_v(curve, rows)
        off_cell = summary.get((off, c))
        if off_cell is not None and not math.isnan(off_cell["tokens_per_round"]):
            off_tree = off_cell["drafted"] if not math.isnan(off_cell["drafted"]) else off_cell["budget"]
            off_tok = off_cell["tokens_per_round"] / t_v(curve, off_tree + 1)
            off_text, vs_off = f"{off_tok:.0f}", f"{spec / off_tok:.2f}x"
        else:
            off_text = vs_off = "-"
        lines.append(f"| {c} | {t_v(curve, c) * 1e3:.1f} | {plain:.0f} | {cell['tokens_per_round']:.2f} | {rows:.0f} | "
                     f"{t_v(curve, rows) * 1e3:.1f} | {spec:.0f} | {spec / plain:.2f}x | {off_text} | {vs_off} |")
    return lines


# --- the report -----------------------------------------------------------------------------------


def goal_lines(summary: dict, levels: list[int], roles: dict) -> list[str]:
    ours, off, plain, hf = roles.get("ours"), roles.get("batching_off"), roles.get("plain"), roles.get("hf")
    baselines = [s for s in (off, plain, hf) if s]
    lines = [f"Ours = **{ours}**; baselines: {', '.join(baselines)}.", "",
             "| streams | ours tok/s | best baseline | its tok/s | ours / best | goal >= 1 | ours / batching off |",
             "|---|---|---|---|---|---|---|"]
    misses, met = [], []
    for c in levels:
        cell = summary.get((ours, c))
        if cell is None:
            continue
        base = {s: summary[(s, c)]["tok_s"] for s in baselines if (s, c) in summary}
        if base:
            best = max(base, key=base.get)
            r = cell["tok_s"] / base[best]
            verdict = "met" if r >= 1 else "missed"
            (met if r >= 1 else misses).append(f"{c} streams >= best baseline")
            best_text = f"{best} | {base[best]:.2f} | {r:.2f}x | **{verdict}**"
        else:
            best_text = "- | - | - | not measured"
        r_off = _ratio(cell["tok_s"], summary[(off, c)]["tok_s"]) if (off, c) in summary else float("nan")
        lines.append(f"| {c} | {cell['tok_s']:.2f} | {best_text} | {fmt(r_off)}{'x' if not math.isnan(r_off) else ''} |")
    lines.append("")
    ours8, off8 = summary.get((ours, 8)), summary.get((off, 8))
    if ours8 and off8:
        r = ours8["tok_s"] / off8["tok_s"]
        (met if r >= 2 else misses).append("8 streams >= 2x batching off")
        lines.append(f"- At 8 streams ours is {r:.2f}x the batching-off figure ({ours8['tok_s']:.2f} vs "
                     f"{off8['tok_s']:.2f} tok/s); goal >= 2x: **{'met' if r >= 2 else 'missed'}**.")
    else:
        lines.append("- 8 streams vs batching off: not measured (both systems at 8 streams are needed).")
    one, four = summary.get((ours, 1)), summary.get((ours, 4))
    if one and four:
        r = four["p95"] / one["p95"]
        (met if r <= 2 else misses).append("p95 at 4 streams <= 2x one stream's")
        lines.append(f"- p95 latency at 4 streams is {r:.2f}x a single stream's ({four['p95']:.2f} s vs "
                     f"{one['p95']:.2f} s); goal <= 2x: **{'met' if r <= 2 else 'missed'}**.")
    else:
        lines.append("- p95 latency at 4 streams vs one stream: not measured (levels 1 and 4 are needed).")
    lines += ["", (f"**All {len(met)} goals checked were met.**" if not misses else
                   f"**Missed: {'; '.join(misses)}.** Met: {'; '.join(met) if met else 'none'}.")]
    return lines


def write_report(out: Path) -> Path:
    from benchmarks.machine import describe_markdown

    out = Path(out)
    log = ResultsLog(out / "results.jsonl")
    runs = log.rows("run")
    rows = list({r["key"]: r for r in log.rows("level")}.values())  # the latest row per key
    run = runs[-1] if runs else {}
    summary = summarise(rows)
    levels = sorted({r["level"] for r in rows})
    roles = {**DEFAULT_ROLES, **run.get("roles", {})}
    present = {r["system"] for r in rows}
    order = [roles["ours"], *sorted(s for s in present if s not in roles.values() and not s.endswith("-unbatched")),
             roles["plain"], roles["batching_off"], *sorted(s for s in present if s.endswith("-unbatched")
                                                             and s != roles["batching_off"]), roles["hf"]]
    systems = list(dict.fromkeys(s for s in order if s in present))
    # the first version of this benchmark recorded no settings block and was greedy only (temperature 0)
    legacy = bool(run) and "settings" not in run
    temperature = float(run.get("temperature", 0.0))
    repeats = sorted({c["repeats"] for c in summary.values()})
    configs = run.get("configs", {})
    requests = [q for r in rows if r["system"] != roles["hf"] for q in r["requests"]]
    short = sum(len(q["tokens"]) < run.get("new_tokens", 0) for q in requests)
    if not legacy:
        eos = "EOS ignored"
    else:
        eos = ("that version did not ask the services to ignore EOS; " +
               (f"{short} of {len(requests)} service requests stopped early" if short
                else "every request still made all of them"))
    settings = (f"{run.get('pair_description', '')}; {run.get('prompt_tokens', '?')}-token prompts"
                f"{' from the set(s) ' + run['settings']['sets'] if not legacy else ' (prompt set not recorded)'}, "
                f"{run.get('new_tokens', '?')} new tokens per request ({eos}), target temperature {temperature:g}; " +
                (f"medians over {'/'.join(map(str, repeats))} repeat{'' if repeats == [1] else 's'} of each level"
                 if repeats else "no results") + ".")
    lines = ["# Many users at once: throughput and latency by concurrency", ""]
    flags, source = run.get("cpu_flags"), ""
    if flags is None:  # older rows: a note row may carry the measuring machine's flags, with where they come from
        note = next((r for r in log.rows("note") if r.get("run_started") == run.get("started") and r.get("cpu_flags")), None)
        if note is not None:
            flags, source = note["cpu_flags"], f"; not in the run's own record but {note['source']}"
    if legacy:
        cpu = run.get("machine", {}).get("cpu", "a machine not recorded")
        avx512 = " (AVX-512)" if flags and "avx512f" in flags.split(", ") else ""
        argv = " ".join(run.get("argv", [])[1:])  # that version logged sys.argv, the script's path first
        lines += [f"**An earlier run on an {cpu}{avx512}, made with an earlier version of this benchmark** (started as "
                  f"`python -m benchmarks.concurrency {argv}` with that version's defaults; the code is named under "
                  "Machine below), re-rendered by the current `python -m benchmarks.concurrency_report "
                  f"{out}`. Its settings, read from the rows (`results.jsonl`): {settings} The current version "
                  "measures with other defaults and records more per request (TTFT of hf-batched, per-round budgets, "
                  "drafted nodes, the target's queue); a '-' below is a figure these rows do not hold. Rerun with "
                  "`python -m benchmarks.concurrency --pair qwen --fresh` to replace them.", ""]
    else:
        lines += [f"Produced by `{run.get('command', '?')}`, then `python -m benchmarks.concurrency_report {out}` "
                  f"(rows: `results.jsonl`). {settings}", ""]
    if run.get("machine"):
        lines += [describe_markdown(run["machine"]), ""]
    lines += [f"CPU flags of the measuring machine: {flags}{source}. Figures hold for CPUs with these flags only."
              if flags else "CPU flags of the measuring machine: not recorded with these rows.", "",
              "Systems (each warmed up with one short request before timing; one target process at a time):", ""]
    describe = {
        roles["ours"]: "ours: the target batching rounds of many sessions into one forward + one draft worker, "
                       "budget chosen by the worker's policy (joint budget across its sessions)",
        roles["plain"]: "plain decoding through the same services (method autoregressive, one token per round), "
                        "batched on the target",
        roles["batching_off"]: "the same speculative config on a `--no-batching` target, worker with "
                               "`--no-joint-budget` (the services before batching)",
        roles["hf"]: "transformers' batched `generate` of the target alone, left-padded, batch = the level, "
                     "in-process on every core, the same weights",
    }
    for s in systems:
        config = f" (config `{configs[s]}`)" if configs.get(s) else ""
        lines.append(f"- **{s}**{config}: {describe.get(s, 'another service config')}.")
    lines += ["", "A level sends that many requests at once, each with its own prompt; aggregate tok/s = all new tokens / "
              "(first send to last answer); latency per request, send to last token (for hf-batched every request "
              "waits for its whole batch); TTFT = time to the first token.", "",
              "## Aggregate tokens/s, latency (s)", "",
              "| streams | " + " | ".join(f"{s} tok/s | p50 | p95" for s in systems) + " |",
              "|---|" + "---|---|---|" * len(systems)]
    for c in levels:
        cells = []
        for s in systems:
            cell = summary.get((s, c))
            cells += [fmt(cell["tok_s"]), fmt(cell["p50"]), fmt(cell["p95"])] if cell else ["-", "-", "-"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Time to first token, p50 (s):", "", "| streams | " + " | ".join(systems) + " |",
              "|---|" + "---|" * len(systems)]
    for c in levels:
        lines.append(f"| {c} | " + " | ".join(fmt(summary[(s, c)]["ttft50"]) if (s, c) in summary else "-"
                                             for s in systems) + " |")

    lines += ["", "## What the policy chose, and how the target batched", "",
              "Mean budget: the tree budget the worker chose per round (its per-round stats), averaged over rounds; "
              "drafted: tree nodes actually drafted. Target counters are differences of its Stats before and after "
              "the level (warm-up excluded); batched share = rounds verified in a forward shared with another "
              "session's round; queue = rounds waiting for the model thread, sampled every 0.25 s.", "",
              "| streams | system | mean budget | drafted | tokens per round | rounds | forwards | rounds per forward | "
              "rows per forward | batched share | mean queue |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in levels:
        for s in systems:
            cell = summary.get((s, c))
            if cell and s != roles["hf"]:
                lines.append(f"| {c} | {s} | {fmt(cell['budget'], 1)} | {fmt(cell['drafted'], 1)} | "
                             f"{fmt(cell['tokens_per_round'])} | {fmt(cell['rounds_verified'], 0)} | "
                             f"{fmt(cell['forwards'], 0)} | {fmt(cell['rounds_per_forward'])} | "
                             f"{fmt(cell['rows_per_forward'], 1)} | {fmt(cell['batched_share'])} | "
                             f"{fmt(cell['queued_mean'], 1)} |")

    lines += ["", "## The goals (issue 14), checked", "", *goal_lines(summary, levels, roles)]

    lines += ["", "## Greedy identity", ""]
    if temperature != 0:
        lines.append(f"Not checked: the target sampled at temperature {temperature:g}.")
    else:
        services, hf = greedy_check(rows, roles["hf"])
        lines.append("Every service system gave every prompt the same tokens at every level." if not services else
                     f"**Service outputs differ ({len(services)} requests; a bug: greedy output must not depend on the "
                     "system or the load):**\n" + "\n".join(f"- {m}" for m in services))
        lines.append("")
        if roles["hf"] not in present:
            lines.append("hf-batched was not run.")
        else:
            lines.append("hf-batched gave the same tokens too." if not hf else
                         f"hf-batched differs in {len(hf)} requests (reported, not a failure: padded batches change the "
                         "kernels' shapes, so near-ties may break either way): " + "; ".join(hf[:8]) +
                         (f"; and {len(hf) - 8} more" if len(hf) > 8 else "") + ".")
    lines += ["", "## GPU projection (projection, not measured)", "",
              *gpu_projection(summary, levels, roles, temperature), ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
