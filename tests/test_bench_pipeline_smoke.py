"""benchmarks.pipeline_speed end to end on the tiny random models: services as processes, the
in-process baselines, exactness check, wire counting, JSONL and the Markdown report."""
from __future__ import annotations

import json

import pytest

from benchmarks import pipeline_speed

pytestmark = pytest.mark.e2e


def test_pipeline_speed_tiny_run_writes_results_and_report(tmp_path):
    report = pipeline_speed.main(["--tiny", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "10",
                                  "--temperatures", "0", "--configs", "dyspec:4,dyspec:4:serial", "--draft-top-ks", "4",
                                  "--out", str(tmp_path)])
    assert report == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    requests = [r for r in rows if r["kind"] == "request"]
    assert sorted((r["system"], r["method"], r.get("serial", False)) for r in requests) == sorted([
        ("hf-target", None, False), ("hf-target-all-cores", None, False), ("hf-assisted", None, False),
        ("service", "autoregressive", False), ("service", "dyspec", False), ("service", "dyspec", True)])
    assert all(r["new_tokens"] == 10 and r["mismatch_at"] == -1 for r in requests), "greedy outputs must all agree"
    spec = next(r for r in requests if r["method"] == "dyspec" and not r["serial"])
    assert spec["stats"]["drafted_tokens"] > 0 and spec["bytes_to_target"] > 0 and spec["rounds"]
    # Per-round overlap fields: the overlapping worker drafts ahead after its first round; the serial one never.
    assert any(x[8] for x in spec["rounds"][1:])
    serial = next(r for r in requests if r["method"] == "dyspec" and r["serial"])
    assert serial["rounds"] and not any(x[8] or x[9] or x[10] for x in serial["rounds"])
    text = (tmp_path / "REPORT.md").read_text()
    for needle in ("reduced run", "vs target alone", "outside model forwards", "bytes to target per tree node",
                   "All 6 greedy (T=0) outputs equal", "all cores", "serial rounds", "drafted ahead"):
        assert needle in text, needle

    # Resumed: drop the speculative request and rerun; it is measured again and still checked against
    # the target's recorded greedy output (whose request is not rerun).
    kept = [r for r in rows if r.get("method") != "dyspec" or r.get("serial")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert pipeline_speed.main(["--tiny", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "10",
                                "--temperatures", "0", "--configs", "dyspec:4", "--draft-top-ks", "4",
                                "--baselines", "hf", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    redone = [r for r in rows if r.get("method") == "dyspec" and not r.get("serial")]
    assert len(redone) == 1 and redone[0]["mismatch_at"] == -1
    assert sum(r.get("system") == "hf-target" for r in rows) == 1
