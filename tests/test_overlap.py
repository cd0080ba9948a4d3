"""Overlapped rounds (dyspec.overlap): exact losslessness of the pipelined loop itself, the draft
cache after a wrong guess, and seeded tokens independent of overlap.

The exact test enumerates every random decision of whole runs of `OverlappedRounds` (drafting,
guessing, pre-drafting, verification, rebuilding) on table models, with the verdict arriving at
scripted points: before the draft looks (no pre-draft), after the first pre-draft forward, or only
once the pre-draft is built. Draft and verification decisions share one enumerator, so the
weights are exact; every run must leave the draft holding exactly the target's tokens.

Why the cache checks are separate: verification is lossless for any tree whose children carry the
q they were drawn from, whatever context the draft conditioned on, so a draft cache left wrong by
a bad restore would not move the output distribution (only acceptance). It is checked directly:
after a wrong guess the restored HF draft session must give the logits of a fresh one.
"""
from __future__ import annotations

import pytest
import torch

from dyspec import generate
from dyspec.builders import make_builder
from dyspec.decoding import LocalVerifier
from dyspec.hf_runner import HFDraftSession
from dyspec.overlap import OverlappedRounds, guess_verdict, likeliest_path
from dyspec.tree import ROOT
from dyspec.verify import Verdict
from dyspec.warp import SamplingParams
from tests.exact import TableLM, enumerate_runs, target_rows, target_sequence_distribution, total_variation
from tests.tiny_models import correlated_draft, tiny_llama

EXACT = 1e-9
METHODS = ["dyspec", "dyspec-layer", "best-first", "sequoia", "specinfer", "chain"]
NEVER = 10**9


class TableDraftSession:
    """A CheckpointingDraft over a TableLM: the committed tokens are its whole state."""

    def __init__(self, lm: TableLM, prompt: list[int]):
        self.lm, self.tokens = lm, list(prompt)

    def logits(self, tree, nodes):
        return torch.stack([self.lm.logits(self.tokens + (tree.path_tokens(n) if n != ROOT else [])) for n in nodes])

    def commit(self, tree, verdict):
        self.tokens += verdict.tokens

    def checkpoint(self):
        return len(self.tokens)

    def restore(self, mark):
        del self.tokens[mark:]


class TableTargetSession:
    def __init__(self, lm: TableLM, prompt: list[int]):
        self.lm, self.tokens = lm, list(prompt)

    def forward_tree(self, tree):
        return target_rows(self.lm, self.tokens, tree)

    def commit(self, tree, verdict):
        self.tokens += verdict.tokens


class ScriptedPending:
    """Arrives after `polls` calls of done(); verifies lazily, so decisions stay in one order."""

    arrived_s = None

    def __init__(self, verify, polls: int):
        self.verify, self.polls, self._verdict = verify, polls, None

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def result(self) -> Verdict:
        if self._verdict is None:
            self._verdict = self.verify()
        return self._verdict


class ScriptedVerifier:
    last_forward_s = 0.0

    def __init__(self, local: LocalVerifier, polls: int):
        self.local, self.polls = local, polls

    def submit(self, tree):
        return ScriptedPending(lambda: self.local.verify(tree), self.polls)


def run_overlapped(coins, builder, draft_lm, target_lm, prompt, budget, sampling, length, polls, seen):
    draft = TableDraftSession(draft_lm, prompt)
    target = TableTargetSession(target_lm, prompt)
    runner = OverlappedRounds(draft, ScriptedVerifier(LocalVerifier(target, sampling, coins), polls),
                              builder.fresh(), lambda k: coins)
    out: list[int] = []
    while len(out) < length:
        result = runner.next_round(lambda: budget, lambda committed: budget)
        assert draft.tokens == target.tokens, "the draft must hold exactly the committed tokens"
        seen.add((result.overlap.predrafted, result.overlap.kept))
        out += result.verdict.tokens
    return tuple(out[:length])


def overlapped_distribution(builder, draft_lm, target_lm, prompt, budget, sampling, length, polls):
    dist: dict = {}
    seen: set = set()
    for p, toks in enumerate_runs(lambda coins: run_overlapped(coins, builder, draft_lm, target_lm, prompt, budget,
                                                               sampling, length, polls, seen)):
        dist[toks] = dist.get(toks, 0.0) + p
    return dist, seen


