"""The pipeline benchmark's exactness evidence: where a greedy output first differs from the
target's, the report gives the target's own logit gap there (a near-tie or a real error), and a
resumed run still checks its prompts against the recorded reference."""
from __future__ import annotations

import torch

from benchmarks.pipeline_speed import tie_margin
from benchmarks.pipeline_speed_report import dtype_spacing, mismatches
from benchmarks.results_log import ResultsLog
from tests.tiny_models import greedy_reference, sequential_logits, tiny_llama


def test_tie_margin_is_the_targets_logit_gap_at_the_first_difference():
    model = tiny_llama(seed=3)
    prompt = [5, 9, 2, 17]
    reference = greedy_reference(model, prompt, 6)
    at = 3
    logits = sequential_logits(model, prompt + reference[:at])[-1].float()
    runner_up = int(torch.topk(logits, 2).indices[1])
    other = reference[:at] + [runner_up] + reference[at + 1:]
    m = tie_margin(model, prompt, reference, other, at)
    assert m["reference_is_argmax"]
    assert abs(m["gap"] - float(logits[reference[at]] - logits[runner_up])) < 1e-4
    assert m["gap"] > 0 and abs(m["top1_minus_top2"] - m["gap"]) < 1e-4  # the runner-up is the second best
    assert abs(m["reference_logit"] - float(logits[reference[at]])) < 1e-4
    assert tie_margin(model, prompt, reference, reference[:at], at) is None  # only shorter: nothing to compare


def test_dtype_spacing():
    assert dtype_spacing(20.0, "bfloat16") == 0.125  # 16 <= 20 < 32: 2^4 / 2^7
    assert dtype_spacing(-1.5, "bfloat16") == 2.0 ** -7
    assert dtype_spacing(20.0, "float32") == 2.0 ** (4 - 23)


def _row(system, mismatch_at, margin=None, prompt=0):
    return {"set": "code", "prompt": prompt, "system": system, "method": None, "budget": 0, "draft_top_k": None,
            "mismatch_at": mismatch_at, "mismatch_margin": margin, "dtype": "bfloat16"}


def test_report_lists_differences_with_their_gap_in_spacings():
    margin = {"gap": 0.0625, "reference_logit": 20.0, "top1_minus_top2": 0.0625, "reference_is_argmax": True}
    rows = [_row("hf-target", -1), _row("hf-assisted", 7, margin), _row("hf-assisted", -1, prompt=1),
            _row("hf-target", None, prompt=2)]
    text = "\n".join(mismatches(rows))
    assert "2 of 3 greedy (T=0) outputs equal" in text
    assert "code#0 HF assisted generation: first difference at token 7; gap 0.062 (= 0.5 spacings of 0.125)" in text
    assert "is the uncached forward's argmax" in text
    assert "All 2 greedy" in "\n".join(mismatches([_row("hf-target", -1), _row("hf-assisted", -1)]))


def test_results_log_get_returns_the_latest_row_of_a_key(tmp_path):
    log = ResultsLog(tmp_path / "r.jsonl")
    log.add({"key": "a", "tokens": [1]})
    log.add({"key": "b", "tokens": [2]})
    log.add({"key": "a", "tokens": [3]})
    assert ResultsLog(tmp_path / "r.jsonl").get("a")["tokens"] == [3]
    assert log.get("missing") is None


def test_a_stopped_run_says_how_far_it_got():
    from benchmarks.pipeline_speed_report import coverage_note

    runs = [{"argv": ["--sets", "code,prose", "--prompts", "3", "--temperatures", "0"]}]
    cell = lambda s, p, system: {"set": s, "prompt": p, "temperature": 0.0, "system": system}  # noqa: E731
    full = [cell(s, p, x) for s in ("code", "prose") for p in range(3) for x in ("a", "b")]
    assert coverage_note(runs, full) == []
    stopped = [r for r in full if r["prompt"] < 2] + [cell("code", 2, "a")]
    text = coverage_note(runs, stopped)[0]
    assert "prompts done per set: code 3, prose 2 of 3; 1 prompt x temperature cells lack some systems" in text
    at_boundary = [r for r in full if r["prompt"] < 2]
    assert "code 2, prose 2 of 3; every system ran on each of them" in coverage_note(runs, at_boundary)[0]
