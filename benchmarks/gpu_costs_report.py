"""REPORT.md for benchmarks.gpu_costs (shared/BENCHMARKS.md sections 3, 5 and 6).

  python -m benchmarks.gpu_costs_report RAW_DIR OUT_DIR [--tree-quality benchmarks/reports/tree_quality]

Tables of the measured cost curves, and a projection (labelled as such) of tokens per second on
the measured GPU: measured costs x the tokens per step that benchmarks.tree_quality measured on
the real Qwen pair at T=0. Nothing in the projection is a measured end-to-end speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RTTS_MS = (0, 1, 10, 50)


def interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through sorted (x, y) points, clamped at the ends."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def verify_points(rows: list[dict], key: str = "verify_greedy_s") -> list[tuple[float, float]]:
    return [(r["nodes"], r[key]) for r in rows]


def llama_full_depth(verify: dict, layers: int = 80) -> tuple[list[tuple[float, float]], str] | None:
    """Cost of the full-depth model from two slices: T(L) = a + b*L fitted per tree size."""
    slices = sorted((int(k.split("-")[2]), v) for k, v in verify.items() if k.startswith("llama2-70b-"))
    if len(slices) < 2:
        return None
    (l0, r0), (l1, r1) = slices[0], slices[-1]
    out = []
    for a, b in zip(r0, r1):
        slope = (b["verify_greedy_s"] - a["verify_greedy_s"]) / (l1 - l0)
        out.append((a["nodes"], a["verify_greedy_s"] + slope * (layers - l0)))
    return out, f"fitted from the {l0}- and {l1}-layer slices, extrapolated to {layers} layers"


def tree_quality_inputs(path: Path) -> dict:
    """T=0 means per (method, budget): tokens per step and draft forwards per round."""
    cells = defaultdict(list)
    if (path / "results.jsonl").exists():
        for line in (path / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("marker") or r.get("temperature") != 0.0:
                continue
            cells[(r["method"], r["budget"])].append(r)
    out = {}
    for key, rs in cells.items():
        out[key] = {"tokens_per_step": statistics.fmean(r["tokens_per_step"] for r in rs),
                    "calls_per_round": statistics.fmean(r["draft_calls"] / r["steps"] for r in rs), "n": len(rs)}
    return out


def project(quality: dict, target_curve, draft_curve, t_alone: float, rtt_s: float) -> list[tuple]:
    """(config, tokens/step, n, round ms, speed-up over the target alone) for configs whose draft
    forwards per round are known exactly: chain (k one-row forwards) and dyspec-layer (its
    measured forwards per round, the budget spread evenly over them)."""
    rows = []
    def order(item):
        (method, budget), _ = item
        return method, int(str(budget).removeprefix("chain"))

    for (method, budget), q in sorted(quality.items(), key=order):
        if method == "chain":
            k = int(str(budget)[5:])
            draft_s = k * interp(draft_curve, 1)
            nodes = k
        elif method == "dyspec-layer":
            calls = max(1.0, q["calls_per_round"])
            draft_s = calls * interp(draft_curve, budget / calls)
            nodes = budget
        else:
            continue
        round_s = draft_s + rtt_s + interp(target_curve, nodes)
        speedup = (q["tokens_per_step"] / round_s) / (1.0 / t_alone)
        rows.append((f"{method}:{budget}" if method != "chain" else f"chain:{nodes}", q["tokens_per_step"], q["n"],
                     1e3 * round_s, speedup))
    return rows


def write_report(raw: Path, out: Path, tree_quality: Path) -> Path:
    data = json.loads((raw / "gpu_costs.json").read_text())
    gpu = data.get("gpu") or data["device"]
    lines = ["# Cost curves on a GPU, and what they imply\n\n",
             "Produced by `python -m benchmarks.gpu_costs --out DIR` on a lent machine "
             f"({gpu}; torch {data['torch']}, transformers {data['transformers']}, {data['dtype']}), then "
             "`python -m benchmarks.gpu_costs_report benchmarks/reports/gpu_costs/raw benchmarks/reports/gpu_costs`. "
             f"Raw numbers: `raw/gpu_costs.json`, log: `raw/log.txt`. Context {data['context']} tokens; each figure is "
             "the median of several timed calls after warm-ups, synchronised with the device.\n\n",
             "Weights are random: the real checkpoints cannot reach a lent machine (no network, 64 MiB per call), and "
             "architecture and dtype, not weight values, set a forward's cost. Acceptance therefore comes from the CPU "
             "tree-quality benchmark on the real pair, and every tokens-per-second figure below is a **projection**.\n"]

    lines.append("\n## Verification cost by tree size (measured)\n\n"
                 "forward: the model forward alone. verify greedy / sampled: `HFTargetSession.forward_tree` + "
                 "`verify_tree` as a round runs them (logits stay on the GPU; greedy copies one argmax per row, "
                 "sampling copies the rows its walk visits). all rows to host: the forward plus copying every "
                 "logits row to the host, which is how verification worked before this measurement.\n")
    for name, rows in data["verify"].items():
        lines.append(f"\n### {name}\n\n| tree nodes | forward ms | verify greedy ms | verify sampled ms | "
                     "all rows to host ms |\n|---|---|---|---|---|\n")
        for r in rows:
            lines.append(f"| {r['nodes']} | {1e3 * r['forward_s']:.2f} | {1e3 * r['verify_greedy_s']:.2f} | "
                         f"{1e3 * r['verify_sampled_s']:.2f} | {1e3 * r['all_rows_to_host_s']:.2f} |\n")
    draft = data["draft"].get("qwen2.5-coder-0.5b", [])
    if draft:
        variants = [("transformers' forward", draft)]
        lean, static = data["draft"].get("qwen2.5-coder-0.5b lean"), data["draft"].get("qwen2.5-coder-0.5b lean static")
        if lean:
            variants.append(("lean forward", lean))
        if static:
            variants.append(("lean, static KV cache" + (", CUDA graphs" if data.get("draft_graphs") else
                                                        " (no graphs: not a GPU)"), static))
        lines.append("\n## Draft forward cost by batch (measured, Qwen2.5-Coder-0.5B shape)\n\n"
                     "One `HFDraftSession.logits` call for k tree nodes (rows copied to the host, where builders "
                     "warp and sample), ms.\n\n| nodes per call | " + " | ".join(v for v, _ in variants) + " |\n|---|"
                     + "---|" * len(variants) + "\n")
        for i, r in enumerate(draft):
            lines.append(f"| {r['batch']} | " + " | ".join(f"{1e3 * rows[i]['draft_s']:.2f}" for _, rows in variants)
                         + " |\n")
    if data.get("rounds"):
        lines.append("\n## Where a round's time goes (measured, 0.5B -> 1.5B shapes, random weights)\n\n"
                     "Random weights accept almost nothing, so each round emits one token; what is measured is "
                     "the split of a round's time. Outside forwards = tree building outside draft forwards + "
                     "verification walk + cache commits.\n\n| method | budget | T | draft top-k | ms per round | "
                     "mean tree size | draft forwards ms | target forward ms | outside forwards |\n"
                     "|---|---|---|---|---|---|---|---|---|\n")
        for r in data["rounds"]:
            n = r["rounds"]
            lines.append(f"| {r['method']} | {r['budget']} | {r['temperature']} | {r['draft_top_k'] or 'none'} | "
                         f"{1e3 * r['round_s_total'] / n:.1f} | {r['tree_size_mean']:.1f} | "
                         f"{1e3 * r['draft_forward_s'] / n:.1f} | {1e3 * r['target_forward_s'] / n:.1f} | "
                         f"{100 * r['outside_share']:.1f}% |\n")

    quality = tree_quality_inputs(tree_quality)
    draft_curve = [(r["batch"], r["draft_s"]) for r in draft]
    targets = []
    if "qwen2.5-coder-1.5b" in data["verify"]:
        targets.append(("Qwen2.5-Coder-1.5B (measured shape)", verify_points(data["verify"]["qwen2.5-coder-1.5b"]),
                        "the real pair's acceptance (same models)"))
    full = llama_full_depth(data["verify"])
    if full:
        targets.append((f"Llama-2-70B shape ({full[1]})", full[0],
                        "the Qwen pair's acceptance as a stand-in: no 70B pair was measured"))
    if quality and draft_curve and targets:
        lines.append("\n## Projected speed-up over the target alone (PROJECTION)\n\n"
                     "speed-up = (tokens per step / round time) / (1 / one plain decoding step), with round time = "
                     "draft forwards (from the draft curve) + RTT + verification of the tree (from the verify-greedy "
                     "curve, interpolated). Tokens per step: target T=0 means from "
                     f"`{tree_quality}/results.jsonl` (n = prompts). Only configurations whose draft forwards per round "
                     "are known are projected: chain (k one-node forwards) and dyspec-layer (its measured forwards per "
                     "round). The target alone runs next to no network (RTT applies to speculation only: the draft "
                     "sits elsewhere). Kernel-launch-bound small models and one GPU per model are assumed; the "
                     "70B projection ignores tensor-parallel all-reduces.\n")
        for title, curve, acceptance in targets:
            t_alone = interp(curve, 0)
            lines.append(f"\n### {title}; acceptance: {acceptance}\n\nTarget alone: {1e3 * t_alone:.1f} ms per token."
                         "\n\n| config | tokens/step | n | " + " | ".join(f"round ms @ {r} ms RTT | speed-up @ {r} ms"
                                                                         for r in RTTS_MS) + " |\n"
                         + "|---" * (3 + 2 * len(RTTS_MS)) + "|\n")
            per_rtt = [project(quality, curve, draft_curve, t_alone, r / 1e3) for r in RTTS_MS]
            for i, row in enumerate(per_rtt[0]):
                cells = " | ".join(f"{per_rtt[j][i][3]:.1f} | **{per_rtt[j][i][4]:.2f}x**" for j in range(len(RTTS_MS)))
                lines.append(f"| {row[0]} | {row[1]:.2f} | {row[2]} | {cells} |\n")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "REPORT.md"
    path.write_text("".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tree-quality", type=Path, default=Path("benchmarks/reports/tree_quality"))
    args = p.parse_args(argv)
    print(write_report(args.raw, args.out, args.tree_quality))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