# polls: 0 = the verdict is there before the draft looks (no pre-draft); 1 = it arrives after the
# first pre-draft forward (a right guess is confirmed mid-build, a wrong one abandons it); NEVER =
# only once the pre-draft is complete. A complete pre-draft multiplies the decisions to enumerate
# (an abandoned one still made them), so that schedule runs with one-node trees over two tokens
# (best-first, whose drafts are deterministic, with the full size).
PAIRS = [(TableLM(3, 2, seed=3), TableLM(3, 1, seed=4)), (TableLM(3, 1, seed=4),) * 2]
SCHEDULES = {"early": (1, 1, 3), "late": (NEVER, 1, 2)}  # polls, budget, tokens


@pytest.mark.parametrize("schedule", ["none", "early", "late"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_overlapped_rounds_are_exactly_lossless(method, temperature, schedule):
    """A trigram target with a bigram draft, and a draft equal to the (bigram) target, whose
    guesses are often right: together they exercise kept and abandoned pre-drafts."""
    polls, budget, length = (0, 2, 3) if schedule == "none" else SCHEDULES[schedule]
    if method == "best-first":
        budget, length = 2, 4  # a round emits up to 3 tokens: the 4th needs a second round
    builder = make_builder(method, draft_params=SamplingParams(0.8))
    sampling = SamplingParams(temperature)
    seen_all: set = set()
    for target, draft in PAIRS:
        got, seen = overlapped_distribution(builder, draft, target, [0, 1], budget, sampling, length, polls)
        assert total_variation(got, target_sequence_distribution(target, [0, 1], sampling, length)) < EXACT
        seen_all |= seen
    if schedule == "none":
        assert not any(predrafted for predrafted, _ in seen_all)
    else:
        assert (True, False) in seen_all, seen_all  # an abandoned pre-draft, rebuilt
        if method == "best-first":  # deterministic drafts: the equal pair's guesses come true
            assert (True, True) in seen_all, seen_all  # and a kept one


def test_likeliest_path_follows_the_highest_value_child():
    from dyspec.tree import TokenTree

    tree = TokenTree()
    a = tree.add(ROOT, 5, 0.3)
    b = tree.add(ROOT, 6, 0.6)
    tree.add(b, 7, 0.2)
    d = tree.add(b, 8, 0.4)
    tree.add(a, 9, 0.29)  # deeper below a, but a is the less likely child
    assert likeliest_path(tree) == [b, d] and likeliest_path(TokenTree()) == []


def test_a_wrong_guess_restores_the_hf_draft_cache_exactly():
    """Guess, commit the guess, pre-draft below it, restore, commit the true verdict: the next
    forward gives the logits of a session that only ever saw the true tokens."""
    model = tiny_llama(seed=5, vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    prompt = [1, 7, 3, 9]
    builder = make_builder("dyspec", draft_params=SamplingParams(0.9))
    from dyspec.coins import TorchCoins

    session = HFDraftSession(model, prompt)
    tree = builder.build(session, 6, TorchCoins(1))
    path = likeliest_path(tree)
    guess = guess_verdict(session, tree, path)
    mark = session.checkpoint()
    session.commit(tree, guess)
    builder.fresh().build(session, 5, TorchCoins(2))  # pre-draft rows below the guess
    session.restore(mark)
    true = Verdict(path[:1], (guess.next_token + 1) % 32, [tree.tokens[path[0]], (guess.next_token + 1) % 32])
    session.commit(tree, true)
    probe = builder.fresh().build(HFDraftSession(model, prompt + true.tokens), 4, TorchCoins(3))
    fresh = HFDraftSession(model, prompt + true.tokens)
    nodes = [ROOT, *range(len(probe))]
    assert torch.allclose(session.logits(probe, nodes), fresh.logits(probe, nodes), atol=1e-5)
    assert session.tokens == fresh.tokens


@pytest.mark.parametrize("method", ["dyspec", "chain", "best-first"])
def test_seeded_tokens_do_not_depend_on_overlap(method):
    """Per-round draft coins: a pre-drafted tree and a rebuilt one use the same uniforms, so the
    tokens of a seeded request are the same with and without overlap (fp32 tiny models)."""
    target = tiny_llama(seed=11, vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    draft = correlated_draft(target, noise=0.3, seed=12)
    prompt = [3, 1, 4, 1, 5]
    for seed in range(4):
        kw = dict(max_new_tokens=24, method=method, budget=6, temperature=0.9, seed=seed)
        with torch.no_grad():
            serial = generate(target, draft, prompt, overlap=False, **kw)
            overlapped = generate(target, draft, prompt, overlap=True, **kw)
        assert overlapped.tokens == serial.tokens, seed
        assert all(not o.predrafted for o in serial.overlap)
