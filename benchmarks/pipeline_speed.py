"""End-to-end speed of the speculative pipeline on this machine (shared/BENCHMARKS.md sections 2
and 5): tokens/s through DraftWorker.Generate, with target and draft services as separate
processes on loopback (real gRPC), against -- in the same run, prompt by prompt -- the target
alone through the same services (method "autoregressive"), the target alone in-process
(transformers greedy `generate`), and transformers' assisted generation with the same pair.
Greedy outputs are checked token for token against the in-process target.

    python -m benchmarks.pipeline_speed                 # full protocol: Qwen pair, 3 sets x 6 prompts (~2 h here)
    python -m benchmarks.pipeline_speed --small         # SmolLM2-135M + a self-draft of its first layers
    python -m benchmarks.pipeline_speed --tiny          # random tiny models (plumbing check)
    python -m benchmarks.pipeline_speed --prompts 2 --new-tokens 24 --sets code --temperatures 0

Writes OUT/results.jsonl (one line per request; reruns skip what is there) and OUT/REPORT.md
(benchmarks.pipeline_speed_report). Every process runs one torch thread (the services' tests
helper sets OMP_NUM_THREADS=1), so the in-process baselines do too unless --threads says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "reports" / "pipeline_speed"
DEFAULTS = {"dtype": "bfloat16", "pair": "qwen", "sets": "prose,code,licence", "prompts": 6, "prompt_tokens": 128, "new_tokens": 64,
            "temperatures": "0,0.6", "repeats": 1, "configs": "chain:4,dyspec-layer:16,dyspec:16,best-first:16,dyspec:auto",
            "draft_top_ks": "20", "baselines": "hf,hf-all-cores,assisted", "kernels": "auto"}
# Sized to about two hours on the 2-core CPU (bf16 Qwen pair: ~21 s per request, 8 systems, 36 prompt x
# temperature cells). Untruncated draft distributions (--draft-top-ks 0,20) cost ~1 MB per tree node on the
# wire (their serialisation is measured in every run anyway) and double the run.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pair = p.add_mutually_exclusive_group()
    pair.add_argument("--pair", choices=("qwen", "small", "tiny"), default=DEFAULTS["pair"])
    pair.add_argument("--small", dest="pair", action="store_const", const="small", help="= --pair small")
    pair.add_argument("--tiny", dest="pair", action="store_const", const="tiny", help="= --pair tiny")
    p.add_argument("--draft-layers", type=int, default=8, help="--small: layers kept in the self-draft")
    p.add_argument("--sets", default=DEFAULTS["sets"], help="prompt sets (benchmarks.prompts); tiny uses random ids")
    p.add_argument("--prompts", type=int, default=DEFAULTS["prompts"], help="prompts per set")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    p.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    p.add_argument("--temperatures", default=DEFAULTS["temperatures"], help="target temperatures; exactness is checked at 0")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="requests per prompt and system")
    p.add_argument("--configs", default=DEFAULTS["configs"],
                   help="speculative configs METHOD:BUDGET[:serial] (BUDGET a number or 'auto', the worker's tuner; "
                        "':serial' runs on a worker started with --no-overlap)")
    p.add_argument("--draft-top-ks", default=DEFAULTS["draft_top_ks"],
                   help="one draft worker per value of --draft-top-k (0 = untruncated draft distributions)")
    p.add_argument("--max-budget", type=int, default=64, help="largest tree 'auto' may choose")
    p.add_argument("--baselines", default=DEFAULTS["baselines"],
                   help="in-process baselines: hf (target alone, --threads threads), hf-all-cores (target alone on every "
                        "core), assisted (transformers assisted generation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process baselines")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=DEFAULTS["dtype"],
                   help="weights of both models (services and in-process baselines alike)")
    p.add_argument("--draft-dtype", choices=("float32", "bfloat16", "int8", "int4"), default=None,
                   help="the draft's weights instead (worker and assisted baseline); default: --dtype. int8 is dynamic "
                        "quantisation (benchmarks/reports/draft_dtype); the output stays the target's either way")
    p.add_argument("--kernels", choices=("auto", "packed", "stock"), default=DEFAULTS["kernels"],
                   help="linear layers of every system, services and in-process alike (engine.KERNELS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="discard earlier results in OUT")
    return p


def parse_configs(text: str) -> list[tuple[str, int, bool]]:
    """(method, budget (0 = auto), serial) per config."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        method, _, rest = item.partition(":")
        budget, _, mode = rest.partition(":")
        if mode not in ("", "serial"):
            raise ValueError(f"config {item!r}: the third part can only be 'serial'")
        out.append((method, 0 if budget in ("", "auto") else int(budget), mode == "serial"))
    return out


