"""The reporting half of benchmarks.pipeline_speed: OUT/results.jsonl -> OUT/REPORT.md.

    python -m benchmarks.pipeline_speed_report [OUT]     # rewrite the report from the results
"""
from __future__ import annotations

import shlex
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.bench_stats import fmt, fmt_ratio, median, ratio_summary
from benchmarks.machine import SPEED_FLAGS, describe_markdown
from benchmarks.results_log import ResultsLog

HF_TARGET, HF_ASSISTED, SVC_AR = "target alone, in-process (HF)", "HF assisted generation", "service: autoregressive"
HF_ALL_CORES = "target alone, in-process (HF), all cores"


def label(r: dict) -> str:
    if r["system"] == "hf-target":
        return HF_TARGET
    if r["system"] == "hf-assisted":
        return HF_ASSISTED
    if r["system"] == "hf-target-all-cores":
        return HF_ALL_CORES
    if r["method"] == "autoregressive":
        return SVC_AR
    k = "untruncated" if r["draft_top_k"] == 0 else f"top-k {r['draft_top_k']}"
    serial = ", serial rounds" if r.get("serial") else ""
    return f"service: {r['method']}:{r['budget'] or 'auto'}, {k}{serial}"


def _order(labels) -> list[str]:
    fixed = [HF_TARGET, HF_ALL_CORES, SVC_AR, HF_ASSISTED]
    return [x for x in fixed if x in labels] + sorted(x for x in labels if x not in fixed)


def _per_prompt(rows, field="tokens_per_s") -> dict:
    """(set, temperature, prompt) -> {label: median over repeats of `field`}."""
    cells = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r["set"], r["temperature"], r["prompt"])][label(r)].append(r[field])
    return {k: {lab: median(v) for lab, v in d.items()} for k, d in cells.items()}


def speed_table(rows) -> list[str]:
    tps, dec = _per_prompt(rows), _per_prompt(rows, "decode_tokens_per_s")
    groups = sorted({(k[1], k[0]) for k in tps})
    sets = sorted({k[0] for k in tps})
    if len(sets) > 1:
        groups += [(t, "all sets") for t in sorted({k[1] for k in tps})]
    lines = []
    for temperature, set_name in groups:
        keys = [k for k in tps if k[1] == temperature and (set_name == "all sets" or k[0] == set_name)]
        labels = _order({lab for k in keys for lab in tps[k]})
        lines += [f"\n**{set_name}, target temperature {temperature:g}** ({len(keys)} prompts)\n",
                  "| system | tok/s (median) | decode tok/s | vs target alone (HF) | vs service autoregressive | "
                  "vs HF assisted | tok/step | greedy output = target's |", "|---|---|---|---|---|---|---|---|"]
        for lab in labels:
            def ratios(base):
                return ratio_summary([tps[k][lab] / tps[k][base] for k in keys if lab in tps[k] and base in tps[k]])
            sel = [r for r in rows if label(r) == lab and r["temperature"] == temperature
                   and (set_name == "all sets" or r["set"] == set_name)]
            steps = [r["stats"].get("steps") or r["chunks"] for r in sel]
            tps_step = sum(r["new_tokens"] for r in sel) / max(1, sum(steps))
            checked = [r["mismatch_at"] for r in sel if r["mismatch_at"] is not None]
            exact = f"{sum(m < 0 for m in checked)}/{len(checked)}" if checked else "-"
            lines.append(f"| {lab} | {fmt(median(tps[k].get(lab) for k in keys))} | "
                         f"{fmt(median(dec[k].get(lab) for k in keys))} | "
                         f"{'1 (base)' if lab == HF_TARGET else fmt_ratio(ratios(HF_TARGET))} | "
                         f"{'1 (base)' if lab == SVC_AR else fmt_ratio(ratios(SVC_AR))} | "
                         f"{'1 (base)' if lab == HF_ASSISTED else fmt_ratio(ratios(HF_ASSISTED))} | "
                         f"{tps_step:.2f} | {exact} |")
    return lines


