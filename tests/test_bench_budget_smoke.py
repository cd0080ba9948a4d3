"""benchmarks.budget_tuning end to end on the tiny random models: target, delay proxy and worker as
processes, the fixed-budget sweep and the adaptive budget at two delays, one delay switch, the
shuffled per-prompt order, JSONL and the Markdown report."""
from __future__ import annotations

import json

import pytest

from benchmarks import budget_tuning

pytestmark = pytest.mark.e2e


def test_budget_tuning_tiny_run_writes_results_and_report(tmp_path):
    argv = ["--tiny", "--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "6", "--budgets", "2,8",
            "--rtts-ms", "0,20", "--switches", "0:20", "--switch-tokens", "12", "--out", str(tmp_path)]
    assert budget_tuning.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    sweep = [r for r in rows if r["kind"] == "sweep"]
    systems = {("fixed", 0), ("fixed", 2), ("fixed", 8), ("auto", 0)}
    for rtt in (0.0, 20.0):
        for prompt in (0, 1):
            ran = [(r["policy"], r["budget"]) for r in sweep if r["rtt_ms"] == rtt and r["prompt"] == prompt]
            assert sorted(ran) == sorted(systems), (rtt, prompt, ran)
            assert all(r["new_tokens"] == 6 for r in sweep)
    orders = {tuple((r["policy"], r["budget"]) for r in sweep if r["rtt_ms"] == rtt and r["prompt"] == p)
              for rtt in (0.0, 20.0) for p in (0, 1)}
    assert len(orders) > 1, "every prompt ran the systems in the same order"
    delayed = [r for r in sweep if r["rtt_ms"] == 20.0]
    assert min(r["wall_s"] for r in delayed) >= 0.02 * 2  # at least two rounds, each through the 20 ms proxy
    switch = next(r for r in rows if r["kind"] == "switch")
    assert switch["change_round"] is not None and switch["new_tokens"] == 12
    text = (tmp_path / "REPORT.md").read_text()
    for needle in ("reduced run", "auto / best fixed", "| 0 |", "| 20 |", "shuffled order", "0 -> 20 ms"):
        assert needle in text, needle
