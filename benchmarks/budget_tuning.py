"""Budget tuning under network delay (shared/BENCHMARKS.md section 4): target <- delay proxy <-
draft worker, all separate processes on loopback. For each injected round-trip delay, sweep fixed
tree budgets (plus plain decoding, budget 0) to find the best one, then run the worker's adaptive
policy (`--budget auto`: a BudgetTuner per request) on the same prompts; report its throughput as
a fraction of the best fixed budget, the budgets it chose, and how fast it re-converges when the
delay changes in the middle of a request (BackgroundDelayProxy.set_rtt).

The default pair is the real Qwen2.5-Coder 0.5B -> 1.5B one in bf16 with top-20 draft distributions,
as benchmarks.pipeline_speed runs it, on code and prose (where its draft is worth using), with
budgets up to 16: larger dyspec trees cost the 0.5B draft seconds per round on this CPU. Its
rounds take ~0.3-1.5 s here, so 0-100 ms of delay moves the optimum little; the question it answers
is whether the tuner finds the best budget at real compute costs. `--tiny` runs the random tiny
models, whose compute is almost free, so the delay dominates the round as on a GPU. The small pair
(SmolLM2-135M with a self-draft of its first layers) is kept for plumbing checks only: its
self-draft is not a draft (1.0-1.4 tokens per round at 8-22 of 30 layers, measured in-process).

    python -m benchmarks.budget_tuning                   # full protocol (~70 min on a 2-core CPU)
    python -m benchmarks.budget_tuning --prompts 1 --new-tokens 24 --budgets 1,4,16 --rtts-ms 0,50

Writes OUT/results.jsonl (one line per request; reruns skip what is there) and OUT/REPORT.md.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "reports" / "budget_tuning"
DEFAULTS = {"dtype": "bfloat16", "pair": "qwen", "sets": "code,prose", "prompts": 3, "prompt_tokens": 128, "new_tokens": 64,
            "rtts_ms": "0,5,20,50,100", "budgets": "1,2,4,8,16", "method": "dyspec", "draft_top_k": 20,
            "temperature": 0.0, "switches": "0:100,100:0,5:50", "switch_tokens": 256, "repeats": 1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.budget_tuning", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pair = p.add_mutually_exclusive_group()
    pair.add_argument("--pair", choices=("qwen", "small", "tiny"), default=DEFAULTS["pair"])
    pair.add_argument("--small", dest="pair", action="store_const", const="small", help="= --pair small")
    pair.add_argument("--tiny", dest="pair", action="store_const", const="tiny", help="= --pair tiny")
    p.add_argument("--draft-layers", type=int, default=8, help="small pair: layers kept in the self-draft")
    p.add_argument("--draft-noise", type=float, default=0.1,
                   help="tiny pair: weight noise of the draft copy (0.1: about 1.7-2.9 tokens per round at budgets 4-64)")
    p.add_argument("--sets", default=DEFAULTS["sets"], help="prompt sets (benchmarks.prompts); tiny uses random ids")
    p.add_argument("--prompts", type=int, default=DEFAULTS["prompts"], help="prompts per set")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    p.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    p.add_argument("--rtts-ms", default=DEFAULTS["rtts_ms"], help="injected round-trip delays")
    p.add_argument("--budgets", default=DEFAULTS["budgets"], help="fixed budgets swept (plain decoding is added)")
    p.add_argument("--method", default=DEFAULTS["method"], help="tree builder")
    p.add_argument("--draft-top-k", type=int, default=DEFAULTS["draft_top_k"],
                   help="the worker's --draft-top-k (0: untruncated, the worker's default)")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="target temperature")
    p.add_argument("--switches", default=DEFAULTS["switches"],
                   help="re-convergence runs FROM:TO (ms): one auto request whose delay changes half-way")
    p.add_argument("--switch-tokens", type=int, default=DEFAULTS["switch_tokens"], help="tokens of each switch request")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=DEFAULTS["dtype"],
                   help="weights of both models (services and in-process baselines alike)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/reports/budget_tuning/PAIR, one report per pair)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in OUT")
    return p


def _record(r, **fields) -> dict:
    return {**fields, "new_tokens": len(r.tokens), "wall_s": r.wall_s, "tokens_per_s": r.tokens_per_s,
            "decode_tokens_per_s": r.decode_tokens_per_s, "first_chunk_s": r.first_chunk_s, "stats": r.stats,
            "rounds": r.rounds, "chunk_times_s": [round(t, 4) for t in r.chunk_times_s], "bytes_to_target": r.bytes_to_target,
            "bytes_to_draft": r.bytes_to_draft}


def measure(args, progress=print) -> Path:
    from benchmarks.machine import describe
    from benchmarks.model_pairs import model_pair, prompts_for
    from benchmarks.pipeline_services import Pipeline
    from benchmarks.results_log import ResultsLog

    out = Path(args.out) if args.out else DEFAULT_OUT / args.pair
    log = ResultsLog(out / "results.jsonl", fresh=args.fresh)
    pair = model_pair(args.pair, args.draft_layers, args.draft_noise, dtype=args.dtype)
    rtts = [float(x) for x in args.rtts_ms.split(",")]
    budgets = [0] + [int(b) for b in args.budgets.split(",") if int(b) > 0]  # 0 = plain decoding
    switches = [tuple(float(x) for x in s.split(":")) for s in args.switches.split(",") if s]
    log.add({"kind": "run", "argv": getattr(args, "argv", None) or [], "settings": {k: getattr(args, k) for k in DEFAULTS},
             "pair": pair.name,
             "pair_description": pair.description, "machine": describe(None), "started": time.time()})

    from serving.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(pair.target)
    vocab = tokenizer.vocab_size if tokenizer is not None else load_causal_lm(pair.target).config.vocab_size
    prompts = [(s, i, p) for s, ps in prompts_for(pair, tokenizer, args.sets.split(","), args.prompts,
                                                 args.prompt_tokens, vocab).items() for i, p in enumerate(ps)]
    pipeline = Pipeline(pair, Path(tempfile.mkdtemp(prefix="dyspec-bench-logs-")), progress=progress)
    try:
        progress(f"starting target, delay proxy and draft worker ({pair.description}) ...")
        pipeline.start_target()
        pipeline.start_worker("auto", ["--budget", "auto", "--max-budget", str(max(budgets)),
                                       "--draft-top-k", str(args.draft_top_k), "--method", args.method])
        pipeline.generate("auto", prompts[0][2], 2, args.method, 4)  # warm-up, not recorded
        systems = [("fixed", b) for b in budgets] + [("auto", 0)]
        total = len(rtts) * len(prompts) * args.repeats * len(systems) + len(switches)
        done = 0
        for rtt in rtts:
            pipeline.proxy.set_rtt(rtt / 1000)
            for set_name, index, prompt in prompts:
                for repeat in range(args.repeats):
                    # A seeded shuffle per prompt: in one fixed order, whatever runs right after the biggest
                    # trees was measured ~12% slower per round (target time included) on this CPU.
                    order = list(systems)
                    random.Random(f"{args.seed}/{rtt}/{set_name}/{index}/{repeat}").shuffle(order)
                    for policy, budget in order:
                        done += 1
                        key = json.dumps([pair.description, args.method, args.draft_top_k, args.temperature, args.prompt_tokens,
                                          args.new_tokens, rtt, set_name, index, repeat, policy, budget])
                        name = f"budget {budget}" if policy == "fixed" else "auto"
                        if log.has(key):
                            progress(f"[{done}/{total}] RTT {rtt:g} ms {set_name}#{index} {name}: done earlier")
                            continue
                        method = "autoregressive" if policy == "fixed" and budget == 0 else args.method
                        r = pipeline.generate("auto", prompt, args.new_tokens, method, budget, args.temperature,
                                              args.seed + repeat)
                        log.add(_record(r, kind="sweep", key=key, rtt_ms=rtt, set=set_name, prompt=index, repeat=repeat,
                                        policy=policy, budget=budget))
                        chosen = sorted(x[0] for x in r.rounds)
                        extra = f", budgets chosen median {chosen[len(chosen) // 2]}" if policy == "auto" and chosen else ""
                        progress(f"[{done}/{total}] RTT {rtt:g} ms {set_name}#{index} {name}: {len(r.tokens)} tok in "
                                 f"{r.wall_s:.1f} s = {r.tokens_per_s:.2f} tok/s, {len(r.tokens) / max(1, len(r.rounds)):.2f} "
                                 f"tok/round{extra}")
        for start_ms, end_ms in switches:
            done += 1
            key = json.dumps([pair.description, args.method, args.draft_top_k, args.temperature, args.prompt_tokens,
                              args.switch_tokens, "switch", start_ms, end_ms])
            if log.has(key):
                progress(f"[{done}/{total}] switch {start_ms:g} -> {end_ms:g} ms: done earlier")
                continue
            pipeline.proxy.set_rtt(start_ms / 1000)
            change = {}

            def on_chunk(i, elapsed, n_tokens, end_ms=end_ms, change=change):
                if not change and n_tokens >= args.switch_tokens // 2:  # rounds from i + 1 on see the new delay
                    pipeline.proxy.set_rtt(end_ms / 1000)
                    change.update(round=i + 1, at_s=elapsed, tokens=n_tokens)

            r = pipeline.generate("auto", prompts[0][2], args.switch_tokens, args.method, 0, args.temperature, args.seed,
                                  on_chunk=on_chunk)
            log.add(_record(r, kind="switch", key=key, from_ms=start_ms, to_ms=end_ms, change_round=change.get("round"),
                            change_at_s=change.get("at_s")))
            progress(f"[{done}/{total}] switch {start_ms:g} -> {end_ms:g} ms after round {change.get('round')}: "
                     f"budgets {[x[0] for x in r.rounds]}")
    finally:
        pipeline.close()
    from benchmarks.budget_tuning_report import write_report

    return write_report(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    print(f"python -m benchmarks.budget_tuning {shlex.join(args.argv)}", flush=True)
    report = measure(args, progress=lambda s: print(s, flush=True))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
