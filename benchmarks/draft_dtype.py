"""What a cheaper draft dtype buys and costs: draft forward time per dtype (float32, bfloat16, int8 as
served: few rows on the int8-weight kernel and more on fbgemm, int8-fbgemm: torch's dynamic quantisation
alone, int8-fp32-head: fbgemm with a float32 lm_head) at 1-16 rows on one thread, and the tree quality
it costs (tokens per step of dyspec.generate against the float32 target).

    python -m benchmarks.draft_dtype            # Qwen2.5-Coder 0.5B draft, 1.5B target (~10 min here)
    python -m benchmarks.draft_dtype --tiny     # tiny random models (plumbing check, seconds)

The output distribution never depends on the draft's dtype (the target verifies against the exact
distribution each child was drawn from), so every greedy output must equal the target's own; the
run checks that too. Writes OUT/results.json and OUT/REPORT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "reports" / "draft_dtype"
VARIANTS = {  # label -> (serving dtype, quantise lm_head, kernels, draft forward, $DYSPEC_GEMM_ISA while loading)
    "float32": ("float32", True, "auto", "lean", None),
    "bfloat16": ("bfloat16", True, "auto", "lean", None),
    "int8": ("int8", True, "auto", "lean", None),  # what --dtype int8 serves: lean forward, int8 x int8 kernel + fbgemm
    "int8-avx2": ("int8", True, "auto", "lean", "avx2"),  # the same on the kernel's AVX2 path (as on an AVX2-only CPU)
    "int8-transformers": ("int8", True, "auto", "transformers", None),  # the same kernels under transformers' forward
    "int8-fbgemm": ("int8", True, "stock", "transformers", None),  # torch's dynamic quantisation alone
    "int8-fp32-head": ("int8", False, "stock", "transformers", None),  # fbgemm, lm_head kept float32
    "int4": ("int4", True, "auto", "native", None),  # what --dtype int4 serves: 4-bit x int8 kernel (q4x8.c), layers native
    "int4-lean": ("int4", True, "auto", "lean", None),  # the same kernels under the lean forward (before engine.native_draft)
    "int4-avx2": ("int4", True, "auto", "native", "avx2"),  # the same on the kernel's AVX2 path
}
INT8_NOTE = {  # keyed by whether the run had the int8-fbgemm variant (runs before it: "int8" was fbgemm alone)
    False: "int8 = `serving.models.quantize_int8`: torch dynamic quantisation (fbgemm) of every nn.Linear, weights "
           "int8 per output channel, activations quantised per forward; embeddings, norms and KV cache float32.",
    True: "Variants as `python -m draft_service` loads them (`serving.models.load_draft_lm`): float32, bfloat16 and "
          "int8 run the lean forward (engine.lean_decoder). int8 = what `--dtype int8` serves: weights int8 per "
          "output channel; calls of up to 8 rows (AVX512-VNNI; 3 on AVX2) on the project's int8 x int8 kernel "
          "(engine/kernels/q8x8.c: each row of activations rounded to int8 too), larger calls (the prefill below "
          "included) on torch's dynamic quantisation (fbgemm, activations quantised per forward); int8-avx2 = the "
          "same with the kernel held to its AVX2 path (what an AVX2-only CPU runs); int8-transformers = the same "
          "kernels under transformers' own forward; int8-fbgemm = fbgemm for every call, transformers' forward. "
          "Embeddings, norms and KV cache float32. (Reports made before commit 7487f95 measured an older "
          "float32-product int8 kernel and no lean forward.)",
}
CPU_FLAGS_COMMAND = r"grep -o 'avx512_bf16\|amx\|avx2' /proc/cpuinfo | sort -u"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.draft_dtype", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models from tests.service_models")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--rows", default="1,4,8,16", help="query rows per timed draft forward")
    p.add_argument("--context", type=int, default=128, help="cached tokens before each timed forward")
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per (dtype, rows); median reported")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--report-only", action="store_true", help="rewrite OUT/REPORT.md from OUT/results.json")
    return p


def cpu_flags() -> list[str]:
    """What CPU_FLAGS_COMMAND prints."""
    from serving.cpu import cpu_flags as all_flags

    flags = all_flags()
    amx = {"amx"} if any("amx" in f for f in flags) else set()
    return sorted({f for f in ("avx512_bf16", "avx2") if f in flags} | amx)


def load_draft(source, label: str):
    import os

    from engine import native
    from serving.models import load_causal_lm, load_draft_lm, quantize_int8

    dtype, lm_head, kernels, forward, isa = VARIANTS[label]
    before = os.environ.get(native.ISA_ENV)
    if isa is not None:  # the kernels pick their instruction set when they pack the weights, at load
        os.environ[native.ISA_ENV] = isa
    try:
        if dtype == "int8" and not lm_head:  # float32 nn.Linear layers (not packed) for quantize_int8 to find
            model = load_causal_lm(dataclasses.replace(source, dtype="float32"), prepack=False)
            return quantize_int8(model, lm_head=False, kernels=kernels)
        return load_draft_lm(dataclasses.replace(source, dtype=dtype, kernels=kernels), forward=forward)
    finally:
        if isa is not None:
            if before is None:
                os.environ.pop(native.ISA_ENV, None)
            else:
                os.environ[native.ISA_ENV] = before


def chain_inputs(context: int, rows: int, dtype):
    """Additive mask and positions of `rows` new tokens over `context` cached ones (what a draft
    forward of a path of tree nodes gets from the runner)."""
    import torch

    visible = torch.ones(rows, context + rows, dtype=torch.bool)
    visible[:, context:] = torch.ones(rows, rows, dtype=torch.bool).tril()
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None], torch.arange(context, context + rows)[None]


def prefill(model, ids: list[int], cache):
    """Logits [1, len(ids), vocab] of one causal forward of `ids` into `cache`, called as the
    runners call a draft (mask and positions given), so transformers' and the lean forward both take it."""
    import torch

    mask, positions = chain_inputs(0, len(ids), next(model.parameters()).dtype)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=positions, cache=cache,
                     use_cache=True, logits_to_keep=len(ids)).logits


