"""benchmarks.concurrency end to end on the tiny pair: every system runs at two levels, results
are logged per (system, level), greedy outputs agree across the service systems, and the report
names the goals and the projection."""
from __future__ import annotations

import json

import pytest

from benchmarks import concurrency

pytestmark = pytest.mark.e2e


def test_the_concurrency_benchmark_runs_every_system_and_reports(tmp_path):
    report = concurrency.measure(concurrency.build_parser().parse_args(
        ["--tiny", "--levels", "1,2", "--new-tokens", "6", "--prompt-tokens", "8", "--out", str(tmp_path)]),
        progress=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    levels = {(r["system"], r["level"]) for r in rows if r["kind"] == "level"}
    assert levels == {(s, c) for s in concurrency.SYSTEMS for c in (1, 2)}
    for row in rows:
        if row["kind"] == "level":
            assert len(row["requests"]) == row["level"] and all(len(r["tokens"]) == 6 for r in row["requests"])
            if row["system"] != "hf-batched":
                assert row["target"]["rounds_verified"] >= row["level"], "every request ran rounds on the target"
    text = report.read_text()
    for heading in ("## Aggregate tokens/s", "## The goals (issue 14), checked", "## Greedy identity", "## GPU projection"):
        assert heading in text
    assert "Every service system gave every prompt the same tokens at every level." in text