def cost_table(rows) -> list[str]:
    """Where the time per generated token goes, against the target's own 1-token forward. Per-round
    figures skip each request's first round (it also prefills the prompt)."""
    by = defaultdict(list)
    for r in rows:
        if r["system"] == "service":
            by[label(r)].extend(r["rounds"][1:])  # ROUND_FIELDS rows
    if not by.get(SVC_AR):
        return []
    t1 = statistics.median(x[6] for x in by[SVC_AR]) / 1e6
    ar_token = sum(x[3] for x in by[SVC_AR]) / sum(1 + x[2] for x in by[SVC_AR]) / 1e6
    lines = [f"The target's handling of a 1-token round in the services: median {t1:.0f} ms (T_v(1)).", "",
             "| system | tree nodes/round | tokens/round | target ms/round (median) | T_v(B)/T_v(1) | draft ms/round (median) "
             "| round ms per generated token | vs plain decoding |", "|---|---|---|---|---|---|---|---|"]
    for lab in _order(by):
        rounds = by[lab]
        if not rounds:
            continue
        tv = statistics.median(x[6] for x in rounds) / 1e6
        per_token = sum(x[3] for x in rounds) / sum(1 + x[2] for x in rounds) / 1e6
        lines.append(f"| {lab} | {statistics.fmean(x[1] for x in rounds):.1f} | "
                     f"{statistics.fmean(1 + x[2] for x in rounds):.2f} | {tv:.0f} | {tv / t1:.2f} | "
                     f"{statistics.median(x[4] for x in rounds) / 1e6:.0f} | {per_token:.0f} | {per_token / ar_token:.2f}x time |")
    return lines


def _seconds_per_wire_byte(wire_costs: list[dict], top_k: int) -> float:
    for w in wire_costs:
        if w["draft_top_k"] == top_k:
            return (w["draft_s_per_dist"] + w["target_s_per_dist"]) / w["bytes_per_dist"]
    return float("nan")