def time_forwards(models: dict, context_ids: list[int], rows_list: list[int], repeats: int) -> dict:
    """{label: {rows: [seconds...]}}: each model's cache holds `context_ids`; each timed forward adds
    `rows` tokens (one draft forward, as the runner calls it) and is cropped off again. Dtypes and row
    counts are interleaved, so a busy neighbour slows all of them alike."""
    import torch

    from dyspec.hf_runner import session_cache

    caches = {}
    for label, model in models.items():
        caches[label] = session_cache(model)  # the native draft runs on its own cache only
        prefill(model, context_ids, caches[label])
    vocab = min(int(m.config.vocab_size) for m in models.values())
    times = {label: {r: [] for r in rows_list} for label in models}
    for rep in range(repeats + 1):  # the first pass warms each shape up and is not recorded
        for rows in rows_list:
            for label, model in models.items():
                dtype = next(model.parameters()).dtype
                mask, positions = chain_inputs(len(context_ids), rows, dtype)
                ids = torch.tensor([[(11 * i + rep) % vocab for i in range(rows)]])
                with torch.inference_mode():
                    start = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=caches[label],
                          use_cache=True, logits_to_keep=rows).logits.float().cpu()
                    elapsed = time.perf_counter() - start
                caches[label].crop(-rows)
                if rep:
                    times[label][rows].append(elapsed)
    return times


def logit_agreement(models: dict, ids: list[int]) -> dict:
    """Per variant: argmax agreement with float32 and mean total-variation distance of the softmax,
    over every row of one uncached forward of `ids` (a prefill)."""
    import torch

    from dyspec.hf_runner import session_cache

    logits = {label: prefill(m, ids, session_cache(m))[0].float() for label, m in models.items()}
    ref = logits.get("float32")
    if ref is None:
        return {}
    p = ref.softmax(-1)
    return {label: {"argmax_agreement": float((l.argmax(-1) == ref.argmax(-1)).float().mean()),
                    "mean_tv": float(0.5 * (l.softmax(-1) - p).abs().sum(-1).mean())} for label, l in logits.items()}


