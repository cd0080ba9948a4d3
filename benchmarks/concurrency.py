"""Many users at once (issue 14): aggregate tokens/s and per-request latency at 1, 2, 4, 8 and 16
concurrent streams, every system in the same run on the same machine:

- the speculative configs of --configs (default `dyspec:auto`, the worker's tuner with the joint
  budget) on the target batching rounds across sessions, one draft worker serving every stream;
  `dyspec:auto` is named `dyspec`, a fixed budget `METHOD:N`;
- `plain-batched`: plain decoding through the same services (config `autoregressive`: method
  autoregressive, no drafts), batched on the target like any round;
- `<config>-unbatched`: each speculative config on the services as they were before batching: a
  `--no-batching` target and a worker sizing each session's tree alone (`--no-joint-budget`);
- `hf-batched`: transformers' batched greedy `generate` of the target alone, left-padded, batch =
  the level, in this process on every core, the same weights (ModelPair.load).

    python -m benchmarks.concurrency --pair qwen                 # the committed report (~50 min on 2 cores)
    python -m benchmarks.concurrency --tiny --levels 1,2,4       # plumbing check (~1 min)

A level sends that many requests at once (released together by a barrier), each with its own
prompt (16 or more prompts from --sets, cycled); aggregate throughput is all their new tokens over
the wall time from the first send to the last answer. Requests ignore EOS, so every one makes
exactly --new-tokens tokens. At temperature 0 the outputs must be the same in every service system
and level (checked as results arrive, printed, and recorded in the report); hf-batched is compared
and its mismatches reported, not failed (padded batches change the kernels' shapes, so near-ties may
break either way). Each system is warmed up with one short request first; only one target runs at
a time (memory). Writes OUT/results.jsonl (one line per system, level and repeat; a rerun into the
same OUT skips what is there, and refuses other settings unless --fresh) and OUT/REPORT.md
(benchmarks.concurrency_report).
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "reports" / "concurrency"
DEFAULT_CONFIGS = "dyspec:auto,autoregressive"
HF = "hf-batched"
MIN_PROMPTS = 16  # distinct prompts drawn for any run (so levels up to 16 never share one)
SETTINGS = ("pair", "dtype", "sets", "prompt_tokens", "prompt_count", "new_tokens", "temperature")


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "service" or "hf"
    method: str = ""
    budget: int = 0  # 0: auto (the worker's tuner)
    batching: bool = True

    @property
    def config(self) -> str:
        return "" if self.kind == "hf" else ("autoregressive" if self.method == "autoregressive"
                                             else f"{self.method}:{self.budget or 'auto'}")

    @property
    def target_flags(self) -> list[str]:
        return [] if self.batching else ["--no-batching"]

    @property
    def worker_flags(self) -> list[str]:
        return [] if self.batching else ["--no-joint-budget"]


def parse_configs(text: str) -> list[tuple[str, int]]:
    """METHOD[:BUDGET] items -> (method, budget), budget 0 = auto; `autoregressive` is plain decoding."""
    from dyspec import METHODS

    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        method, _, budget = item.partition(":")
        if method not in METHODS:
            raise SystemExit(f"config {item!r}: unknown method; choose from {list(METHODS)}")
        if method == "autoregressive":
            out.append((method, 0))
            continue
        if budget not in ("", "auto") and (not budget.isdigit() or int(budget) < 1):
            raise SystemExit(f"config {item!r}: the budget is 'auto' or a positive number")
        out.append((method, 0 if budget in ("", "auto") else int(budget)))
    if not out:
        raise SystemExit("--configs names no config")
    return out


def system_name(method: str, budget: int, batching: bool = True) -> str:
    if method == "autoregressive":
        return "plain-batched" if batching else "plain-unbatched"
    base = method if budget == 0 else f"{method}:{budget}"
    return base if batching else f"{base}-unbatched"


def plan_systems(configs: list[tuple[str, int]], select: str = "all") -> list[System]:
    """Batched: every config; unbatched: every speculative config; then hf-batched. `select`: 'all'
    or a comma list of system names and the groups 'batched', 'unbatched', 'hf'."""
    batched = [System(system_name(m, b), "service", m, b, True) for m, b in configs]
    unbatched = [System(system_name(m, b, False), "service", m, b, False) for m, b in configs if m != "autoregressive"]
    every = [*batched, *unbatched, System(HF, "hf")]
    wanted = {s.strip() for s in select.split(",") if s.strip()}
    if "all" in wanted:
        return every
    known = {s.name for s in every} | {"batched", "unbatched", "hf"}
    if wanted - known:
        raise SystemExit(f"unknown systems {sorted(wanted - known)}; choose from {sorted(known)} or 'all'")
    return [s for s in every if s.name in wanted or (s.kind == "hf" and "hf" in wanted)
            or (s.kind == "service" and ("batched" if s.batching else "unbatched") in wanted)]


def roles(systems: list[System]) -> dict[str, str]:
    """Which system is ours (the first speculative batched config) and which are its baselines."""
    ours = next((s for s in systems if s.kind == "service" and s.batching and s.method != "autoregressive"), None)
    out = {"ours": ours.name if ours else ""}
    if ours:
        out["batching_off"] = system_name(ours.method, ours.budget, False)
    out["plain"], out["hf"] = "plain-batched", HF
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pair = p.add_mutually_exclusive_group()
    pair.add_argument("--pair", choices=("qwen", "small", "tiny"), default="qwen")
    pair.add_argument("--tiny", dest="pair", action="store_const", const="tiny", help="= --pair tiny")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--draft-dtype", choices=("float32", "bfloat16", "int8", "int4"), default=None,
                   help="the draft worker's weights instead (default: --dtype); the output stays the target's either way")
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrent streams")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="service configs METHOD[:BUDGET] (BUDGET a number or 'auto', the worker's tuner); "
                        "'autoregressive' is plain decoding through the services. The first speculative one is ours; "
                        "every speculative one also runs with batching off")
    p.add_argument("--systems", default="all",
                   help="run only these: system names, or the groups batched, unbatched, hf")
    p.add_argument("--sets", default="code", help="prompt sets (benchmarks.prompts); the tiny pair uses random ids")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="target temperature; greedy identity is checked at 0")
    p.add_argument("--repeats", type=int, default=1, help="runs of each level (the report gives medians)")
    p.add_argument("--max-budget", type=int, default=64, help="largest tree 'auto' may choose")
    p.add_argument("--target-flags", default="", metavar="FLAGS",
                   help="extra flags for the target service of every service system, e.g. '--batched-threads 2'")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="discard earlier results in OUT")
    return p


def command_line(args) -> str:
    """The canonical command that reproduces a run (every setting spelled out)."""
    parts = ["python -m benchmarks.concurrency", f"--pair {args.pair}", f"--dtype {args.dtype}",
             *([f"--draft-dtype {args.draft_dtype}"] if args.draft_dtype else []),
             f"--levels {args.levels}", f"--configs {args.configs}", f"--sets {args.sets}",
             f"--prompt-tokens {args.prompt_tokens}", f"--new-tokens {args.new_tokens}",
             f"--temperature {args.temperature:g}", f"--repeats {args.repeats}", f"--max-budget {args.max_budget}"]
    if args.systems != "all":
        parts.append(f"--systems {args.systems}")
    if args.target_flags:
        parts.append(f"--target-flags {shlex.quote(args.target_flags)}")
    if Path(args.out).resolve() != DEFAULT_OUT:
        parts.append(f"--out {shlex.quote(str(args.out))}")
    return " ".join(parts)


# --- one level ------------------------------------------------------------------------------------


def generate(channel, prompt: list[int], new_tokens: int, method: str, budget: int, temperature: float, seed: int,
             timeout_s: float = 3600) -> dict:
    """One DraftWorker.Generate call, EOS ignored; the request's row (times from its own send)."""
    from proto.dyspec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2

    request = generation_pb2.GenerateRequest(
        request_id=f"concurrency-{method}-{budget}-{seed}", token_ids=generation_pb2.TokenIds(ids=prompt),
        max_new_tokens=new_tokens, method=method, budget=budget, ignore_eos=True,
        sampling=sampling_pb2.SamplingParams(temperature=temperature, seed=seed))
    stub = generation_pb2_grpc.DraftWorkerStub(channel)
    tokens, first, summary = [], None, None
    start = time.perf_counter()
    for response in stub.Generate(generation_pb2.WorkerGenerateRequest(request=request), timeout=timeout_s):
        if response.HasField("tokens"):
            if first is None:
                first = time.perf_counter() - start
            tokens += response.tokens.token_ids
        else:
            summary = response.summary
    wall = time.perf_counter() - start
    rounds = list(summary.stats.rounds) if summary is not None else []
    budgets = [r.budget for r in rounds]
    return {"tokens": list(tokens), "latency_s": wall, "first_chunk_s": wall if first is None else first,
            "rounds": len(rounds), "mean_budget": sum(budgets) / len(budgets) if budgets else 0.0,
            "budgets": budgets, "mean_drafted": sum(r.drafted_tokens for r in rounds) / len(rounds) if rounds else 0.0,
            "accepted": sum(r.accepted_tokens for r in rounds),
            # per round, for reading where a level's time went: ms of the round (verdict to verdict),
            # of drafting, of the target (its queue included) and of its queue; the batch it shared
            "round_log": [[round(r.round_ns / 1e6, 1), round(r.draft_ns / 1e6, 1), round(r.target_total_ns / 1e6, 1),
                           round(r.target_queue_ns / 1e6, 1), r.batch_sessions, r.batch_rows, r.drafted_tokens,
                           r.accepted_tokens] for r in rounds]}