def config_label(method: str, budget: int, serial: bool = False) -> str:
    return f"{method}:{budget or 'auto'}" + (":serial" if serial else "")


def worker_name(top_k: int, serial: bool) -> str:
    return f"k{top_k}" + ("-serial" if serial else "")


def first_mismatch(tokens: list[int], reference: list[int]) -> int:
    """-1 when equal, else the first differing index (a length difference counts)."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return -1 if len(tokens) == len(reference) else min(len(tokens), len(reference))


def tie_margin(target, prompt: list[int], reference: list[int], tokens: list[int], at: int) -> dict | None:
    """How close the target itself is to choosing the other token where a greedy output first differs:
    one uncached forward over the prompt and the reference's first `at` tokens; `gap` is the reference
    token's logit minus the differing token's (both in the target's dtype, read as float). A gap
    within a few units of the dtype's rounding at that logit (bf16 keeps 8 significant bits) is a
    near-tie that kernels for other batch shapes may break the other way; a large gap would be a
    bug. None when one output is just shorter (nothing to compare)."""
    import torch

    if at >= len(reference) or at >= len(tokens):
        return None
    ids = torch.tensor([list(prompt) + list(reference[:at])])
    with torch.inference_mode():
        logits = target(ids).logits[0, -1].float()
    top2 = torch.topk(logits, 2)
    return {"gap": float(logits[reference[at]] - logits[tokens[at]]), "reference_logit": float(logits[reference[at]]),
            "top1_minus_top2": float(top2.values[0] - top2.values[1]),
            "reference_is_argmax": bool(int(top2.indices[0]) == reference[at])}


def measure(args, progress=print) -> Path:
    import torch

    from benchmarks.machine import describe
    from benchmarks.model_pairs import model_pair, prompts_for
    from benchmarks.pipeline_services import Pipeline
    from benchmarks.results_log import ResultsLog
    from benchmarks.wire_cost import serialisation_cost
    from serving.models import threads_for

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    log = ResultsLog(out / "results.jsonl", fresh=args.fresh)
    pair = model_pair(args.pair, args.draft_layers, dtype=args.dtype, draft_dtype=args.draft_dtype, kernels=args.kernels)
    temps = [float(t) for t in args.temperatures.split(",")]
    configs = parse_configs(args.configs)
    top_ks = [int(k) for k in args.draft_top_ks.split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    log.add({"kind": "run", "argv": getattr(args, "argv", None) or [], "pair": pair.name,
             "pair_description": pair.description, "machine": describe(args.threads), "started": time.time()})

    progress(f"loading {pair.description} in-process ...")
    t0 = time.perf_counter()
    target, draft, tokenizer = pair.load()
    on_threads = threads_for(target)  # all cores: to our kernels where the target runs on ours only
    vocab = target.config.vocab_size
    prompts = prompts_for(pair, tokenizer, args.sets.split(","), args.prompts, args.prompt_tokens, vocab)
    progress(f"  loaded in {time.perf_counter() - t0:.0f} s; prompt sets {', '.join(f'{k}: {len(v)}' for k, v in prompts.items())}")
    for k in sorted({0, *top_ks}):  # serialisation cost of one shipped distribution of this support (model-free)
        log.add({"kind": "wire_cost", "pair": pair.name, "draft_top_k": k, **serialisation_cost(vocab, k)})

    pipeline = Pipeline(pair, Path(tempfile.mkdtemp(prefix="dyspec-bench-logs-")), progress=progress)
    try:
        progress("starting the target service and one draft worker per draft top-k ...")
        pipeline.start_target()
        for k in top_ks:
            for serial in sorted({c[2] for c in configs} | {False}):
                pipeline.start_worker(worker_name(k, serial), ["--budget", "auto", "--max-budget", str(args.max_budget),
                                                               "--draft-top-k", str(k), "--overlap", "off" if serial else "on"])
        warm = next(iter(prompts.values()))[0]
        progress("warm-up (not recorded) ...")
        for k in top_ks:
            for serial in sorted({c[2] for c in configs} | {False}):
                pipeline.generate(worker_name(k, serial), warm, 2, configs[0][0] if configs else "autoregressive",
                                  configs[0][1] if configs else 0)
        hf_generate_warm(target, draft, warm, baselines)

        systems = [("hf-target", None, 0, None, False)] if "hf" in baselines else []
        systems += [("hf-target-all-cores", None, 0, None, False)] if "hf-all-cores" in baselines else []
        systems += [("hf-assisted", None, 0, None, False)] if "assisted" in baselines else []
        systems += [("service", "autoregressive", 0, top_ks[0], False)]
        systems += [("service", m, b, k, serial) for k in top_ks for (m, b, serial) in configs]
        total = sum(len(v) for v in prompts.values()) * len(temps) * args.repeats * len(systems)
        done = 0
        # Prompt index outermost: a run stopped early (results are kept per request) still covers every
        # set and temperature with the same number of prompts.
        cells = [(set_name, index, set_prompts[index]) for index in range(max(map(len, prompts.values())))
                 for set_name, set_prompts in prompts.items() if index < len(set_prompts)]
        for set_name, index, prompt in cells:
            for temperature in temps:
                for repeat in range(args.repeats):
                    reference = None
                    for system, method, budget, k, serial in systems:
                        done += 1
                        label = (system if method is None else "service autoregressive" if method == "autoregressive"
                                 else f"{config_label(method, budget, serial)} top-k {k}")
                        key = json.dumps([pair.description, set_name, index, args.prompt_tokens, args.new_tokens,
                                          temperature, repeat, system, method, budget, k] + (["serial"] if serial else []))
                        if log.has(key):
                            if system == "hf-target":  # a resumed prompt is still checked against its reference
                                reference = log.get(key)["tokens"]
                            progress(f"[{done}/{total}] {set_name}#{index} T={temperature:g} {label}: done earlier")
                            continue
                        if system == "service":
                            r = pipeline.generate(worker_name(k, serial), prompt, args.new_tokens, method, budget, temperature,
                                                  args.seed + repeat)
                        else:
                            from benchmarks.hf_baselines import hf_generate

                            threads = os.cpu_count() if system == "hf-target-all-cores" else args.threads
                            with on_threads(threads):
                                r = hf_generate(target, prompt, args.new_tokens, temperature, args.seed + repeat,
                                                draft if system == "hf-assisted" else None)
                        if system == "hf-target":
                            reference = r.tokens
                        mismatch = first_mismatch(r.tokens, reference) if temperature == 0 and reference is not None else None
                        margin = (tie_margin(target, prompt, reference, r.tokens, mismatch)
                                  if mismatch is not None and mismatch >= 0 else None)
                        record = {"kind": "request", "key": key, "pair": pair.name, "set": set_name, "prompt": index,
                                  "temperature": temperature, "repeat": repeat, "system": system, "method": method,
                                  "budget": budget, "draft_top_k": k, "serial": serial, "dtype": args.dtype,
                                  "draft_dtype": args.draft_dtype or args.dtype, "kernels": args.kernels,
                                  "new_tokens": len(r.tokens),
                                  "wall_s": r.wall_s, "first_chunk_s": r.first_chunk_s,
                                  "first_chunk_tokens": r.first_chunk_tokens, "tokens_per_s": r.tokens_per_s,
                                  "decode_tokens_per_s": r.decode_tokens_per_s, "chunks": len(r.chunk_times_s),
                                  "mismatch_at": mismatch, "mismatch_margin": margin, "finish_reason": r.finish_reason,
                                  "stats": r.stats,
                                  "rounds": r.rounds, "bytes_to_target": r.bytes_to_target,
                                  "bytes_to_draft": r.bytes_to_draft, "tokens": r.tokens}
                        log.add(record)
                        steps = r.stats.get("steps") or len(r.chunk_times_s)
                        check = "" if mismatch is None else " exact" if mismatch < 0 else f" MISMATCH at {mismatch}"
                        check += f" (target's logit gap there {margin['gap']:.3f})" if margin else ""
                        progress(f"[{done}/{total}] {set_name}#{index} T={temperature:g} {label}: {len(r.tokens)} tok in "
                                 f"{r.wall_s:.1f} s = {r.tokens_per_s:.2f} tok/s, {len(r.tokens) / max(1, steps):.2f} "
                                 f"tok/step{check}")
    finally:
        pipeline.close()
    from benchmarks.pipeline_speed_report import write_report

    return write_report(out)


def hf_generate_warm(target, draft, prompt, baselines) -> None:
    from benchmarks.hf_baselines import hf_generate

    if "hf" in baselines:
        hf_generate(target, prompt, 2)
    if "assisted" in baselines:
        hf_generate(target, prompt, 2, assistant=draft)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    print(f"python -m benchmarks.pipeline_speed {shlex.join(args.argv)}", flush=True)
    report = measure(args, progress=lambda s: print(s, flush=True))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