def measure(args, progress=print) -> dict:
    import torch

    from benchmarks.machine import describe
    from benchmarks.model_pairs import model_pair
    from dyspec.generate import generate

    torch.set_num_threads(args.threads)
    labels = [v for v in args.variants.split(",") if v]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rows_list = [int(r) for r in args.rows.split(",")]
    pair = model_pair("tiny" if args.tiny else "qwen", dtype="float32")
    result = {"argv": args.argv, "machine": describe(args.threads), "cpu_flags": cpu_flags(),
              "pair": pair.description, "variants": labels, "rows": rows_list, "context": args.context,
              "repeats": args.repeats, "new_tokens": args.new_tokens, "budget": args.budget,
              "prompt_tokens": args.prompt_tokens, "started": time.time()}
    from serving.models import load_tokenizer

    tokenizer = load_tokenizer(pair.target)
    if tokenizer is None:
        import random

        rng = random.Random(0)
        prompts = {name: [rng.randrange(64) for _ in range(args.prompt_tokens)] for name in ("random-a", "random-b")}
        context_ids = [rng.randrange(64) for _ in range(args.context)]
    else:
        from benchmarks.prompts import prompt_set

        prompts = {name: prompt_set(name, 1, args.prompt_tokens, tokenizer)[0] for name in ("code", "prose")}
        context_ids = prompt_set("code", 1, args.context, tokenizer, skip=1)[0]

    progress(f"loading the draft in {len(labels)} variants ({pair.draft.model_dir or pair.draft.factory}) ...")
    models = {}
    for label in labels:
        t0 = time.perf_counter()
        models[label] = load_draft(pair.draft, label)
        progress(f"  {label}: loaded in {time.perf_counter() - t0:.1f} s")
    progress(f"timing draft forwards: rows {rows_list}, {args.context} cached tokens, {args.repeats} repeats ...")
    t0 = time.perf_counter()
    times = time_forwards(models, context_ids, rows_list, args.repeats)
    result["forward_ms"] = {label: {str(r): 1e3 * statistics.median(v) for r, v in per.items()}
                            for label, per in times.items()}
    result["forward_ms_all"] = {label: {str(r): [1e3 * x for x in v] for r, v in per.items()}
                                for label, per in times.items()}
    for label in labels:
        progress(f"  {label}: " + ", ".join(f"{r} rows {result['forward_ms'][label][str(r)]:.1f} ms" for r in rows_list))
    progress(f"  ({time.perf_counter() - t0:.0f} s)")
    result["agreement"] = logit_agreement(models, prompts[next(iter(prompts))])
    models.clear()
    gc.collect()

    progress("loading the float32 target ...")
    from serving.models import load_target_lm

    target = load_target_lm(pair.target)
    quality = []
    reference = {}
    for label in labels:
        draft = load_draft(pair.draft, label)
        for name, ids in prompts.items():
            run = generate(target, draft, ids, max_new_tokens=args.new_tokens, method="dyspec", budget=args.budget,
                           temperature=0)
            if name not in reference:
                reference[name] = generate(target, None, ids, max_new_tokens=args.new_tokens,
                                           method="autoregressive").tokens
            row = {"variant": label, "prompt": name, "tokens": len(run.tokens), "steps": run.steps,
                   "tokens_per_step": len(run.tokens) / max(1, run.steps), "draft_s": run.draft_s,
                   "verify_s": run.verify_s, "bookkeeping_s": run.bookkeeping_s, "total_s": run.total_s,
                   "identical_to_target": run.tokens == reference[name]}
            quality.append(row)
            progress(f"  {label} / {name}: {row['tokens_per_step']:.2f} tokens/step over {run.steps} steps, draft "
                     f"{run.draft_s / max(1, run.steps):.2f} s/step, {run.total_s:.1f} s in all, "
                     f"{'identical to' if row['identical_to_target'] else 'DIFFERENT FROM'} the target's greedy output")
        del draft
        gc.collect()
    result["quality"] = quality
    result["elapsed_s"] = time.time() - result["started"]
    return result


