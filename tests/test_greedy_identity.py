"""Greedy identity: at temperature 0, `dyspec.generate` emits exactly the target's greedy tokens.

The oracle is `greedy_reference`: full-sequence forwards of the target alone, argmax per step (no
cache, no masks, no dyspec code). Tiny random models (fp32) with a correlated draft, so rounds see
both acceptances and rejections (asserted, per method and budget). Stopping is checked too: EOS
(the output ends right after the first EOS) and max_new_tokens (exact length).

The SmolLM2-135M test runs the same check on a real pretrained model (drafts: a noisy copy of the
target, and its own first 10 of 30 decoder layers).
"""
from __future__ import annotations

import random

import pytest

from dyspec import METHODS, generate
from tests.tiny_models import correlated_draft, greedy_reference, tiny_llama, tiny_qwen2, truncated_copy

VOCAB = 64
BUDGETS = (1, 3, 8, 24)
NEW_TOKENS = 20
DRAFT_TEMPERATURES = (0.0, 0.6, 1.0)  # greedy draft, the default, and a hot draft


def _pair(seed: int):
    maker = tiny_llama if seed % 2 == 0 else tiny_qwen2
    target = maker(seed=seed, vocab_size=VOCAB, hidden_size=32, num_layers=2)
    return target, correlated_draft(target, noise=0.05, seed=seed + 1000)


@pytest.fixture(scope="module")
def cases():
    """(target, draft, prompt, reference continuation) for 2 model seeds x 3 prompts."""
    out = []
    for model_seed in (0, 1):
        target, draft = _pair(model_seed)
        rng = random.Random(model_seed)
        for prompt_len in (1, 4, 13):
            prompt = [rng.randrange(VOCAB) for _ in range(prompt_len)]
            out.append((target, draft, prompt, greedy_reference(target, prompt, NEW_TOKENS)))
    return out


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_target_greedy(cases, method, budget):
    accepted_steps = rejected_steps = 0
    for i, (target, draft, prompt, ref) in enumerate(cases):
        draft_t = DRAFT_TEMPERATURES[i % len(DRAFT_TEMPERATURES)]
        result = generate(target, draft, prompt, max_new_tokens=NEW_TOKENS, method=method, budget=budget,
                          temperature=0.0, draft_temperature=draft_t, seed=i)
        assert result.tokens == ref, f"case {i} (prompt {prompt}, draft T {draft_t})"
        assert result.finish_reason == "length"
        assert result.steps == len(result.accepted_per_step) == len(result.rounds)
        assert result.accepted_per_step == [s.accepted for s in result.rounds]
        # each step yields its accepted tokens plus one; the last step may be cut by max_new_tokens
        assert sum(a + 1 for a in result.accepted_per_step[:-1]) < NEW_TOKENS
        assert sum(a + 1 for a in result.accepted_per_step) >= NEW_TOKENS
        for stats in result.rounds:
            assert stats.tree_size <= (budget if method != "autoregressive" else 0)
            assert stats.accepted <= stats.tree_depth
        accepted_steps += sum(s.accepted > 0 for s in result.rounds)
        rejected_steps += sum(s.accepted < s.tree_depth for s in result.rounds)
    if method == "autoregressive":
        assert accepted_steps == 0
    else:
        # both verifier outcomes were exercised, so identity is not vacuous: some step accepted a
        # drafted token, some step rejected one (the walk stopped above the tree's deepest level)
        assert accepted_steps > 0 and rejected_steps > 0, (accepted_steps, rejected_steps)


@pytest.mark.parametrize("method", METHODS)
def test_eos_stops_right_after_first_eos(cases, method):
    for i, (target, draft, prompt, ref) in enumerate(cases[:3]):
        # an EOS id that first occurs mid-continuation, so tokens after it would otherwise follow
        pos = next(j for j in range(3, len(ref)) if ref[j] not in ref[:j])
        eos = ref[pos]
        for eos_arg in (eos, [VOCAB - 1 if eos != VOCAB - 1 else 0, eos]):
            result = generate(target, draft, prompt, max_new_tokens=NEW_TOKENS, method=method, budget=8,
                              seed=i, eos_token_id=eos_arg)
            stops = eos_arg if isinstance(eos_arg, list) else [eos_arg]
            cut = next(j for j, t in enumerate(ref) if t in stops)
            assert cut <= pos
            assert result.tokens == ref[:cut + 1], f"case {i}, eos {eos_arg}"
            assert result.finish_reason == "eos"


def test_eos_from_generation_config(cases):
    target, draft, prompt, ref = cases[0]
    pos = next(j for j in range(2, len(ref)) if ref[j] not in ref[:j])
    target.generation_config.eos_token_id = ref[pos]
    try:
        result = generate(target, draft, prompt, max_new_tokens=NEW_TOKENS, method="dyspec", budget=8)
    finally:
        target.generation_config.eos_token_id = None
    assert result.tokens == ref[:pos + 1] and result.finish_reason == "eos"


