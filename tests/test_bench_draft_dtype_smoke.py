"""benchmarks.draft_dtype end to end on the tiny random models: every draft variant is loaded and
timed, generates with the float32 target, matches the target's greedy output, and lands in the
JSON results and the Markdown report (which --report-only rebuilds)."""
from __future__ import annotations

import json

from benchmarks import draft_dtype


def test_draft_dtype_tiny_run_writes_results_and_report(tmp_path):
    argv = ["--tiny", "--repeats", "1", "--rows", "1,4", "--context", "16", "--prompt-tokens", "8",
            "--new-tokens", "8", "--budget", "4", "--out", str(tmp_path)]
    assert draft_dtype.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    variants = list(draft_dtype.VARIANTS)
    assert result["variants"] == variants and result["argv"] == argv
    for label in variants:
        assert set(result["forward_ms"][label]) == {"1", "4"} and all(v > 0 for v in result["forward_ms"][label].values())
    assert {(q["variant"], q["prompt"]) for q in result["quality"]} == {(v, p) for v in variants
                                                                         for p in ("random-a", "random-b")}
    assert all(q["identical_to_target"] and q["tokens"] == 8 for q in result["quality"]), result["quality"]
    report = (tmp_path / "REPORT.md").read_text()
    assert "python -m benchmarks.draft_dtype --tiny" in report and "| int8 |" in report
    assert "CPU flags (`grep -o" in report
    (tmp_path / "REPORT.md").unlink()
    assert draft_dtype.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "REPORT.md").read_text() == report
