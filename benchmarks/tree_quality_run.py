"""The measuring half of benchmarks.tree_quality (see its docstring)."""
from __future__ import annotations

import json
import time

import torch
from transformers import DynamicCache

from benchmarks.prompts import prompt_set
from benchmarks.results_log import ResultsLog
from dyspec import generate
from dyspec.builders import make_builder
from dyspec.coins import TorchCoins
from dyspec.decoding import TimedOracle
from dyspec.hf_runner import HFDraftSession, HFTargetSession
from dyspec.tree import ROOT, TokenTree
from dyspec.verify import Verdict, verify_stochastic
from dyspec.warp import SamplingParams, draft_distribution, target_probs

from benchmarks.tree_quality import CHAIN_LENGTHS, LARGE_BUDGET_METHODS, NESTED, T06_CHAIN_LENGTHS


def greedy_continuation(target, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The target's greedy continuation and its logits at each step (row i: before token i)."""
    session = HFTargetSession(target, prompt)
    tokens, rows = [], []
    empty = TokenTree()
    for _ in range(n):
        logits = session.forward_tree(empty)
        rows.append(logits[0].clone())
        tok = int(torch.argmax(logits[0]))
        session.commit(empty, Verdict([], tok, [tok]))
        tokens.append(tok)
    return tokens, rows


class DraftAtPositions:
    """Draft sessions positioned anywhere along prompt + greedy continuation, from one prefill."""

    def __init__(self, draft, sequence: list[int]):
        self.draft, self.sequence = draft, sequence
        self.full = DynamicCache()
        with torch.inference_mode():
            out = draft(input_ids=torch.tensor([sequence]), cache=self.full, use_cache=True)
        self.logits = out.logits[0].float()  # row i: next-token logits after sequence[:i+1]

    def session(self, n_committed: int) -> HFDraftSession:
        """A plain draft session whose committed tokens are sequence[:n_committed] (KV cached for
        all but the root). The one-at-a-time reference for the pooled scorer, which reuses the
        prefill for nodes on the sequence (benchmarks/tree_quality_batched.py)."""
        s = HFDraftSession(self.draft, self.sequence[:n_committed])
        cache = DynamicCache()
        for i, layer in enumerate(self.full.layers):
            cache.update(layer.keys[:, :, :n_committed - 1].clone(), layer.values[:, :, :n_committed - 1].clone(), i)
        s.cache, s.n_cached = cache, n_committed - 1
        return s


def accepted_greedy(tree: TokenTree, greedy: list[int], pos: int, limit: int) -> int:
    """Accepted draft tokens when the target's greedy tokens from `pos` on are `greedy[pos:]`,
    using only nodes with index < limit."""
    node, depth = ROOT, 0
    while pos + depth < len(greedy):
        want = greedy[pos + depth]
        nxt = next((c for c in tree.children_of(node) if c < limit and tree.tokens[c] == want), None)
        if nxt is None:
            break
        node, depth = nxt, depth + 1
    return depth


def builder_options(method: str, acceptance, prefetch: int, speculate: tuple[int, float] = (0, 0.0)) -> dict:
    """Benchmark settings per builder: Sequoia's measured acceptance vector; dyspec's prefetch and
    best-first's speculation (fewer sequential draft forwards; the tree is the same)."""
    if method == "sequoia":
        return {"acceptance": tuple(acceptance)}
    if method == "dyspec":
        return {"prefetch": prefetch}
    if method == "best-first":
        return {"speculate": speculate[0], "speculate_ratio": speculate[1]}
    return {}


def score_t0(method, budgets, draft_pos: "DraftAtPositions", prompt_len, greedy, new_tokens, draft_params,
             options, seed) -> dict:
    """{budget or "chainK": (tokens_per_step, steps, draft_calls, draft_s)} at T=0 for one prompt."""
    limits = list(CHAIN_LENGTHS) if method == "chain" else list(budgets)
    memo = {}  # nested builders: position -> tree at the largest budget, shared by all budgets

    def tree_at(pos, budget, builder):
        timed = TimedOracle(draft_pos.session(prompt_len + pos))
        tree = builder.build(timed, budget, TorchCoins(seed * 1_000_003 + pos))
        tree.q = {}  # scoring needs the shape and tokens; the distributions are ~2 MB per node
        return tree, timed.calls, timed.seconds

    out = {}
    for limit in limits:
        builder = make_builder(method, draft_params=draft_params, **options)  # fresh state per run
        pos = steps = emitted = calls = 0
        secs = 0.0
        while pos < new_tokens:
            if method in NESTED:
                if pos not in memo:
                    memo[pos] = tree_at(pos, max(limits), make_builder(method, draft_params=draft_params, **options))
                tree, c, t = memo[pos]
            else:
                tree, c, t = tree_at(pos, limit, builder)
            acc = accepted_greedy(tree, greedy, pos, limit)
            emitted += acc + 1
            pos += acc + 1
            steps += 1
            calls += c
            secs += t
        out[f"chain{limit}" if method == "chain" else limit] = (emitted / steps, steps, calls, secs)
    return out


def measure_acceptance(calib, temperature, draft_params, log, samples=4, ranks=8):
    """Sequoia's positional acceptance vector: P(the k-th sibling drawn without replacement at a
    node is the accepted one), from draft and target distributions along greedy continuations."""
    counts = [0.0] * ranks
    total = 0
    gen = torch.Generator().manual_seed(1234)
    for draft_logits_rows, target_rows, greedy in calib:
        for d_row, t_row, g in zip(draft_logits_rows, target_rows, greedy):
            q = draft_distribution(d_row, draft_params)
            logq = q.weights64().log()
            p = target_probs(t_row, SamplingParams(temperature)) if temperature > 0 else None
            for _ in range(samples if temperature > 0 else 1):
                keys = logq - torch.log(-torch.log(torch.rand(logq.shape, generator=gen, dtype=torch.float64)))
                order = torch.topk(keys, min(ranks, keys.numel())).indices
                tree = TokenTree()
                for j in order.tolist():
                    tree.add(ROOT, int(q.ids[j]), 0.0)
                tree.q = {ROOT: q}
                if temperature == 0:
                    hit = next((k for k, c in enumerate(tree.children_of(ROOT)) if tree.tokens[c] == g), None)
                else:
                    verdict = verify_stochastic(tree, lambda node: p, TorchCoins(int(torch.randint(1 << 30, (1,), generator=gen))))
                    hit = verdict.accepted[0] if verdict.accepted else None
                if hit is not None:
                    counts[hit] += 1
                total += 1
    vec = tuple(max(1e-4, c / total) for c in counts)
    log(f"sequoia acceptance vector at T={temperature}: {[round(v, 4) for v in vec]}")
    return vec


def run(args, out, log):
    from model_store import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = ResultsLog(out / "results.jsonl")
    log(f"loading target {args.target} and draft {args.draft}")
    target, tokenizer = load_model(args.target, progress=log, dtype=args.dtype)
    draft, _ = load_model(args.draft, progress=log, dtype=args.dtype)
    methods = args.methods.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    draft_params = SamplingParams(args.draft_temperature)
    sets = args.sets.split(",")
    prompts = {s: prompt_set(s, args.prompts_per_set, args.prompt_tokens, tokenizer) for s in sets}
    calib_prompts = {s: prompt_set(s, args.calibration_prompts, args.prompt_tokens, tokenizer,
                                   skip=args.prompts_per_set) for s in sets}
    horizon = args.new_tokens + 32  # greedy tokens beyond the last round's start, for its walk

    # calibration for Sequoia (disjoint prompts), once per target temperature (and per swept draft temperature)
    acc_path = out / "sequoia_acceptance.json"
    acceptance = json.loads(acc_path.read_text()) if acc_path.exists() else {}
    sweep = [float(t) for t in args.draft_temperature_sweep.split(",") if t] if not args.skip_sweep else []
    wanted = {"0.0": (0.0, draft_params), "0.6": (0.6, draft_params)}
    wanted.update({acceptance_key(0.0, t): (0.0, SamplingParams(t)) for t in sweep})
    if not set(wanted) <= set(acceptance):
        calib = []
        for s in sets:
            for i, prompt in enumerate(calib_prompts[s]):
                log(f"calibration {s} #{i}: target greedy continuation")
                greedy, t_rows = greedy_continuation(target, prompt, 32)
                dpos = DraftAtPositions(draft, prompt + greedy)
                d_rows = [dpos.logits[len(prompt) - 1 + j] for j in range(32)]
                calib.append((d_rows, t_rows, greedy))
        for key, (temp, params) in wanted.items():
            if key not in acceptance:
                acceptance[key] = list(measure_acceptance(calib, temp, params, log))
        acc_path.write_text(json.dumps(acceptance, indent=1))

    # T=0 first (cheap: draft forwards only), then T=0.6; both prompt-major with the sets interleaved,
    # so a run stopped early still covers every set evenly. A pool holds several prompt indices: one
    # prompt's last runs, a row or two per forward, overlap the other prompts' runs instead of running
    # alone at the end of every pool.
    t06_budgets = [int(b) for b in args.t06_budgets.split(",")]
    greedy_cache: dict = {}  # the target's greedy continuation of each prompt, for the T=0 runs and the sweep
    for indices in index_groups(args.prompts_per_set if not args.skip_t0 else 0, args.prompts_per_pool):
        score_prompts_t0(args, results, target, draft, [(s, i, prompts[s][i]) for i in indices for s in sets],
                         methods, budgets, horizon, draft_params, acceptance, log, greedy_cache=greedy_cache)
    n06 = min(args.prompts_per_set, args.t06_prompts_per_set) if not args.skip_t06 else 0
    for i in range(min(n06, args.unpooled_t06_prompts_per_set)):
        for s in sets:
            run_prompt_t06(args, results, target, draft, s, i, prompts[s][i], methods, t06_budgets, acceptance, log)
    for indices in index_groups(n06, args.prompts_per_pool):
        verify_prompts_t06(args, results, target, draft, [(s, i, prompts[s][i]) for i in indices for s in sets],
                           methods, t06_budgets, acceptance, log)
    # Draft temperature (BENCHMARKS.md: the best one per method), at T=0 (exact, draft forwards only) and
    # one budget, on the first prompts of each set; the main draft temperature's rows are the T=0 ones.
    # Prompts outermost, so a stopped run has every temperature for the prompts it did.
    for indices in index_groups(min(args.sweep_prompts_per_set, args.prompts_per_set), args.prompts_per_pool):
        for t in sweep:
            score_prompts_t0(args, results, target, draft, [(s, i, prompts[s][i]) for i in indices for s in sets],
                             methods, [args.sweep_budget], horizon, SamplingParams(t), acceptance, log,
                             draft_temperature=t, greedy_cache=greedy_cache)


def pooled_speculation(args) -> tuple[int, float]:
    return args.pooled_speculate, args.pooled_speculate_ratio


def index_groups(n: int, size: int) -> list[list[int]]:
    """0..n-1 in consecutive groups of `size` (the last may be shorter)."""
    return [list(range(i, min(n, i + size))) for i in range(0, n, max(1, size))]


def t06_runs(methods, t06_budgets, large_budget=None) -> list[tuple[str, int | str]]:
    """(method, budget) of the T=0.6 runs: every budget, `large_budget` for the layer-wise and
    deterministic builders too; chain's length does not grow with the budget: once per length
    (best reported)."""
    runs = [(m, b) for b in t06_budgets for m in methods if m != "chain"]
    runs += [(m, large_budget) for m in methods if m in LARGE_BUDGET_METHODS and large_budget]
    runs += [("chain", f"chain{k}") for k in T06_CHAIN_LENGTHS if "chain" in methods]
    runs.append(("autoregressive", t06_budgets[0]))
    return runs


def verify_prompts_t06(args, results, target, draft, items, methods, t06_budgets, acceptance, log):
    """The T=0.6 runs of several prompts in flight at once, verified by the target
    (benchmarks.tree_quality_verified): the tokens and accepted counts `generate` gives, with the
    target forwarding only the nodes its walk visits and every run's rows pooled."""
    from benchmarks.tree_quality_verified import VerifiedRun, run_verified_pooled

    todo = [[(m, b) for m, b in t06_runs(methods, t06_budgets, args.large_budget) if not results.has(f"t06/{s}/{i}/{m}/{b}")]
            for s, i, _ in items]
    items, todo = [x for x, keys in zip(items, todo) if keys], [keys for keys in todo if keys]
    if not items:
        return
    names = ", ".join(f"{s} #{i}" for s, i, _ in items)
    start = time.perf_counter()
    runs = [[VerifiedRun(m, int(b[5:]) if m == "chain" else b, seed=1000 + i) for m, b in keys]
            for (_, i, _), keys in zip(items, todo)]
    outcomes, stats = run_verified_pooled(
        draft, target, [prompt for _, _, prompt in items], runs, args.t06_new_tokens, 0.6,
        SamplingParams(args.draft_temperature),
        lambda m: builder_options(m, acceptance["0.6"], args.pooled_prefetch, pooled_speculation(args)), log,
        max_threads=args.max_builds)
    for (s, i, _), keys, outs in zip(items, todo, outcomes):
        for (m, b), out in zip(keys, outs):
            tps = sum(a + 1 for a in out["accepted"]) / len(out["accepted"])
            results.add({"key": f"t06/{s}/{i}/{m}/{b}", "temperature": 0.6, "set": s, "prompt": i, "method": m,
                         "budget": b, "tokens_per_step": tps, "steps": len(out["accepted"]), "pooled": True})
        log(f"T=0.6 {s} #{i}: " + ", ".join(f"{m}/{b}:{sum(a + 1 for a in o['accepted']) / len(o['accepted']):.2f}"
                                            for (m, b), o in zip(keys, outs)))
    results.add({"key": f"timing/t06/{names}", "timing": True, "temperature": 0.6, "prompts": len(items),
                 "runs": sum(len(k) for k in todo), "seconds": time.perf_counter() - start})
    log(f"T=0.6 {names}: {time.perf_counter() - start:.0f}s, " + ", ".join(f"{k} {v}" for k, v in stats.items()))


def acceptance_key(temperature: float, draft_temperature: float | None = None) -> str:
    """Sequoia's acceptance vectors: "0.0" / "0.6" at the main draft temperature, "0.0@dt0.3" for a swept one."""
    return str(temperature) + ("" if draft_temperature is None else f"@dt{draft_temperature:g}")


def score_prompts_t0(args, results, target, draft, items, methods, budgets, horizon, draft_params, acceptance, log,
                     draft_temperature: float | None = None, greedy_cache: dict | None = None):
    """Every method's runs on several prompts at once (benchmarks.tree_quality_batched): the same
    trees as `score_t0` builds one run at a time, their draft requests pooled into shared forwards.
    With `draft_temperature` (a sweep point): keys "t0dt<t>/...", only `budgets`, no large budget."""
    from benchmarks.tree_quality_batched import PromptToScore, SequencePool, score_t0_pooled

    greedy_cache = {} if greedy_cache is None else greedy_cache  # (set, prompt) -> greedy continuation
    prefix = "t0" if draft_temperature is None else f"t0dt{draft_temperature:g}"
    extra = {} if draft_temperature is None else {"draft_temperature": draft_temperature}
    todo = [(s, i, prompt) for s, i, prompt in items if any(not results.has(f"{prefix}/{s}/{i}/{m}") for m in methods)]
    if not todo:
        return
    t0 = time.perf_counter()
    for s, i, prompt in todo:
        if (s, i) not in greedy_cache:
            greedy_cache[(s, i)] = greedy_continuation(target, prompt, horizon)[0]
    greedies = [greedy_cache[(s, i)] for s, i, _ in todo]
    pool = SequencePool(draft, [prompt + greedy for (_, _, prompt), greedy in zip(todo, greedies)])
    names = ", ".join(f"{s} #{i}" for s, i, _ in todo)
    log(f"T=0 {names}: greedy continuations in {time.perf_counter() - t0:.0f}s")
    runs = {}
    for m in methods:
        large = [args.large_budget] if m in LARGE_BUDGET_METHODS and draft_temperature is None else []
        limits = list(CHAIN_LENGTHS) if m == "chain" else budgets + large
        runs[m] = (limits, builder_options(m, acceptance[acceptance_key(0.0, draft_temperature)], args.pooled_prefetch,
                                           pooled_speculation(args)))
    t1 = time.perf_counter()
    to_score = [PromptToScore(k, len(prompt), greedy, seed=i) for k, ((_, i, prompt), greedy) in enumerate(zip(todo, greedies))]
    scored = score_t0_pooled(pool, to_score, runs, NESTED, args.new_tokens, draft_params, accepted_greedy, log)
    for (s, i, _), per_method in zip(todo, scored):
        for m in methods:
            if results.has(f"{prefix}/{s}/{i}/{m}"):
                continue  # scored by an earlier run (the same trees: positions and coins are fixed)
            for limit, (tps, steps, calls) in per_method[m].items():
                b = f"chain{limit}" if m == "chain" else limit
                results.add({"key": f"{prefix}/{s}/{i}/{m}/{b}", "temperature": 0.0, "set": s, "prompt": i,
                             "method": m, "budget": b, "tokens_per_step": tps, "steps": steps, "draft_calls": calls,
                             **extra})
            results.add({"key": f"{prefix}/{s}/{i}/{m}", "marker": True})
            log(f"T=0 {s} #{i} {m}{'' if draft_temperature is None else f' (draft T={draft_temperature:g})'}: "
                + ", ".join(f"{b}:{v[0]:.2f}" for b, v in sorted(per_method[m].items())))
    if draft_temperature is None:  # the cost table is the main protocol's
        results.add({"key": f"timing/t0/{names}", "timing": True, "temperature": 0.0, "prompts": len(todo),
                     "seconds": time.perf_counter() - t0})
    log(f"T=0 {names}: {time.perf_counter() - t1:.0f}s, {pool.forwards} draft forwards ({pool.requests} requests, "
        f"{pool.rows} rows)")


def run_prompt_t06(args, results, target, draft, s, i, prompt, methods, t06_budgets, acceptance, log):
    """One `generate` call per run, one at a time: the time outside model forwards per round (the
    pooled runs share forwards, so they cannot time them per run). Not the large budget: a 256-node
    tree one run at a time costs ~10 minutes here; the pooled runs cover it."""
    for m, b in t06_runs(methods, t06_budgets):
        key = f"t06/{s}/{i}/{m}/{b}"
        if results.has(key):
            continue
        opts = builder_options(m, acceptance["0.6"], args.prefetch) if m != "autoregressive" else None
        budget = int(b[5:]) if m == "chain" else b
        r = generate(target, draft, prompt, max_new_tokens=args.t06_new_tokens, method=m, budget=budget,
                     temperature=0.6, draft_temperature=args.draft_temperature, seed=1000 + i,
                     eos_token_id=[], builder_options=opts)
        rounds = r.rounds
        outside = [(x.build_s + (x.verify_s - x.target_forward_s) + x.commit_s)
                   / max(1e-9, x.draft_s + x.build_s + x.verify_s + x.commit_s) for x in rounds]
        tps = sum(a + 1 for a in r.accepted_per_step) / r.steps
        results.add({"key": key, "temperature": 0.6, "set": s, "prompt": i, "method": m, "budget": b,
                     "tokens_per_step": tps, "steps": r.steps, "total_s": r.total_s,
                     "draft_s": r.draft_s, "verify_s": r.verify_s, "bookkeeping_s": r.bookkeeping_s,
                     "outside_share_median": sorted(outside)[len(outside) // 2] if outside else 0.0,
                     "tree_sizes_mean": sum(x.tree_size for x in rounds) / max(1, len(rounds))})
        log(f"T=0.6 {s} #{i} {m} B={b}: {tps:.2f} tokens/step, {r.total_s:.0f}s")