def breakdown_table(rows, wire_costs) -> list[str]:
    by = defaultdict(list)
    for r in rows:
        if r["system"] == "service":
            by[label(r)].append(r)
    lines = ["| system | rounds | ms/round (median) | draft forwards | tree building | network + gRPC + (de)serialisation "
             "| serialisation, both sides (est.; inside the network and target-other columns) | target forward | target other (parse, verify walk, commit) | draft commit, "
             "loop | **outside model forwards** | of all: round 1's wait for the prompt's prefill (in target other) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab in _order(by):
        sel = by[lab]
        total = sum(sum(x[3] for x in r["rounds"]) for r in sel)  # round_ns
        if not total:
            continue
        s = {f: sum(r["stats"][f] for r in sel) for f in ("draft_ns", "build_ns", "verify_ns", "target_forward_ns",
                                                          "target_total_ns", "network_ns")}
        ser_ns = sum(r["bytes_to_target"] for r in sel) * _seconds_per_wire_byte(wire_costs, sel[0]["draft_top_k"]) * 1e9
        other = total - s["draft_ns"] - s["build_ns"] - s["verify_ns"]
        outside = 1 - (s["draft_ns"] + s["target_forward_ns"]) / total
        pct = lambda ns: f"{100 * ns / total:.1f}%"  # noqa: E731
        rounds = [x[3] / 1e6 for r in sel for x in r["rounds"]]
        # a request's first round waits on the target for its prompt's prefill (run at open): the target
        # counts that wait in the round's handling, so it lands in 'target other'; shown apart here
        # as the first rounds' target time beyond the median of the request's later rounds
        prefill_wait = sum(max(0, r["rounds"][0][6] - statistics.median([x[6] for x in r["rounds"][1:]] or [0]))
                           for r in sel if r["rounds"])
        lines.append(f"| {lab} | {len(rounds)} | {statistics.median(rounds):.0f} | {pct(s['draft_ns'])} | {pct(s['build_ns'])} "
                     f"| {pct(s['verify_ns'] - s['target_total_ns'])} | {pct(ser_ns)} | {pct(s['target_forward_ns'])} | "
                     f"{pct(s['target_total_ns'] - s['target_forward_ns'])} | {pct(other)} | **{100 * outside:.1f}%** | "
                     f"{pct(prefill_wait)} |")
    return lines


def overlap_table(rows) -> list[str]:
    """How much drafting ran while the target verified (dyspec.overlap), from the per-round fields
    (ROUND_FIELDS 8-12; results from before they existed have none)."""
    by = defaultdict(list)
    for r in rows:
        if r["system"] == "service" and r["method"] != "autoregressive":
            by[label(r)].extend(x for x in r["rounds"][1:] if len(x) > 12)
    lines = ["| system | rounds | drafted ahead | kept | draft time hidden behind verification | draft time wasted "
             "(abandoned guesses) | draft side idle, waiting for verdicts |", "|---|---|---|---|---|---|---|"]
    for lab in _order(by):
        rounds = by[lab]
        if not rounds:
            continue
        draft = sum(x[4] for x in rounds) or 1
        hidden = sum(x[10] for x in rounds if x[9])
        lines.append(f"| {lab} | {len(rounds)} | {100 * sum(bool(x[8]) for x in rounds) / len(rounds):.0f}% | "
                     f"{100 * sum(bool(x[9]) for x in rounds) / len(rounds):.0f}% | {100 * hidden / draft:.0f}% of draft time | "
                     f"{100 * sum(x[11] for x in rounds) / draft:.0f}% of draft time | "
                     f"{100 * sum(x[12] for x in rounds) / max(1, sum(x[3] for x in rounds)):.0f}% of round time |")
    return lines if len(lines) > 2 else ["(no overlapped rounds recorded)"]


def wire_table(rows, wire_costs) -> list[str]:
    by = defaultdict(list)
    for r in rows:
        if r["system"] == "service":
            by[label(r)].append(r)
    lines = ["| system | nodes/round | bytes to target per tree node | bytes to target per round | bytes to draft per round "
             "| serialisation ms/round (est.) |", "|---|---|---|---|---|---|"]
    for lab in _order(by):
        sel = by[lab]
        rounds = sum(len(r["rounds"]) for r in sel)
        nodes = sum(r["stats"]["drafted_tokens"] for r in sel)
        up, down = sum(r["bytes_to_target"] for r in sel), sum(r["bytes_to_draft"] for r in sel)
        ser = up * _seconds_per_wire_byte(wire_costs, sel[0]["draft_top_k"]) * 1e3 / max(1, rounds)
        lines.append(f"| {lab} | {nodes / max(1, rounds):.1f} | {f'{up / nodes:,.0f}' if nodes else '-'} | "
                     f"{up / max(1, rounds):,.0f} | {down / max(1, rounds):,.0f} | {ser:.2f} |")
    lines += ["", "Serialisation of one draft distribution (serving/wire.py on synthetic trees, best of 3; draft side = "
              "tree_to_proto + SerializeToString, target side = FromString + tree_from_proto):", "",
              "| draft top-k | entries | bytes per distribution | draft side ms | target side ms | bytes per bare node |",
              "|---|---|---|---|---|---|"]
    for w in wire_costs:
        lines.append(f"| {w['draft_top_k'] or 'untruncated'} | {w['support']:,} | {w['bytes_per_dist']:,.0f} | "
                     f"{w['draft_s_per_dist'] * 1e3:.3f} | {w['target_s_per_dist'] * 1e3:.3f} | {w['bytes_per_node']:.1f} |")
    return lines


def mismatches(rows) -> list[str]:
    bad = [r for r in rows if r["mismatch_at"] is not None and r["mismatch_at"] >= 0]
    if not bad:
        checked = sum(r["mismatch_at"] is not None for r in rows)
        return [f"All {checked} greedy (T=0) outputs equal the in-process target's greedy output token for token."]
    checked = sum(r["mismatch_at"] is not None for r in rows)
    lines = [f"{checked - len(bad)} of {checked} greedy (T=0) outputs equal the in-process target's greedy output token "
             "for token. Those that differ, with the target's own logits where they first differ (one uncached forward "
             "over the prompt and the reference's tokens before it): 'gap' = logit of the reference token - logit of the "
             "token this system chose, against the spacing of representable values at that logit in the weights' "
             "dtype. A gap of a few spacings is a near-tie that another batch shape's kernels can round the other way; "
             "a lossy verifier would show gaps of whole logits.", ""]
    for r in bad:
        m = r.get("mismatch_margin")
        where = f"- {r['set']}#{r['prompt']} {label(r)}: first difference at token {r['mismatch_at']}"
        if m:
            spacing = dtype_spacing(m["reference_logit"], r.get("dtype", "bfloat16"))
            where += (f"; gap {m['gap']:.3f} (= {m['gap'] / spacing:.1f} spacings of {spacing:g}); the reference token "
                      f"is {'' if m['reference_is_argmax'] else 'not '}the uncached forward's argmax")
        lines.append(where)
    return lines


def dtype_spacing(value: float, dtype: str) -> float:
    """Distance between adjacent representable numbers at |value| (bf16: 8 significant bits, fp32: 24)."""
    import math

    bits = 8 if dtype == "bfloat16" else 24
    return 2.0 ** (math.floor(math.log2(max(abs(value), 1e-30))) - (bits - 1))


def reduced_note(runs: list[dict]) -> list[str]:
    from benchmarks.pipeline_speed import DEFAULTS, build_parser

    lines = []
    for run in runs:
        args = vars(build_parser().parse_args(run["argv"]))
        changed = {k: args[k] for k in DEFAULTS if str(args[k]) != str(DEFAULTS[k])}
        cmd = "python -m benchmarks.pipeline_speed " + shlex.join(run["argv"])
        lines.append(f"- `{cmd.strip()}`" + (f" -- **reduced run** ({', '.join(f'{k}={v}' for k, v in changed.items())});"
                                             " the full protocol is `python -m benchmarks.pipeline_speed`" if changed else
                                             " (full protocol)"))
    return lines


def coverage_note(runs: list[dict], rows: list[dict]) -> list[str]:
    """A run stopped before its last prompt (results are kept per request) says how far it got."""
    from benchmarks.pipeline_speed import build_parser

    if not runs:
        return []
    args = build_parser().parse_args(runs[-1]["argv"])
    done = {s: len({r["prompt"] for r in rows if r["set"] == s}) for s in args.sets.split(",")}
    if min(done.values(), default=0) >= args.prompts:
        return []
    per_cell = Counter((r["set"], r["prompt"], r["temperature"]) for r in rows)  # systems that ran per cell
    partial = sum(n < max(per_cell.values()) for n in per_cell.values())
    return [f"**Stopped early**: prompts done per set: {', '.join(f'{s} {n}' for s, n in done.items())} of "
            f"{args.prompts}; " + (f"{partial} prompt x temperature cells lack some systems. " if partial else
                                   "every system ran on each of them, at every temperature. ")
            + "Rerunning the same command resumes where it stopped.", ""]


def write_report(out: Path) -> Path:
    log = ResultsLog(Path(out) / "results.jsonl")
    runs, rows, wire_costs = log.rows("run"), log.rows("request"), log.rows("wire_cost")
    if runs:  # one pair per report: the last run's
        rows = [r for r in rows if r["pair"] == runs[-1]["pair"]]
        wire_costs = [w for w in wire_costs if w["pair"] == runs[-1]["pair"]]
    seen, costs = set(), []
    for w in reversed(wire_costs):  # the latest measurement per top-k
        if w["draft_top_k"] not in seen:
            seen.add(w["draft_top_k"])
            costs.append(w)
    costs.sort(key=lambda w: w["draft_top_k"])
    last = runs[-1] if runs else None
    text = ["# End-to-end speed of the speculative pipeline (BENCHMARKS.md sections 2 and 5)", "",
            "Produced by:", *reduced_note(runs), "", *coverage_note(runs, rows)]
    if last:
        text += [f"Models: {last['pair_description']}.", "", describe_markdown(last["machine"]), ""]
        if "cpu_flags" in last["machine"]:  # recorded since 2026-12-07; speeds hold for CPUs with these flags only
            text += [f"CPU flags: {', '.join(last['machine']['cpu_flags']) or 'none of ' + ', '.join(SPEED_FLAGS)}.", ""]
        if "bfloat16" in last["pair_description"]:
            text += ["Weights in bf16, as the demo serves them on a CPU that multiplies bf16 natively (this one has "
                     "AVX512-BF16): BENCHMARKS.md section 2 asks fp32, where every forward costs about twice as much and "
                     "the pipeline ran at ~0.7x the target alone (reduced fp32 run, with untruncated draft distributions: "
                     "`benchmarks/reports/pipeline_speed/fp32_untruncated/`). In bf16 a greedy output can leave the "
                     "in-process target's at a near-tie; the Exactness section gives the target's own logit gap at each "
                     "such token.", ""]
    text += ["Target and draft run as separate processes on loopback (real gRPC, `python -m target_service` / "
             "`python -m draft_service`, one torch thread each); requests go through `DraftWorker.Generate`, and the "
             "worker reaches the target through a byte-counting proxy (benchmarks/wire_counter.py, no added delay). "
             "Each prompt is run by every system in turn, so they share the machine's noise. tok/s = generated tokens / "
             "request wall time (including session open and prefill); decode tok/s excludes everything up to the first "
             "streamed chunk. Ratios are per prompt, summarised as geometric mean [95% t-interval] (median, n prompts).",
             "", "## Speed", *speed_table(rows), "", "## Exactness", "", *mismatches(rows), "",
             "## Round-time breakdown (service rounds, all prompts and temperatures)", "",
             "Shares of the summed round time, from the worker's per-round and per-request stats (GenerationStats). "
             "'network + gRPC + (de)serialisation' is the round trip minus the target's own handling; the serialisation "
             "part is estimated from the bytes sent and the serialisation cost per byte measured below. 'Outside model "
             "forwards' = 1 - (draft forwards + target forward) / round time.", "", *breakdown_table(rows, costs), "",
             "## Overlap of drafting with verification", "",
             "Rounds after each request's first. A drafted-ahead tree was grown below the draft's guess of the "
             "previous verdict while the target verified; kept = the guess was right, so those forwards were hidden "
             "behind verification.", "", *overlap_table(rows), "",
             "## Cost per round and per token", "",
             "A tree pays off when (draft time + T_v(B)) / tokens per round < T_v(1): the verification cost curve and "
             "the draft's forwards decide the speed here.", "", *cost_table(rows), "",
             "## Bytes on the wire", "",
             "Counted on the TCP connection between worker and target (HTTP/2 + gRPC + protobuf), per request, both "
             "directions.", "", *wire_table(rows, costs), ""]
    path = Path(out) / "REPORT.md"
    path.write_text("\n".join(text) + "\n")
    return path


if __name__ == "__main__":
    from benchmarks.pipeline_speed import DEFAULT_OUT

    print(write_report(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
