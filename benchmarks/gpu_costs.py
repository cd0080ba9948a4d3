"""Cost curves on a GPU (shared/BENCHMARKS.md sections 3 and 5): what a tree of n nodes costs
to verify and to draft, and how much of a speculative round is spent outside model forwards,
for the project's real model shapes.

  python -m benchmarks.gpu_costs --out DIR            (on a CUDA machine; ~3 min on an H200)
  python -m benchmarks.gpu_costs_report DIR benchmarks/reports/gpu_costs

Weights are random (architecture and dtype are what set the cost of a forward; the real
checkpoints are gigabytes and a lent GPU machine has no network): Qwen2.5-Coder-0.5B and -1.5B
shapes, and slices of a Llama-2-70B-shaped model (10 and 20 of its 80 layers; the fit over the two
gives the cost per layer and of the embedding/head). Acceptance cannot be measured on random
weights: the report combines these costs with the tokens per step measured on the real pair.

Everything runs through the project's own runners (`dyspec.hf_runner`), so the figures include
the tree mask, position ids and the logits copy back to the host that verification uses.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import time

import torch

from dyspec.coins import TorchCoins
from dyspec.decoding import verify_tree
from dyspec.hf_runner import HFDraftSession, HFTargetSession, _keep_positions
from dyspec.tree import ROOT, Draw, TokenTree
from dyspec.tree_attention import tree_attention_inputs
from dyspec.verify import Verdict
from dyspec.warp import SamplingParams

QWEN_COMMON = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False)
SHAPES = {
    "qwen2.5-coder-0.5b": dict(QWEN_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-coder-1.5b": dict(QWEN_COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2),
}
LLAMA70B = dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
                hidden_act="silu")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=2048)
TREE_SIZES = (0, 1, 3, 7, 15, 31, 63, 127, 255, 511)
DRAFT_BATCHES = (1, 2, 4, 8, 16, 32, 64)


LEAN_DRAFT = "qwen2.5-coder-0.5b lean"
STATIC_DRAFT = "qwen2.5-coder-0.5b lean static"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(shape)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_tree(n: int, vocab: int, rng: random.Random) -> TokenTree:
    """n nodes, each under the root or an earlier node (bushy near the top, like drafted trees)."""
    tree = TokenTree()
    for i in range(n):
        parent = ROOT if i == 0 or rng.random() < 0.15 else rng.randrange(i // 2, i)
        tree.add(parent, rng.randrange(vocab), 0.0)
    return tree


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over reps (after warm-ups), synchronising the device around each."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def verify_curve(model, context: int, device: str, reps: int) -> list[dict]:
    """Per tree size, on a session holding `context` committed tokens:
      forward_s          the model forward alone (mask and ids already on the device);
      verify_greedy_s    `forward_tree` + greedy `verify_tree` (what a round pays at T=0);
      verify_sampled_s   the same at T=0.6 (deterministic-rule tree: rows on the walk copied);
      all_rows_to_host_s `forward_tree` + copying every logits row to the host (how verification
                         worked before: kept to show what that copy costs)."""
    rng = random.Random(0)
    vocab = model.config.vocab_size
    session = HFTargetSession(model, [rng.randrange(vocab) for _ in range(context)])
    empty = TokenTree()
    session.forward_tree(empty)  # prefill
    session.commit(empty, Verdict([], 0, [0]))  # steady state: the root's KV is computed with the tree
    cached = session.cache.get_seq_length()
    greedy, sampled = SamplingParams(0.0), SamplingParams(0.6)
    rows = []
    for n in TREE_SIZES:
        tree = random_tree(n, vocab, rng)
        tree.draw = Draw.DETERMINISTIC

        def verify(params):
            def run():
                verify_tree(tree, session.forward_tree(tree), params, TorchCoins(0))
                _keep_positions(session.cache, cached, [])
            return run

        def all_rows_to_host():
            session.forward_tree(tree).cpu()
            _keep_positions(session.cache, cached, [])

        def forward_only():
            mask, positions = tree_attention_inputs(tree, session.n_cached, len(session.suffix), session.dtype)
            ids = torch.tensor([session.suffix + tree.tokens], device=device)
            mask, positions = mask.to(device, session.dtype), positions.to(device)
            sync(device)
            t = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=session.cache,
                      use_cache=True, logits_to_keep=n + 1)
            sync(device)
            forward_only.seconds.append(time.perf_counter() - t)
            _keep_positions(session.cache, cached, [])

        forward_only.seconds = []
        row = {"nodes": n, "rows": n + 1}
        row["verify_greedy_s"] = timed(verify(greedy), device, reps)
        row["verify_sampled_s"] = timed(verify(sampled), device, reps)
        row["all_rows_to_host_s"] = timed(all_rows_to_host, device, reps)
        timed(forward_only, device, reps)
        row["forward_s"] = statistics.median(forward_only.seconds[2:])
        rows.append(row)
        log(f"  n={n}: forward {row['forward_s'] * 1e3:.2f} ms, verify greedy {row['verify_greedy_s'] * 1e3:.2f} / "
            f"sampled {row['verify_sampled_s'] * 1e3:.2f} ms, all rows to host {row['all_rows_to_host_s'] * 1e3:.2f} ms")
    return rows


def draft_curve(model, context: int, device: str, reps: int) -> list[dict]:
    """Per batch of k tree nodes: one `HFDraftSession.logits` call (the batched draft forward a
    builder makes), on a tree whose root is already cached."""
    rng = random.Random(1)
    vocab = model.config.vocab_size
    rows = []
    for k in DRAFT_BATCHES:
        session = HFDraftSession(model, [rng.randrange(vocab) for _ in range(context)])
        tree = TokenTree()
        session.logits(tree, [ROOT])  # prefill + root
        base_len = session.cache.get_seq_length()
        for _ in range(k):
            tree.add(ROOT, rng.randrange(vocab), 0.0)
        nodes = list(range(k))

        def step():
            session.logits(tree, nodes)
            _keep_positions(session.cache, base_len, [])

        s = timed(step, device, reps)
        rows.append({"batch": k, "draft_s": s})
        log(f"  draft batch {k}: {s * 1e3:.2f} ms")
    return rows


def round_breakdown(target, draft, device: str, new_tokens: int) -> list[dict]:
    """Whole `dyspec.generate` runs: where a round's time goes on this device. Random weights
    accept ~nothing, so every round emits one token; the split of its time is what is measured."""
    from dyspec import generate

    rng = random.Random(2)
    prompt = [rng.randrange(target.config.vocab_size) for _ in range(128)]
    out = []
    configs = [("autoregressive", 1, 0.0, 0), ("dyspec", 64, 0.0, 0), ("dyspec", 64, 0.6, 0),
               ("dyspec", 64, 0.6, 32), ("dyspec-layer", 64, 0.6, 32), ("best-first", 64, 0.0, 32),
               ("chain", 8, 0.0, 32)]
    for method, budget, temp, top_k in configs:
        generate(target, draft, prompt, max_new_tokens=4, method=method, budget=budget, temperature=temp,
                 draft_top_k=top_k, eos_token_id=[])  # warm-up
        r = generate(target, draft, prompt, max_new_tokens=new_tokens, method=method, budget=budget,
                     temperature=temp, draft_top_k=top_k, eos_token_id=[])
        rounds = r.rounds
        total = sum(x.draft_s + x.build_s + x.verify_s + x.commit_s for x in rounds)
        rec = {"method": method, "budget": budget, "temperature": temp, "draft_top_k": top_k, "rounds": len(rounds),
               "draft_forward_s": sum(x.draft_s for x in rounds), "build_s": sum(x.build_s for x in rounds),
               "target_forward_s": sum(x.target_forward_s for x in rounds),
               "verify_other_s": sum(x.verify_s - x.target_forward_s for x in rounds),
               "commit_s": sum(x.commit_s for x in rounds), "round_s_total": total,
               "tree_size_mean": statistics.fmean(x.tree_size for x in rounds)}
        rec["outside_share"] = (rec["build_s"] + rec["verify_other_s"] + rec["commit_s"]) / total
        out.append(rec)
        log(f"  {method} B={budget} T={temp} top_k={top_k}: {1e3 * total / len(rounds):.1f} ms/round, "
            f"outside forwards {100 * rec['outside_share']:.1f}%")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--llama-layers", default="10,20", help="Llama-2-70B slices to time ('' to skip)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--tiny", action="store_true", help="2-layer, 64-wide versions of every shape (a smoke test)")
    args = p.parse_args(argv)
    shapes = {n: dict(s, **TINY) for n, s in SHAPES.items()} if args.tiny else SHAPES
    llama = dict(LLAMA70B, **TINY) if args.tiny else LLAMA70B
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    result = {"device": args.device, "dtype": args.dtype, "context": args.context, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "verify": {}, "draft": {}, "rounds": []}

    def save():
        (out / "gpu_costs.json").write_text(json.dumps(result, indent=1))

    import transformers

    result["transformers"] = transformers.__version__
    models = {}
    for name, shape in shapes.items():
        log(f"{name}: random weights, {args.dtype}, {args.device}")
        models[name] = build_model(shape, args.device, dtype)
        result["verify"][name] = verify_curve(models[name], args.context, args.device, args.reps)
        save()
    log("draft curve: qwen2.5-coder-0.5b")
    result["draft"]["qwen2.5-coder-0.5b"] = draft_curve(models["qwen2.5-coder-0.5b"], args.context, args.device, args.reps)
    save()
    # the same draft on the lean forward (what the draft service runs), then on static KV caches with
    # bucketed rows, which are CUDA graphs on a GPU (engine.graphed_forward)
    from engine.graphed_forward import StaticForwardRunner
    from engine.lean_decoder import LeanCausalLM

    lean = LeanCausalLM(models["qwen2.5-coder-0.5b"])
    log("draft curve: qwen2.5-coder-0.5b, lean forward")
    result["draft"][LEAN_DRAFT] = draft_curve(lean, args.context, args.device, args.reps)
    lean.use_static_cache(args.context + max(DRAFT_BATCHES) + 1, StaticForwardRunner(lean))
    log(f"draft curve: qwen2.5-coder-0.5b, lean forward on static caches (CUDA graphs: {lean.static_runner.graphs})")
    result["draft"][STATIC_DRAFT] = draft_curve(lean, args.context, args.device, args.reps)
    result["draft_graphs"] = lean.static_runner.graphs
    del lean
    save()
    log("speculative rounds: 0.5b draft -> 1.5b target")
    result["rounds"] = round_breakdown(models["qwen2.5-coder-1.5b"], models["qwen2.5-coder-0.5b"], args.device,
                                       args.new_tokens)
    save()
    models.clear()
    for layers in [int(x) for x in args.llama_layers.split(",") if x]:
        name = f"llama2-70b-{layers}-layers"
        log(f"{name}: random weights, {args.dtype}, {args.device}")
        model = build_model(dict(llama, num_hidden_layers=layers), args.device, dtype)
        result["verify"][name] = verify_curve(model, args.context, args.device, max(3, args.reps // 2))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        save()
    log(f"wrote {out / 'gpu_costs.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
