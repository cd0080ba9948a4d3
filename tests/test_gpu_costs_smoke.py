"""benchmarks.gpu_costs and its report, end to end on tiny shapes on the CPU: the GPU benchmark
is run on lent machines only, so this keeps its code paths (every curve, the round breakdown, the
slice fit and the projection) from rotting between loans."""
from __future__ import annotations

import json

from benchmarks import gpu_costs, gpu_costs_report


def test_gpu_costs_runs_and_reports_on_tiny_shapes(tmp_path):
    raw, out, quality = tmp_path / "raw", tmp_path / "report", tmp_path / "tq"
    assert gpu_costs.main(["--out", str(raw), "--tiny", "--device", "cpu", "--llama-layers", "1,2", "--reps", "1",
                           "--context", "16", "--new-tokens", "2"]) == 0
    data = json.loads((raw / "gpu_costs.json").read_text())
    assert set(data["verify"]) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "llama2-70b-1-layers",
                                   "llama2-70b-2-layers"}
    for rows in data["verify"].values():
        assert [r["nodes"] for r in rows] == list(gpu_costs.TREE_SIZES)
        assert all(r["forward_s"] > 0 and r["verify_greedy_s"] > 0 and r["verify_sampled_s"] > 0 for r in rows)
    for variant in ("qwen2.5-coder-0.5b", gpu_costs.LEAN_DRAFT, gpu_costs.STATIC_DRAFT):  # transformers, lean, static
        assert [r["batch"] for r in data["draft"][variant]] == list(gpu_costs.DRAFT_BATCHES)
        assert all(r["draft_s"] > 0 for r in data["draft"][variant])
    assert data["draft_graphs"] is False  # no graphs on a CPU
    assert {r["method"] for r in data["rounds"]} >= {"autoregressive", "dyspec", "dyspec-layer", "best-first", "chain"}
    assert all(0 <= r["outside_share"] <= 1 for r in data["rounds"])

    quality.mkdir()  # tokens per step as the tree-quality benchmark records them
    rows = [{"key": "a", "temperature": 0.0, "set": "code", "prompt": 0, "method": "dyspec-layer", "budget": 16,
             "tokens_per_step": 6.0, "steps": 10, "draft_calls": 40},
            {"key": "b", "temperature": 0.0, "set": "code", "prompt": 0, "method": "chain", "budget": "chain4",
             "tokens_per_step": 3.0, "steps": 20, "draft_calls": 80}]
    (quality / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = gpu_costs_report.write_report(raw, out, quality).read_text()
    assert "PROJECTION" in report and "| dyspec-layer:16 | 6.00 | 1 |" in report and "| chain:4 | 3.00 | 1 |" in report
    assert "extrapolated to 80 layers" in report
    assert "| nodes per call | transformers' forward | lean forward | lean, static KV cache (no graphs: not a GPU) |" in report
