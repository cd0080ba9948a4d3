"""Tree quality (shared/BENCHMARKS.md section 1): tokens per target step for every method and
budget on the real Qwen2.5-Coder 0.5B -> 1.5B pair, three prompt sets, target T = 0 and 0.6.

  python -m benchmarks.tree_quality --out benchmarks/reports/tree_quality

Temperature 0 is scored exactly with draft forwards only: the target's greedy continuation is
computed once per prompt, and a round accepts the longest tree path that follows it (what greedy
verification would accept). Builders whose trees are nested in their budget (dyspec, best-first,
specinfer, chain: the first B nodes of a bigger tree are the B-node tree for the same coins)
build one tree per position, at the largest budget of the runs that may still reach it, and score
every budget on its prefix.
Temperature 0.6 needs the target to verify: the runs of a few prompts of every set are in flight
together (--prompts-per-pool), each `dyspec.generate`'s loop, with the target forwarding only the nodes the
verification walk visits and every run's draft and target rows pooled into shared forwards
(benchmarks/tree_quality_verified.py); the first prompt of each set also runs `generate` itself,
one run at a time, to time each round's work outside model forwards.
Then the draft temperature: the first prompts of each set are scored at T=0 again with other draft
temperatures (--draft-temperature-sweep, at --sweep-budget), for the best one per method.

Results are appended to <out>/results.jsonl as they are produced (a rerun skips what is there),
and <out>/REPORT.md plus a plot are rewritten at the end (`--report-only` to just rewrite them).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NESTED = {"dyspec", "best-first", "specinfer", "chain"}
METHODS = ["dyspec", "dyspec-layer", "best-first", "sequoia", "specinfer", "chain"]
LARGE_BUDGET_METHODS = {"dyspec-layer", "best-first"}  # BENCHMARKS.md: 256 for these too
CHAIN_LENGTHS = (2, 4, 6, 8, 12, 16)  # chain reports its best length, whatever the budget
T06_CHAIN_LENGTHS = (4, 8)  # at T=0.6 each length costs a verified run: the two that win at T=0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/reports/tree_quality")
    p.add_argument("--sets", default="prose,code,licence")
    p.add_argument("--prompts-per-set", type=int, default=10)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--budgets", default="16,32,64,128")
    p.add_argument("--large-budget", type=int, default=256)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--draft-temperature", type=float, default=0.6)
    p.add_argument("--t06-prompts-per-set", type=int, default=10, help="prompts per set at T=0.6 (the costly part)")
    p.add_argument("--unpooled-t06-prompts-per-set", type=int, default=1,
                   help="prompts per set whose T=0.6 runs call dyspec.generate one at a time (timed per round)")
    p.add_argument("--max-builds", type=int, default=12,
                   help="runs in flight at once in the pooled scoring (memory: ~2 MB per evaluated tree node)")
    p.add_argument("--prompts-per-pool", type=int, default=2,
                   help="prompt indices per set whose runs share one pool of forwards (results are saved per pool)")
    p.add_argument("--t06-budgets", default="16,32,64,128")
    p.add_argument("--t06-new-tokens", type=int, default=64)
    p.add_argument("--calibration-prompts", type=int, default=2, help="per set, disjoint from the evaluation prompts")
    p.add_argument("--draft-temperature-sweep", default="0.3,1.0",
                   help="other draft temperatures scored at T=0 (exact, draft forwards only) for the best one per method")
    p.add_argument("--sweep-prompts-per-set", type=int, default=4)
    p.add_argument("--sweep-budget", type=int, default=64)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-t0", action="store_true")
    p.add_argument("--skip-t06", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="model weights; bf16 forwards are 1.6-3x faster on AVX512-BF16 CPUs (and what GPUs serve)")
    p.add_argument("--prefetch", type=int, default=16,
                   help="nodes per draft forward for dyspec in the one-at-a-time runs (the tree does not depend "
                        "on it)")
    p.add_argument("--pooled-speculate", type=int, default=8,
                   help="best-first in the pooled runs: candidates forwarded ahead of being chosen, per forward "
                        "(same trees, fewer sequential forwards: its 256-node builds are the pools' longest chains)")
    p.add_argument("--pooled-speculate-ratio", type=float, default=0.3,
                   help="... only candidates worth at least this fraction of the node being expanded")
    p.add_argument("--pooled-prefetch", type=int, default=1,
                   help="the same in the pooled runs, whose forwards are batched across runs anyway: 1 forwards only "
                        "the nodes that get children (16 also forwarded 13-37%% more rows, leaves never expanded)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        from benchmarks.tree_quality_run import run

        with (out / "commands.txt").open("a") as f:  # results accumulate over runs: keep every command
            f.write("python -m benchmarks.tree_quality " + " ".join(args.argv) + "\n")

        run(args, out, log)
    from benchmarks.tree_quality_report import write_report

    write_report(out, args)
    log(f"report written to {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