class StatsWatch:
    """The target's Stats counters before and after a level, and its queue sampled in between."""

    COUNTERS = ("rounds_verified", "forwards", "rows_forwarded", "batched_rounds", "evicted_sessions")

    def __init__(self, address: str, every_s: float = 0.25):
        import grpc

        from proto.dyspec.v1 import target_pb2, target_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        stub = target_pb2_grpc.TargetVerificationStub(self.channel)
        self._call = lambda: stub.Stats(target_pb2.TargetStatsRequest(), timeout=10)
        self.every_s = every_s

    def __enter__(self):
        self.before, self.queued, self._stop = self._call(), [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.queued.append(self._call().queued_rounds)
            except Exception:  # a missed sample is no result
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self._call()

    def delta(self) -> dict:
        row = {name: getattr(self.after, name) - getattr(self.before, name) for name in self.COUNTERS}
        row["queued_mean"] = sum(self.queued) / len(self.queued) if self.queued else 0.0
        row["queued_max"] = max(self.queued, default=0)
        row["queue_samples"] = len(self.queued)
        return row

    def close(self) -> None:
        self.channel.close()


def run_service_level(channel, system: System, prompts: list[list[int]], new_tokens: int, temperature: float,
                      seed: int) -> tuple[list[dict], float]:
    """All requests released at once; wall = first send to last answer."""
    results: list = [None] * len(prompts)
    errors: list = []
    starts, ends = [0.0] * len(prompts), [0.0] * len(prompts)
    gate = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        try:
            gate.wait()
            starts[i] = time.perf_counter()
            results[i] = generate(channel, prompts[i], new_tokens, system.method, system.budget, temperature, seed + i)
            ends[i] = time.perf_counter()
        except BaseException as exc:  # re-raised below, after every thread is done
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    t0 = min(starts)
    for r, s in zip(results, starts):
        r["start_s"] = s - t0
    return results, max(ends) - t0


def run_hf_level(target, prompts: list[list[int]], new_tokens: int, pad_id: int, temperature: float,
                 seed: int) -> tuple[list[dict], float]:
    """One left-padded batched `generate` of exactly `new_tokens` tokens per row (EOS off, as the
    services' requests ignore it). Every request's latency is the batch's; time to first token is
    when the prefill forward's tokens came out."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from benchmarks.hf_baselines import _ChunkTimer

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sampled = temperature > 0
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=sampled, temperature=temperature if sampled else None,
                              top_k=0 if sampled else None, top_p=1.0 if sampled else None, eos_token_id=None,
                              pad_token_id=pad_id, repetition_penalty=1.0)
    hf_logging.set_verbosity_error()
    saved_eos = target.generation_config.eos_token_id
    target.generation_config.eos_token_id = None  # so generate() cannot fill the model's EOS back in
    torch.manual_seed(seed)
    try:
        start = time.perf_counter()
        timer = _ChunkTimer(start)
        with torch.inference_mode():
            out = target.generate(ids, attention_mask=mask, generation_config=config, streamer=timer)
        wall = time.perf_counter() - start
    finally:
        target.generation_config.eos_token_id = saved_eos
    first = timer.times[0] if timer.times else wall
    return [{"tokens": out[i, width:].tolist(), "latency_s": wall, "first_chunk_s": first, "start_s": 0.0,
             "rounds": new_tokens, "mean_budget": 0.0, "mean_drafted": 0.0} for i in range(len(prompts))], wall


def level_row(system: System, level: int, repeat: int, temperature: float, requests: list[dict], wall_s: float,
              target: dict | None = None) -> dict:
    row = {"kind": "level", "key": f"{system.name}/{level}/{repeat}", "system": system.name, "config": system.config,
           "batching": system.batching if system.kind == "service" else None, "level": level, "repeat": repeat,
           "temperature": temperature, "wall_s": wall_s, "new_tokens": sum(len(r["tokens"]) for r in requests),
           "requests": requests}
    if target is not None:
        row["target"] = target
    return row


class GreedyCheck:
    """Each prompt's greedy tokens, first seen from a service system; every later row compared."""

    def __init__(self, progress):
        self.reference: dict[int, tuple[str, list[int]]] = {}
        self.services: list[str] = []
        self.hf: list[str] = []
        self.progress = progress

    def add(self, row: dict) -> None:
        hf = row["system"] == HF
        for i, request in enumerate(row["requests"]):
            tokens = request["tokens"]
            if i not in self.reference:
                if not hf:
                    self.reference[i] = (f"{row['system']} x{row['level']}", tokens)
                continue
            source, reference = self.reference[i]
            if tokens != reference:
                at = next((j for j, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
                line = f"{row['system']} x{row['level']} prompt {i}: differs from {source} at token {at}"
                (self.hf if hf else self.services).append(line)
                self.progress(f"  GREEDY MISMATCH{' (hf, reported)' if hf else ''}: {line}")


def check_settings(log, settings: dict) -> None:
    """A rerun into OUT must measure what the results there measured."""
    if not log.rows("level"):
        return
    earlier = log.rows("run")
    if not earlier:
        return
    last = earlier[-1].get("settings") or {  # rows of the first version of this benchmark
        "pair": earlier[-1].get("pair_description"), "new_tokens": earlier[-1].get("new_tokens"),
        "prompt_tokens": earlier[-1].get("prompt_tokens"), "temperature": 0.0}
    differ = {k: (last[k], settings[k]) for k in SETTINGS if k in last and last[k] != settings[k]}
    if differ:
        raise SystemExit(f"{log.path} holds results for other settings {differ} (earlier, now): "
                         "pass --fresh or another --out")


# --- the run --------------------------------------------------------------------------------------


def measure(args, progress=print) -> Path:
    import torch

    from benchmarks.concurrency_report import cpu_flags, write_report
    from benchmarks.machine import describe
    from benchmarks.model_pairs import model_pair, prompts_for
    from benchmarks.pipeline_services import Pipeline
    from benchmarks.results_log import ResultsLog
    from serving.models import threads_for

    out = Path(args.out)
    levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    if not levels or levels[0] < 1:
        raise SystemExit("--levels: positive numbers")
    systems = plan_systems(parse_configs(args.configs), args.systems)
    pair = model_pair(args.pair, dtype=args.dtype, draft_dtype=args.draft_dtype)
    count = max(MIN_PROMPTS, levels[-1])
    settings = {"pair": pair.description, "dtype": args.dtype, "sets": args.sets, "prompt_tokens": args.prompt_tokens,
                "prompt_count": count, "new_tokens": args.new_tokens, "temperature": args.temperature}
    log = ResultsLog(out / "results.jsonl", fresh=args.fresh)
    check_settings(log, settings)

    progress(f"loading {pair.description} in-process ...")
    target_model, draft_model, tokenizer = pair.load()
    del draft_model
    by_set = prompts_for(pair, tokenizer, args.sets.split(","), count, args.prompt_tokens, target_model.config.vocab_size)
    pool = [p for ps in by_set.values() for p in ps]
    prompts = [pool[i % len(pool)] for i in range(levels[-1])]
    log.add({"kind": "run", "command": command_line(args), "argv": getattr(args, "argv", None) or sys.argv[1:],
             "pair": pair.name, "pair_description": pair.description, "machine": describe(os.cpu_count()),
             "cpu_flags": cpu_flags(),
             "started": time.time(), "levels": levels, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
             "temperature": args.temperature, "repeats": args.repeats, "settings": settings,
             "systems": [s.name for s in systems], "configs": {s.name: s.config for s in systems}, "roles": roles(systems)})
    greedy = GreedyCheck(progress) if args.temperature == 0 else None

    def todo(system: System) -> list[tuple[int, int]]:
        return [(lv, rep) for lv in levels for rep in range(args.repeats) if not log.has(f"{system.name}/{lv}/{rep}")]

    def record(row: dict) -> None:
        log.add(row)
        if greedy is not None:
            greedy.add(row)

    # services first (their rows are the greedy reference); rows measured earlier are checked too
    hf_rows = []  # compared after the services
    for system in systems:
        for level in levels:
            for repeat in range(args.repeats):
                row = log.get(f"{system.name}/{level}/{repeat}")
                if row is not None and greedy is not None:
                    (hf_rows.append if system.kind == "hf" else greedy.add)(row)

    hf = next((s for s in systems if s.kind == "hf"), None)
    if hf is not None and todo(hf):
        with threads_for(target_model)(os.cpu_count()):  # to our kernels where the target runs on ours only
            eos = getattr(target_model.generation_config, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, list) else eos
            pad = 0 if pad is None else pad
            progress(f"{HF}: in-process on {os.cpu_count()} threads; warm-up ...")
            run_hf_level(target_model, prompts[:1], 2, pad, args.temperature, 0)
            for level, repeat in todo(hf):
                requests, wall = run_hf_level(target_model, prompts[:level], args.new_tokens, pad, args.temperature, repeat)
                row = level_row(hf, level, repeat, args.temperature, requests, wall)
                log.add(row)
                hf_rows.append(row)
                progress(f"  {HF} x{level} #{repeat}: {row['new_tokens'] / wall:.2f} tok/s, {wall:.1f} s")
    del target_model
    gc.collect()

    # one target at a time (memory): the batching one for its configs, then the one with batching off
    for batching in (True, False):
        group = [s for s in systems if s.kind == "service" and s.batching == batching and todo(s)]
        if not group:
            continue
        pipeline = Pipeline(pair, out / "logs" / ("batched" if batching else "unbatched"), progress=progress)
        watch = None
        try:
            pipeline.start_target(extra=[*group[0].target_flags, *shlex.split(args.target_flags)])
            watch = StatsWatch(pipeline.target.address)
            for system in group:
                pipeline.start_worker(system.name, ["--max-sessions", str(levels[-1]), "--max-budget", str(args.max_budget),
                                                    *system.worker_flags])
                channel = pipeline.channels[system.name]
                generate(channel, prompts[0], 4, system.method, system.budget, args.temperature, 0)  # warm-up
                for level, repeat in todo(system):
                    with watch:
                        requests, wall = run_service_level(channel, system, prompts[:level], args.new_tokens,
                                                           args.temperature, 1000 * repeat)
                    row = level_row(system, level, repeat, args.temperature, requests, wall, watch.delta())
                    record(row)
                    t = row["target"]
                    progress(f"  {system.name} x{level} #{repeat}: {row['new_tokens'] / wall:.2f} tok/s, {wall:.1f} s; "
                             f"{t['forwards']} forwards for {t['rounds_verified']} rounds "
                             f"({t['rows_forwarded'] / max(1, t['forwards']):.1f} rows each), mean budget "
                             f"{sum(sum(r.get('budgets', [])) for r in requests) / max(1, sum(r['rounds'] for r in requests)):.1f}")
                pipeline.stop_worker(system.name)
        finally:
            if watch is not None:
                watch.close()
            pipeline.close()

    if greedy is not None:
        for row in hf_rows:  # hf after the services, so it is compared with their tokens
            greedy.add(row)
        if not [r for r in log.rows("level") if r["system"] != HF]:
            progress("greedy identity: no service results to compare")
        else:
            progress("greedy identity: " + ("every service system and level gave the same tokens" if not greedy.services
                                            else f"{len(greedy.services)} SERVICE MISMATCHES") +
                     ("; hf-batched the same too" if not greedy.hf else f"; hf-batched differs in {len(greedy.hf)} requests"))

    return write_report(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    report = measure(args)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