def write_report(result: dict, out: Path) -> Path:
    from benchmarks.machine import describe_markdown

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    labels, rows = result["variants"], result["rows"]
    fp32 = result["forward_ms"].get("float32")
    lines = [
        "# Draft dtype: forward cost and tree quality",
        "",
        f"Produced by `{('python -m benchmarks.draft_dtype ' + shlex.join(result['argv'])).strip()}` "
        f"({result['elapsed_s'] / 60:.1f} min).",
        "",
        describe_markdown(result["machine"]),
        "",
        f"CPU flags (`{CPU_FLAGS_COMMAND}`): {', '.join(result['cpu_flags']) or 'none of them'}.",
        "",
        f"Models: {result['pair']}; the draft in each variant below, the target always float32. " + INT8_NOTE[
            "int8-fbgemm" in labels],  # runs before int8-fbgemm existed measured fbgemm alone as "int8"
        "",
        f"## Draft forward time (ms, median of {result['repeats']}, one thread, {result['context']} cached tokens)",
        "",
        "One draft forward of N new rows over the cache, with the runner's additive mask and position ids; variants "
        "and row counts interleaved. In parentheses: speed-up over float32.",
        "",
        "| variant | " + " | ".join(f"{r} rows" for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for label in labels:
        cells = []
        for r in rows:
            ms = result["forward_ms"][label][str(r)]
            cells.append(f"{ms:.1f}" + (f" ({fp32[str(r)] / ms:.2f}x)" if fp32 and label != "float32" else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result.get("agreement"):
        lines += ["", "Logits against the float32 draft over one prefill of the first prompt "
                      f"({result['prompt_tokens']} rows): argmax agreement and mean total-variation distance.", "",
                  "| variant | argmax agreement | mean TV |", "|---|---:|---:|"]
        for label, a in result["agreement"].items():
            lines.append(f"| {label} | {a['argmax_agreement']:.3f} | {a['mean_tv']:.3f} |")
    prompts = list(dict.fromkeys(q["prompt"] for q in result["quality"]))
    lines += [
        "",
        f"## Tree quality: tokens per step (dyspec, budget {result['budget']}, greedy target, "
        f"{result['new_tokens']} new tokens, {result['prompt_tokens']}-token prompts)",
        "",
        "`dyspec.generate.generate(target, draft, ids, max_new_tokens, method='dyspec', budget, temperature=0)` "
        "(draft temperature 0.6, untruncated drafts, overlapped rounds). Draft ms/step: time inside draft forwards per "
        "target step (in-process, the target on a second thread, shared machine: indicative only).",
        "",
        "| variant | " + " | ".join(f"{p}: tokens/step" for p in prompts) + " | mean tokens/step | draft ms/step | "
        "draft ms/token | identical to target greedy |",
        "|---|" + "---:|" * len(prompts) + "---:|---:|---:|---|",
    ]
    per_token = {}
    for label in labels:
        runs = {q["prompt"]: q for q in result["quality"] if q["variant"] == label}
        tps = [runs[p]["tokens_per_step"] for p in prompts]
        steps = sum(runs[p]["steps"] for p in prompts)
        draft_s = sum(runs[p]["draft_s"] for p in prompts) / max(1, steps)
        same = all(runs[p]["identical_to_target"] for p in prompts)
        tokens = sum(runs[p]["tokens"] for p in prompts)
        per_token[label] = 1e3 * sum(runs[p]["draft_s"] for p in prompts) / max(1, tokens)
        lines.append(f"| {label} | " + " | ".join(f"{t:.2f}" for t in tps) + f" | {statistics.mean(tps):.2f} | "
                     f"{1e3 * draft_s:.0f} | {per_token[label]:.0f} | {'yes' if same else 'NO'} |")
    steps_per_run = statistics.mean(q["steps"] for q in result["quality"])
    best = min(per_token, key=per_token.get)
    lines += [
        "",
        f"Each run takes about {steps_per_run:.0f} target steps, so one step more or less moves tokens/step by "
        f"~{100 / max(1, steps_per_run):.0f}%: differences of that size are noise. Draft ms/token (draft forward time "
        f"per generated token) combines both costs; lowest here: {best} ({per_token[best]:.0f} ms/token"
        + (f" vs float32 {per_token['float32']:.0f}" if "float32" in per_token and best != "float32" else "") + ").",
        "",
    ]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        print(f"report: {write_report(json.loads((args.out / 'results.json').read_text()), args.out)}")
        return 0
    print(f"python -m benchmarks.draft_dtype {shlex.join(args.argv)}", flush=True)
    result = measure(args, progress=lambda s: print(s, flush=True))
    report = write_report(result, args.out)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
