"""Many users at once (issue 14): aggregate tokens/s and per-request latency at 1, 2, 4, 8 and 16
concurrent streams, every system in the same run on the same machine:

- `dyspec`: the target batching rounds across sessions, one draft worker with the joint budget
  (the default services);
- `plain-batched`: plain decoding through the same services (method autoregressive, no drafts),
  batched on the target like any round;
- `dyspec-unbatched`: the services as they were before batching: `--no-batching` target, a worker
  sizing each session's tree alone (`--no-joint-budget`);
- `hf-batched`: transformers' batched greedy `generate` of the target alone, left-padded, in this
  process on every core.

    python -m benchmarks.concurrency                      # Qwen pair, fp32 (~25 min on 2 cores)
    python -m benchmarks.concurrency --tiny --levels 1,2  # plumbing check

A level sends that many requests at once, each with its own prompt; aggregate throughput is all
their new tokens over the wall time from the first send to the last answer. Greedy outputs must be
the same in every service system and level (checked; the report says so); hf-batched is compared
and its mismatches reported (padding changes the kernels' shapes, so near-ties may break either way).
Writes OUT/results.jsonl (reruns skip what is there) and OUT/REPORT.md (benchmarks.concurrency_report).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "reports" / "concurrency"
SERVICE_SYSTEMS = {  # name: (target flags, worker flags, method)
    "dyspec": ([], [], "dyspec"),
    "plain-batched": ([], [], "autoregressive"),
    "dyspec-unbatched": (["--no-batching"], ["--no-joint-budget"], "dyspec"),
}
SYSTEMS = (*SERVICE_SYSTEMS, "hf-batched")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=("qwen", "small", "tiny"), default="qwen")
    p.add_argument("--tiny", dest="pair", action="store_const", const="tiny", help="= --pair tiny")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrent streams")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--sets", default="code", help="prompt sets (benchmarks.prompts)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="discard earlier results in OUT")
    return p


def stats_of(address: str):
    import grpc

    from proto.dyspec.v1 import target_pb2, target_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=10)


def request_row(result, start_s: float) -> dict:
    budgets = [r[0] for r in result.rounds]
    return {"tokens": result.tokens, "latency_s": result.wall_s, "first_chunk_s": result.first_chunk_s,
            "start_s": start_s, "rounds": len(result.rounds), "mean_budget": sum(budgets) / len(budgets) if budgets else 0.0}


def level_row(system: str, level: int, repeat: int, requests: list[dict], wall_s: float, before=None, after=None) -> dict:
    row = {"kind": "level", "key": f"{system}/{level}/{repeat}", "system": system, "level": level, "repeat": repeat,
           "wall_s": wall_s, "new_tokens": sum(len(r["tokens"]) for r in requests), "requests": requests}
    if before is not None:
        row["target"] = {name: getattr(after, name) - getattr(before, name)
                         for name in ("rounds_verified", "forwards", "rows_forwarded", "batched_rounds")}
    return row


def run_service_level(pipeline, key: str, method: str, prompts, new_tokens: int) -> tuple[list[dict], float]:
    results: list = [None] * len(prompts)
    starts = [0.0] * len(prompts)
    t0 = time.perf_counter()

    def one(i: int):
        starts[i] = time.perf_counter() - t0
        results[i] = pipeline.generate(key, prompts[i], new_tokens, method, temperature=0.0, seed=i, timeout_s=3600)

    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - t0
    return [request_row(r, s) for r, s in zip(results, starts)], wall


def run_hf_level(target, prompts, new_tokens: int, pad_id: int) -> tuple[list[dict], float]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=pad_id, eos_token_id=None, repetition_penalty=1.0)
    wall = time.perf_counter() - t0
    return [{"tokens": out[i, width:].tolist(), "latency_s": wall, "first_chunk_s": float("nan"), "start_s": 0.0,
             "rounds": new_tokens, "mean_budget": 0.0} for i in range(len(prompts))], wall


def measure(args, progress=print) -> Path:
    from benchmarks.machine import describe
    from benchmarks.model_pairs import model_pair, prompts_for
    from benchmarks.pipeline_services import Pipeline
    from benchmarks.results_log import ResultsLog

    out = Path(args.out)
    log = ResultsLog(out / "results.jsonl", fresh=args.fresh)
    levels = [int(x) for x in args.levels.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {list(SYSTEMS)}")
    pair = model_pair(args.pair, dtype=args.dtype)
    target_model, _, tokenizer = pair.load()
    by_set = prompts_for(pair, tokenizer, args.sets.split(","), max(levels), args.prompt_tokens,
                         target_model.config.vocab_size)
    pool = [p for ps in by_set.values() for p in ps]
    prompts = [pool[i % len(pool)] for i in range(max(levels))]
    log.add({"kind": "run", "argv": sys.argv, "pair": pair.name, "pair_description": pair.description,
             "machine": describe(os.cpu_count()), "started": time.time(), "levels": levels,
             "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "systems": systems})

    def todo(system: str) -> list[tuple[int, int]]:
        return [(lv, rep) for lv in levels for rep in range(args.repeats) if not log.has(f"{system}/{lv}/{rep}")]

    if "hf-batched" in systems and todo("hf-batched"):
        import torch

        torch.set_num_threads(os.cpu_count())
        eos = getattr(target_model.generation_config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) or 0
        run_hf_level(target_model, prompts[:1], 2, pad)  # warm-up
        for level, repeat in todo("hf-batched"):
            requests, wall = run_hf_level(target_model, prompts[:level], args.new_tokens, pad)
            log.add(level_row("hf-batched", level, repeat, requests, wall))
            progress(f"  hf-batched x{level}: {sum(len(r['tokens']) for r in requests) / wall:.2f} tok/s")
        torch.set_num_threads(1)
    del target_model

    # one target at a time (memory): the batching one for dyspec and plain-batched, then the other
    for target_flags in ([], ["--no-batching"]):
        group = [s for s in systems if s in SERVICE_SYSTEMS and SERVICE_SYSTEMS[s][0] == target_flags and todo(s)]
        if not group:
            continue
        pipeline = Pipeline(pair, out / "logs" / ("unbatched" if target_flags else "batched"), progress=progress)
        try:
            pipeline.start_target(extra=target_flags)
            for system in group:
                _, worker_flags, method = SERVICE_SYSTEMS[system]
                pipeline.start_worker(system, ["--max-sessions", str(max(levels)), *worker_flags])
                pipeline.generate(system, prompts[0], 4, method)  # warm-up: pages the weights in
                for level, repeat in todo(system):
                    before = stats_of(pipeline.target.address)
                    requests, wall = run_service_level(pipeline, system, method, prompts[:level], args.new_tokens)
                    after = stats_of(pipeline.target.address)
                    log.add(level_row(system, level, repeat, requests, wall, before, after))
                    progress(f"  {system} x{level}: {sum(len(r['tokens']) for r in requests) / wall:.2f} tok/s, "
                             f"{after.forwards - before.forwards} forwards for "
                             f"{after.rounds_verified - before.rounds_verified} rounds")
                pipeline.stop_worker(system)
        finally:
            pipeline.close()

    from benchmarks.concurrency_report import write_report

    return write_report(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = measure(args)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