@pytest.mark.parametrize("method", METHODS)
def test_max_new_tokens_is_exact(cases, method):
    target, draft, prompt, ref = cases[1]
    for n in (0, 1, 2, 5, 13):
        result = generate(target, draft, prompt, max_new_tokens=n, method=method, budget=24, seed=n)
        assert result.tokens == ref[:n], n
        assert len(result.tokens) == n
        assert result.finish_reason == "length"


def test_context_limit_truncates_trees_and_stays_greedy():
    """Near max_position_embeddings the trees shrink; output stays a prefix of target greedy."""
    target = tiny_llama(seed=4, vocab_size=VOCAB, max_positions=24)
    draft = correlated_draft(target, noise=0.05, seed=5)
    prompt = list(range(3, 13))
    ref = greedy_reference(target, prompt, 30)
    for method in ("dyspec", "chain", "best-first"):
        result = generate(target, draft, prompt, max_new_tokens=30, method=method, budget=24)
        assert result.tokens == ref[:len(result.tokens)]
        assert len(prompt) + len(result.tokens) <= 24
        assert len(result.tokens) >= 24 - len(prompt) - 1


def test_invalid_arguments_are_rejected(cases):
    target, draft, prompt, _ = cases[0]
    with pytest.raises(ValueError):
        generate(target, draft, prompt, method="nope")
    with pytest.raises(ValueError):
        generate(target, draft, prompt, budget=0)
    with pytest.raises(ValueError):
        generate(target, draft, prompt, max_new_tokens=-1)
    other = tiny_llama(seed=9, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError):
        generate(target, other, prompt, method="dyspec")


# ----------------------------------------------------------------------------- real model


REAL_METHODS = ("dyspec", "dyspec-layer", "best-first", "chain", "sequoia", "specinfer")
REAL_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Then the fox",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)


def test_smollm2_real_model_greedy_identity():
    """SmolLM2-135M (30 layers, vocab 49152), budget 16, 2 prompts x 24 new tokens: every method is
    token-identical to target-only greedy decoding (plain transformers incremental decoding).

    Drafts: the target with 5% relative weight noise (accepts 0-16 tokens per step, so acceptances
    and rejections both happen), and, for one short run, the target's own first 10 of 30 decoder
    layers. That self-draft never agrees with the target's argmax on these prompts (measured: 0 of
    48 teacher-forced tokens), so it only exercises the all-rejected path, and 24 rounds of it per
    method would take minutes on 2 cores. Fetches and converts the model on first use (model_store);
    a cached reload takes about a second. About 70 s on an idle 2-core machine."""
    import model_store  # part of this repository; imported here so the tiny tests do not load it

    target, tokenizer = model_store.load_model("smollm2-135m", progress=lambda line: None)
    assert target.config.num_hidden_layers == 30
    eos = target.generation_config.eos_token_id  # stays active in generate(): the reference checks it
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    noisy = correlated_draft(target, noise=0.05, seed=0)
    accepted = rejected = 0
    refs = []
    for text in REAL_PROMPTS:
        prompt = tokenizer(text)["input_ids"]
        ref = greedy_reference(target, prompt, 24, use_cache=True)
        assert not eos & set(ref), "pick a prompt whose greedy continuation has no EOS"
        refs.append((prompt, ref))
        for method in REAL_METHODS:
            result = generate(target, noisy, prompt, max_new_tokens=24, method=method, budget=16)
            assert result.tokens == ref, (method, tokenizer.decode(result.tokens), tokenizer.decode(ref))
            accepted += sum(s.accepted > 0 for s in result.rounds)
            rejected += sum(s.accepted < s.tree_depth for s in result.rounds)
    assert accepted > 0 and rejected > 0, (accepted, rejected)

    shallow = truncated_copy(target, 10)
    assert len(shallow.model.layers) == 10 and shallow.config.num_hidden_layers == 10
    assert len(target.model.layers) == 30  # the copy left the target whole
    prompt, ref = refs[0]
    result = generate(target, shallow, prompt, max_new_tokens=6, method="dyspec", budget=16)
    assert result.tokens == ref[:6]


@pytest.mark.parametrize("budget", (3, 24))
def test_best_first_speculation_keeps_greedy_identity_and_the_rounds(cases, budget):
    """Best-first with candidates forwarded ahead (a scratch tree, renumbered into the draft
    session's slots): the same tokens and per-round accepted counts as without, at T=0 (the
    target's greedy output) and at T=1 (same seeded streams), with fewer draft forwards."""
    for i, (target, draft, prompt, ref) in enumerate(cases[:4]):
        for temperature in (0.0, 1.0):
            plain, ahead = (generate(target, draft, prompt, max_new_tokens=NEW_TOKENS, method="best-first",
                                     budget=budget, temperature=temperature, seed=i, builder_options=options)
                            for options in ({"speculate": 0}, {"speculate": 8}))
            if temperature == 0.0:
                assert ahead.tokens == ref, f"case {i}"
            assert (ahead.tokens, ahead.accepted_per_step) == (plain.tokens, plain.accepted_per_step), f"case {i}"
            if budget > 3:
                assert sum(r.draft_calls for r in ahead.rounds) < sum(r.draft_calls for r in plain.rounds)
