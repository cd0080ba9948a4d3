"""benchmarks.pipeline_speed end to end on the tiny random models: services as processes, the
in-process baselines, exactness check, wire counting, JSONL and the Markdown report."""
from __future__ import annotations

import json

import pytest

from benchmarks import pipeline_speed

pytestmark = pytest.mark.e2e


def test_pipeline_speed_tiny_run_writes_results_and_report(tmp_path):
    report = pipeline_speed.main(["--tiny", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "10",
                                  "--temperatures", "0", "--configs", "dyspec:4", "--draft-top-ks", "4",
                                  "--out", str(tmp_path)])
    assert report == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    requests = [r for r in rows if r["kind"] == "request"]
    assert {(r["system"], r["method"]) for r in requests} == {
        ("hf-target", None), ("hf-assisted", None), ("service", "autoregressive"), ("service", "dyspec")}
    assert all(r["new_tokens"] == 10 and r["mismatch_at"] == -1 for r in requests), "greedy outputs must all agree"
    spec = next(r for r in requests if r["method"] == "dyspec")
    assert spec["stats"]["drafted_tokens"] > 0 and spec["bytes_to_target"] > 0 and spec["rounds"]
    text = (tmp_path / "REPORT.md").read_text()
    for needle in ("reduced run", "vs target alone", "outside model forwards", "bytes to target per tree node",
                   "All 4 greedy (T=0) outputs equal"):
        assert needle in text, needle

    # Resumed: drop the speculative request and rerun; it is measured again and still checked against
    # the target's recorded greedy output (whose request is not rerun).
    kept = [r for r in rows if r.get("method") != "dyspec"]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert pipeline_speed.main(["--tiny", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "10",
                                "--temperatures", "0", "--configs", "dyspec:4", "--draft-top-ks", "4",
                                "--baselines", "hf", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    redone = [r for r in rows if r.get("method") == "dyspec"]
    assert len(redone) == 1 and redone[0]["mismatch_at"] == -1
    assert sum(r.get("system") == "hf-target" for r in rows) == 1
