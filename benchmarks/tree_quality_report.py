"""The reporting half of benchmarks.tree_quality: tables with 95% intervals and a plot."""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict

from benchmarks.tree_quality import METHODS


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% t-interval over prompts."""
    from scipy.stats import t

    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def load(out, sweep: bool = False) -> list[dict]:
    """The main protocol's rows, or (sweep=True) the draft-temperature sweep's."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] if (out / "results.jsonl").exists() else []
    return [r for r in rows if not r.get("marker") and not r.get("timing") and ("draft_temperature" in r) == sweep]


def per_prompt_at(rows, method: str, budget: int) -> dict[tuple[str, int], float]:
    """(set, prompt) -> tokens per step of one method at one budget; chain: its best length k <= budget
    (chosen on the mean over these prompts, as the tables do)."""
    if method != "chain":
        return {(r["set"], r["prompt"]): r["tokens_per_step"] for r in rows
                if r["method"] == method and r["budget"] == budget}
    by_k = defaultdict(dict)
    for r in rows:
        if r["method"] == "chain" and isinstance(r["budget"], str) and int(r["budget"][5:]) <= budget:
            by_k[r["budget"]][(r["set"], r["prompt"])] = r["tokens_per_step"]
    return max(by_k.values(), key=lambda v: statistics.fmean(v.values()), default={})


def draft_temperature_table(main_rows, sweep_rows, main_temperature: float) -> str:
    """T=0 tokens per step at the sweep's budget for each draft temperature, on the sweep's prompts
    (the main draft temperature's from the main rows, same prompts), the best one per method and
    its paired ratio to the main one."""
    from benchmarks.bench_stats import ratio_summary

    if not sweep_rows:
        return ""
    budget = next(r["budget"] for r in sweep_rows if not isinstance(r["budget"], str))
    prompts = {(r["set"], r["prompt"]) for r in sweep_rows}
    main = [r for r in main_rows if r["temperature"] == 0.0 and (r["set"], r["prompt"]) in prompts]
    by_temp = {main_temperature: main}
    for r in sweep_rows:
        by_temp.setdefault(r["draft_temperature"], []).append(r)
    temps = sorted(by_temp)
    lines = [f"| method | " + " | ".join(f"draft T={t:g}" for t in temps) + f" | best | best / T={main_temperature:g} |",
             "|---" * (len(temps) + 3) + "|"]
    for m in METHODS:
        values = {t: per_prompt_at(by_temp[t], m, budget) for t in temps}
        if not all(values.values()):
            continue
        cells, means = [], {}
        for t in temps:
            mu, hw = mean_ci(list(values[t].values()))
            means[t] = mu
            cells.append(f"{mu:.2f} ± {hw:.2f}")
        best = max(means, key=means.get)
        common = values[best].keys() & values[main_temperature].keys()
        st = ratio_summary([values[best][k] / values[main_temperature][k] for k in common])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {best:g} | {st['geomean']:.2f} [{st['lo']:.2f}, {st['hi']:.2f}] |")
    per_set = max(sum(1 for (ss, _) in prompts if ss == s) for s, _ in prompts)
    return (f"\n## Draft temperature (target T=0, B={budget}, {len(prompts)} prompts: the first {per_set} of each set)\n\n"
            "Tokens per step, mean ± 95% t-interval over the same prompts; the best draft temperature per method and "
            "its ratio to the main one, paired by prompt (geometric mean [95% interval]). Sequoia's tree is rebuilt from "
            "an acceptance vector measured at each draft temperature.\n\n" + "\n".join(lines) + "\n")


def timings(out) -> list[dict]:
    """Wall time of each pooled group of prompts (recorded from this session's code on)."""
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r.get("timing")]


def _budget_key(b):
    return (1, int(b[5:])) if isinstance(b, str) else (0, b)


