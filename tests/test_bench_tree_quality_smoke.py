"""benchmarks.tree_quality end to end on the small real model (SmolLM2-135M drafting for itself, so
the run is quick and the tokenizer real): Sequoia calibration, the exact T=0 scoring of every
method and budget, the verified T=0.6 runs (one-at-a-time and pooled), the draft-temperature
sweep, the results file a rerun resumes from, and the report."""
from __future__ import annotations

import json

import pytest

from benchmarks import tree_quality

pytestmark = pytest.mark.slow

METHODS = ["dyspec", "dyspec-layer", "best-first", "sequoia", "specinfer", "chain"]


def test_tree_quality_small_run_scores_every_method_resumes_and_reports(tmp_path):
    argv = ["--out", str(tmp_path), "--target", "smollm2-135m", "--draft", "smollm2-135m", "--sets", "prose",
            "--prompts-per-set", "2", "--prompt-tokens", "16", "--new-tokens", "6", "--budgets", "4,8",
            "--large-budget", "16", "--t06-prompts-per-set", "2", "--t06-budgets", "4", "--t06-new-tokens", "6",
            "--calibration-prompts", "1", "--draft-temperature-sweep", "0.3", "--sweep-prompts-per-set", "1",
            "--sweep-budget", "4", "--threads", "1", "--dtype", "float32"]
    assert tree_quality.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "tokens_per_step" in r]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key was measured twice"
    for temperature, baseline in ((0.0, set()), (0.6, {"autoregressive"})):  # T=0.6 also times the target alone
        ran = {r["method"] for r in scored if r["temperature"] == temperature and r.get("draft_temperature") is None}
        assert ran == set(METHODS) | baseline, (temperature, ran)
    t0 = {(r["method"], r["budget"]) for r in scored if r["temperature"] == 0.0 and r.get("draft_temperature") is None}
    assert {("dyspec", 4), ("dyspec", 8), ("best-first", 16), ("dyspec-layer", 16)} <= t0
    # The draft is the target itself, and best-first's tree always holds the draft's argmax child of the root,
    # which is then the target's greedy token: every T=0 round accepts it and gains a token.
    best_first = [r for r in scored if r["method"] == "best-first" and r["temperature"] == 0.0]
    assert best_first and all(r["tokens_per_step"] >= 2 for r in best_first), best_first
    assert any(r.get("draft_temperature") == 0.3 for r in scored), "the draft-temperature sweep wrote nothing"
    assert (tmp_path / "sequoia_acceptance.json").exists()
    report = (tmp_path / "REPORT.md").read_text()
    assert "dyspec" in report and "sequoia" in report

    assert tree_quality.main(argv) == 0  # everything is measured: the rerun adds no measurement
    again = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r for r in again if "tokens_per_step" in r] == scored
