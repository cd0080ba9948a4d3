"""The tree-quality report's draft-temperature section: the best draft temperature per method on the
sweep's prompts, paired against the main draft temperature; sweep rows stay out of the main tables."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

from benchmarks.tree_quality_report import draft_temperature_table, load, write_report


def row(method, budget, tps, set_name="prose", prompt=0, draft_temperature=None):
    r = {"temperature": 0.0, "set": set_name, "prompt": prompt, "method": method, "budget": budget,
         "tokens_per_step": tps}
    return r if draft_temperature is None else {**r, "draft_temperature": draft_temperature}


MAIN = [row("dyspec", 64, 4.0), row("dyspec", 64, 6.0, "code"), row("dyspec", 64, 100.0, "code", 5),  # not swept
        row("chain", "chain2", 2.0), row("chain", "chain2", 2.0, "code"),
        row("chain", "chain4", 3.0), row("chain", "chain4", 5.0, "code")]
SWEEP = [row("dyspec", 64, 5.0, draft_temperature=0.3), row("dyspec", 64, 7.0, "code", draft_temperature=0.3),
         row("dyspec", 64, 3.0, draft_temperature=1.0), row("dyspec", 64, 5.0, "code", draft_temperature=1.0),
         row("chain", "chain2", 2.5, draft_temperature=0.3), row("chain", "chain2", 2.5, "code", draft_temperature=0.3),
         row("chain", "chain4", 1.0, draft_temperature=0.3), row("chain", "chain4", 1.0, "code", draft_temperature=0.3),
         row("chain", "chain2", 1.0, draft_temperature=1.0), row("chain", "chain2", 1.0, "code", draft_temperature=1.0)]


def test_best_draft_temperature_per_method_paired_on_the_swept_prompts():
    text = draft_temperature_table(MAIN, SWEEP, 0.6)
    assert "B=64, 2 prompts: the first 1 of each set" in text
    assert "| method | draft T=0.3 | draft T=0.6 | draft T=1 | best | best / T=0.6 |" in text
    dyspec = next(line for line in text.splitlines() if line.startswith("| dyspec |"))
    cells = [c.strip() for c in dyspec.strip("|").split("|")]
    assert cells[1].startswith("6.00 ±") and cells[2].startswith("5.00 ±") and cells[3].startswith("4.00 ±")
    assert cells[4] == "0.3"  # the code prompt #5 (not swept) is left out of the T=0.6 mean
    assert cells[5].startswith(f"{math.sqrt(5 / 4 * 7 / 6):.2f} [")
    chain = next(line for line in text.splitlines() if line.startswith("| chain |"))
    cells = [c.strip() for c in chain.strip("|").split("|")]
    # chain: its best length per temperature (k=2 at T=0.3, k=4 at T=0.6)
    assert cells[1].startswith("2.50 ±") and cells[2].startswith("4.00 ±") and cells[4] == "0.6"
    assert draft_temperature_table(MAIN, [], 0.6) == ""


def test_sweep_rows_stay_out_of_the_main_tables(tmp_path):
    with (tmp_path / "results.jsonl").open("w") as f:
        for r in MAIN + SWEEP:
            f.write(json.dumps({"key": "k", **r}) + "\n")
        f.write(json.dumps({"key": "t0/prose/0/dyspec", "marker": True}) + "\n")
    assert len(load(tmp_path)) == len(MAIN) and len(load(tmp_path, sweep=True)) == len(SWEEP)
    args = SimpleNamespace(dtype="bfloat16", draft_temperature=0.6, new_tokens=64, prompt_tokens=128,
                           t06_new_tokens=64, sets="prose,code")
    write_report(tmp_path, args)
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Draft temperature" in report
    main_table = report.split("## Target temperature 0.0, all prompt sets")[1].split("##")[0]
    assert "| dyspec | 36.67" in main_table  # (4 + 6 + 100) / 3: the main rows only