def table(rows, temperature, sets=None) -> tuple[str, dict]:
    cells = defaultdict(list)
    for r in rows:
        if r["temperature"] == temperature and (sets is None or r["set"] in sets):
            cells[(r["method"], r["budget"])].append(r["tokens_per_step"])
    if not cells:
        return "(no results)\n", {}
    budgets = sorted({b for (_, b) in cells if not isinstance(b, str)}, key=_budget_key)
    methods = [m for m in [*METHODS, "autoregressive"] if any(k[0] == m for k in cells)]
    lines = ["| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    summary = {}
    for m in methods:
        row = []
        for b in budgets:
            xs = cells.get((m, b))
            if m == "chain":
                # chain: the best length k <= B, chosen per budget on the means (BENCHMARKS.md: best k)
                options = [(statistics.fmean(v), v) for (mm, bb), v in cells.items()
                           if mm == "chain" and isinstance(bb, str) and int(bb[5:]) <= b]
                xs = max(options)[1] if options else None
            if m == "autoregressive":
                xs = cells.get((m, budgets[0])) if b == budgets[0] else None
            if not xs:
                row.append("-")
                continue
            mu, hw = mean_ci(xs)
            summary[(m, b)] = mu
            row.append(f"{mu:.2f} ± {hw:.2f} (n={len(xs)})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n", summary


def paired_ordering(rows, temperature, budget=64) -> str:
    """The paper's ordering at one budget, per prompt: ratio of tokens per step of each pair of
    methods on the same prompt (geometric mean, 95% t-interval over prompts). Pairing removes the
    prompt-to-prompt spread that makes the unpaired intervals above wide."""
    from benchmarks.bench_stats import ratio_summary

    per_prompt = defaultdict(dict)
    for r in rows:
        if r["temperature"] == temperature and r["budget"] == budget:
            per_prompt[(r["set"], r["prompt"])][r["method"]] = r["tokens_per_step"]
    pairs = [("dyspec", "sequoia"), ("sequoia", "specinfer"), ("dyspec", "specinfer"), ("dyspec-layer", "sequoia"),
             ("best-first", "dyspec"), ("dyspec-layer", "dyspec")]
    lines = [f"| pair (B={budget}) | ratio of tokens per step, geometric mean [95% interval] | median | prompts | "
             "holds on every prompt |", "|---|---|---|---|---|"]
    for a, b in pairs:
        ratios = [m[a] / m[b] for m in per_prompt.values() if a in m and b in m and m[b] > 0]
        if not ratios:
            continue
        st = ratio_summary(ratios)
        lines.append(f"| {a} / {b} | {st['geomean']:.2f} [{st['lo']:.2f}, {st['hi']:.2f}] | {st['median']:.2f} | "
                     f"{st['n']} | {'yes' if min(ratios) >= 1 else 'no'} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plot(rows, out) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    temps = sorted({r["temperature"] for r in rows})
    if not temps:
        return None
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.5), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        _, summary = table(rows, temp)
        for m in METHODS:
            pts = sorted((b, v) for (mm, b), v in summary.items() if mm == m)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree budget (nodes)")
        ax.set_ylabel("tokens per target step")
        ax.set_title(f"Qwen2.5-Coder 0.5B -> 1.5B, target T={temp}")
        ax.grid(alpha=0.3)
        ax.legend()
    path = out / "tokens_per_step.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def write_report(out, args) -> None:
    rows = load(out)
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").exists() else []
    from benchmarks.machine import describe

    machine = describe()
    parts = ["# Tree quality: tokens per target step\n\n",
             "Produced by these runs of one command (results accumulate in results.jsonl):\n\n"
             + "".join(f"    {c}\n" for c in commands) + "\n"
             f"on {machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}), Qwen2.5-Coder-0.5B-Instruct draft -> "
             f"Qwen2.5-Coder-1.5B-Instruct target ({args.dtype} weights, converted from Q4_K_M GGUF), draft "
             f"temperature {args.draft_temperature}, untruncated draft. Tokens per step = accepted draft tokens + the bonus token, averaged over "
             "rounds; ± is a 95% t-interval over prompts. Chain reports its best length k <= B "
             "(k in 2..16 at T=0; 4 and 8 at T=0.6). At T=0 every method is scored exactly against the target's greedy continuation "
             f"({args.new_tokens} new tokens after {args.prompt_tokens}-token prompts); at T=0.6 the target verifies "
             "every tree.\n"]
    parts.append("\nHow T=0 is scored: the target's greedy continuation is computed once per prompt; each (method, "
                 "budget) run builds its trees as `dyspec.generate` would (same builders, same coins per position) and a "
                 "round accepts the longest tree path that follows the continuation, which is what greedy verification "
                 "accepts (tests/test_tree_quality_scoring.py checks this against real verification, and that the pooled "
                 "scoring below builds the same trees as one run at a time). Draft logits for tree nodes on the "
                 "continuation come from one prefill; all runs of a few prompts of every set are in flight together and "
                 "their other draft requests are pooled into shared forwards (benchmarks/tree_quality_batched.py); "
                 "builders whose trees are nested in the budget build one tree per position, at the largest budget of "
                 "the runs that may still reach it.\n")
    parts.append("\nHow T=0.6 is run: the target verifies every tree with the sampling verifier of each builder. The "
                 "first prompt of each set runs `dyspec.generate` one run at a time (timed per round, below); the "
                 "other prompts run `generate`'s loop with every run of a few prompts of every set in flight together "
                 "(benchmarks/tree_quality_verified.py): the target forwards only the nodes the verification walk "
                 "visits (the root, then each accepted node) rather than the whole tree, and all runs' draft and "
                 "target rows are pooled into shared forwards. Same builders, seeds and streams, so the same tokens and "
                 "accepted counts as `generate` (tests/test_tree_quality_verified.py checks every method against it).\n")
    for temp, label in ((0.0, "T=0"), (0.6, "T=0.6")):
        seen = {(r["set"], r["prompt"]) for r in rows if r["temperature"] == temp}
        per_set = {s: sum(1 for (ss, _) in seen if ss == s) for s in args.sets.split(",")}
        tokens = args.new_tokens if temp == 0.0 else args.t06_new_tokens
        if min(per_set.values(), default=0) < 10 or tokens < 64:
            parts.append(f"\n**{label} is not the full protocol yet**: prompts per set "
                         + ", ".join(f"{s} {n}" for s, n in per_set.items()) + f", {tokens} new tokens (the protocol: "
                         "10 per set, 64 tokens). Rerunning `python -m benchmarks.tree_quality` resumes where it stopped; "
                         "cells with n=1 have no interval, and orderings not separated by the intervals are not "
                         "established.\n")
    for temp in (0.0, 0.6):
        text, _ = table(rows, temp)
        parts.append(f"\n## Target temperature {temp}, all prompt sets\n\n{text}")
        paired = paired_ordering(rows, temp)
        if paired:
            parts.append(f"\nThe paper's ordering (DySpec >= Sequoia >= SpecInfer at B=64), paired by prompt:\n\n{paired}")
        for s in args.sets.split(","):
            text, _ = table(rows, temp, {s})
            parts.append(f"\n### {temp}, {s}\n\n{text}")
    parts.append(draft_temperature_table(rows, load(out, sweep=True), args.draft_temperature))
    t06 = [r for r in rows if r["temperature"] == 0.6 and r["method"] != "autoregressive" and "outside_share_median" in r]
    if t06:
        shares = sorted(r["outside_share_median"] for r in t06)
        parts.append("\n## Time outside model forwards (T=0.6 runs of `generate`, one at a time)\n\nPer round: (tree building outside draft "
                     "forwards + verification walk + cache commits) / round time. Median over runs of the per-run "
                     f"median: {100 * shares[len(shares) // 2]:.2f}% (min {100 * shares[0]:.2f}%, "
                     f"max {100 * shares[-1]:.2f}%, {len(shares)} runs).\n")
    timed = timings(out)
    if timed:
        parts.append("\n## Cost on this machine\n\nWall time of the pooled groups (each: some prompts of every set, "
                     "every method and budget, in flight together), as recorded:\n\n"
                     "| temperature | groups | prompts | median per prompt | total |\n|---|---|---|---|---|\n")
        whole_min = 0.0
        for temp in sorted({r["temperature"] for r in timed}):
            group = [r for r in timed if r["temperature"] == temp]
            per_prompt = sorted(r["seconds"] / r["prompts"] for r in group)
            median = per_prompt[len(per_prompt) // 2] / 60
            whole_min += median * len({(r["set"], r["prompt"]) for r in rows if r["temperature"] == temp})
            parts.append(f"| {temp} | {len(group)} | {sum(r['prompts'] for r in group)} | "
                         f"{median:.1f} min | {sum(r['seconds'] for r in group) / 60:.0f} min |\n")
        parts.append(f"\nAt the median rates, every prompt of this report takes about {whole_min / 60:.1f} h on this "
                     "machine, pooled (the first prompt of each set, run one at a time for the timing table, costs more). "
                     "BENCHMARKS.md asks for about two hours: the draft's forwards are the floor here (a 128- or "
                     "256-node tree is dozens of sequential draft forwards on a 2-core CPU), so a two-hour run is about "
                     "half the prompts.\n")
    acc = out / "sequoia_acceptance.json"
    if acc.exists():
        parts.append("\n## Sequoia's measured positional acceptance vector (calibration prompts, disjoint)\n\n```\n"
                     + acc.read_text() + "\n```\n")
    name = plot(rows, out)
    if name:
        parts.append(f"\n![tokens per step]({name})\n")
    (out / "REPORT.md").write_text("".join(parts))
