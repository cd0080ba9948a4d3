"""benchmarks.concurrency end to end on the tiny pair: every system (the speculative config and
plain decoding on the batching target, the speculative config with batching off, transformers'
batched generate) runs at levels 1 and 2; one results line per (system, level, repeat), every
request makes its tokens, greedy outputs agree across systems and levels, and the report names the
table, the goals and the projection. Plus the pure parts: configs, systems, percentiles, the GPU
curve, and a rerun into the same folder (skips what is there, refuses other settings)."""
from __future__ import annotations

import json

import pytest

from benchmarks import concurrency, concurrency_report

pytestmark = pytest.mark.e2e

NEW_TOKENS = 8


def run(out, *extra):
    args = concurrency.build_parser().parse_args(
        ["--tiny", "--levels", "1,2", "--new-tokens", str(NEW_TOKENS), "--prompt-tokens", "16", "--out", str(out), *extra])
    return concurrency.measure(args, progress=lambda *_: None)


def test_the_concurrency_benchmark_runs_every_system_and_reports(tmp_path):
    report = run(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    systems = ["dyspec", "plain-batched", "dyspec-unbatched", "hf-batched"]
    levels = [(r["system"], r["level"], r["repeat"]) for r in rows if r["kind"] == "level"]
    assert sorted(levels) == sorted((s, c, 0) for s in systems for c in (1, 2)), "one line per system, level, repeat"
    (run_row,) = [r for r in rows if r["kind"] == "run"]
    assert run_row["roles"]["ours"] == "dyspec" and run_row["roles"]["batching_off"] == "dyspec-unbatched"
    for row in rows:
        if row["kind"] != "level":
            continue
        assert len(row["requests"]) == row["level"]
        assert all(len(r["tokens"]) == NEW_TOKENS for r in row["requests"]), "EOS ignored: every request makes its tokens"
        assert all(0 < r["first_chunk_s"] <= r["latency_s"] for r in row["requests"])
        if row["system"] != "hf-batched":
            t = row["target"]
            assert t["rounds_verified"] >= row["level"] and t["forwards"] >= 1 and t["rows_forwarded"] >= t["forwards"]
            assert all(r["rounds"] == len(r["budgets"]) >= 1 for r in row["requests"]), "per-round budgets recorded"
            if row["system"] == "plain-batched":
                assert all(b == 0 for r in row["requests"] for b in r["budgets"]) and t["rounds_verified"] == NEW_TOKENS * row["level"]
            if row["system"] == "dyspec-unbatched":
                assert t["batched_rounds"] == 0, "--no-batching: no forward shared by two sessions"
    tokens = {}
    for row in rows:  # greedy identity, checked here too
        if row["kind"] == "level" and row["system"] != "hf-batched":
            for i, r in enumerate(row["requests"]):
                assert tokens.setdefault(i, r["tokens"]) == r["tokens"], (row["system"], row["level"], i)
    text = report.read_text()
    for heading in ("## Aggregate tokens/s, latency (s)", "## What the policy chose, and how the target batched",
                    "## The goals (issue 14), checked", "## Greedy identity", "## GPU projection (projection, not measured)"):
        assert heading in text, heading
    assert f"Produced by `{run_row['command']}`" in text and "EOS ignored" in text
    assert "Machine: " in text and f"CPU flags of the measuring machine: {run_row['cpu_flags']}." in text
    assert "Every service system gave every prompt the same tokens at every level." in text
    assert "**met**" in text or "**missed**" in text
    assert "Projection, not measured" in text or "no projection" in text

    # a rerun into the same folder measures nothing again; other settings are refused
    assert run(tmp_path).exists()
    again = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "level" for r in again) == len(levels)
    with pytest.raises(SystemExit, match="other settings"):
        run(tmp_path, "--temperature", "0.5")


def test_configs_systems_and_roles():
    configs = concurrency.parse_configs("dyspec:auto,chain:4,autoregressive")
    assert configs == [("dyspec", 0), ("chain", 4), ("autoregressive", 0)]
    systems = concurrency.plan_systems(configs)
    assert [s.name for s in systems] == ["dyspec", "chain:4", "plain-batched", "dyspec-unbatched", "chain:4-unbatched",
                                         "hf-batched"]
    assert systems[3].target_flags == ["--no-batching"] and systems[3].worker_flags == ["--no-joint-budget"]
    assert concurrency.roles(systems) == {"ours": "dyspec", "batching_off": "dyspec-unbatched", "plain": "plain-batched",
                                          "hf": "hf-batched"}
    assert [s.name for s in concurrency.plan_systems(configs, "unbatched,hf")] == [
        "dyspec-unbatched", "chain:4-unbatched", "hf-batched"]
    for bad in ("nosuch:4", "dyspec:0", "dyspec:x", ""):
        with pytest.raises(SystemExit):
            concurrency.parse_configs(bad)


def test_report_helpers(tmp_path):
    assert concurrency_report.percentile([1, 2, 3, 4], 0.5) == 2.5
    assert concurrency_report.percentile([5], 0.95) == 5
    costs = tmp_path / "gpu_costs.json"
    costs.write_text(json.dumps({"verify": {"m": [{"rows": r, "verify_greedy_s": s} for r, s in
                                                  ((8, 0.03), (1, 0.02), (2, 0.018))]}}))
    curve = concurrency_report.gpu_curve(costs, "m")
    assert curve == [(1, 0.02), (2, 0.02), (8, 0.03)], "sorted by rows, never cheaper for more rows"
    assert concurrency_report.gpu_curve(tmp_path / "absent.json") is None
    assert concurrency_report.t_v(curve, 5) == pytest.approx(0.025)
    assert concurrency_report.t_v(curve, 16) == pytest.approx(0.06)
    flags = concurrency_report.cpu_flags("flags\t\t: fpu avx2 fma avx512f\n")
    assert flags.startswith("avx2, fma, avx512f") and "avx512_bf16" in flags and "amx" in flags


def test_report_of_rows_from_the_first_version_says_so(tmp_path):
    """Rows of the first version (a run record without settings, no per-round budgets) render with
    their own settings, marked as an earlier run, and what they lack shown as missing."""
    machine = {"cpu": "AMD EPYC", "cores": 2, "mem_gib": 8.0, "load_avg": [0, 0, 0], "python": "3", "torch": "t",
               "transformers": "x", "torch_threads": 2, "gpu": False, "commit": "abc1234", "dirty": True}
    request = {"tokens": [1, 2, 3], "latency_s": 2.0, "first_chunk_s": 1.0, "start_s": 0.0, "rounds": 2, "mean_budget": 4.0}
    rows = [{"kind": "run", "argv": ["benchmarks/concurrency.py", "--fresh"], "pair_description": "P, float32",
             "machine": machine, "started": 1.0, "levels": [1], "new_tokens": 3, "prompt_tokens": 64},
            {"kind": "level", "key": "dyspec/1/0", "system": "dyspec", "level": 1, "repeat": 0, "wall_s": 2.0,
             "new_tokens": 3, "requests": [request],
             "target": {"rounds_verified": 2, "forwards": 2, "rows_forwarded": 10, "batched_rounds": 0}}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = concurrency_report.write_report(tmp_path).read_text()
    assert "**An earlier run on an AMD EPYC, made with an earlier version of this benchmark**" in text
    assert "64-token prompts (prompt set not recorded), 3 new tokens per request" in text
    assert "CPU flags of the measuring machine: not recorded with these rows." in text
    assert "| 1 | dyspec | 4.0 | - | 1.50 |" in text, "budget from the rows, drafted absent"
