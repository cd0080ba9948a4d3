"""Monte-Carlo losslessness through the production path: `dyspec.generate` at temperature > 0.

For each speculative method, N independent runs (seed = 0..N-1) of `generate(max_new_tokens=2)` on
a tiny random Llama (vocab 5, so the first two tokens fall into 25 cells) with a deliberately poor
correlated draft (both acceptances and rejections are frequent; asserted). The joint distribution
of the two tokens is compared with the EXACT target distribution
    P(t1, t2) = p(t1 | prompt) * p(t2 | prompt, t1),
each factor computed by `dyspec.warp.target_probs` from a plain forward of the target, with the
same temperature / top_k / top_p. Pearson chi-square with cells of expected count < 5 pooled;
cells of exact probability 0 (outside top_k / top_p) must stay empty.

Sample size and power: N = 2000 runs per case (about 4-9 ms each on one core). The statistic
under a deviation of total variation TV is non-central chi-square with non-centrality
>= 4 * N * TV^2 (chi-square divergence >= 4 TV^2), so at alpha = 1e-6 per case a deviation of
TV >= 0.11 (visible after pooling) is detected with power >= 0.99 for up to 24 degrees of freedom
(needed non-centrality 91.3, we have 96.8; `_power` recomputes it for the pooled df of every
case and asserts it). Seven cases at alpha 1e-6 give a family-wise false-failure rate below
1e-5, and the seeds are fixed, so the verdict is reproducible. This is a check of the real code
path (dtype, cache rollback, RNG streams, sparse q); small biases (TV ~0.01) are the job of the
exact-enumeration tests (tests/test_exact_lossless.py).

Negative controls at the same N prove the check has teeth: plain target sampling at a wrong
temperature, and a planted verifier bug (the final draw from p instead of the residual), must both
fail with p < 1e-6.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2, ncx2

from dyspec import METHODS, generate
from dyspec.verify import StochasticVerifier
from dyspec.warp import SamplingParams, target_probs
from tests.tiny_models import correlated_draft, sequential_logits, tiny_llama

V = 5
PROMPT = [1, 4, 2]
N = 2000
ALPHA = 1e-6
TV_DETECT = 0.11
BUDGET = 3


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(seed=11, vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        init_std=0.3)
    draft = correlated_draft(target, noise=0.5, seed=12)
    return target, draft


def exact_joint(target, params: SamplingParams) -> torch.Tensor:
    """float64 [V, V]: exact P(t1, t2) of plain target sampling under `params`."""
    p1 = target_probs(sequential_logits(target, PROMPT)[-1], params)
    joint = torch.zeros(V, V, dtype=torch.float64)
    for t1 in range(V):
        if p1[t1] > 0:
            joint[t1] = p1[t1] * target_probs(sequential_logits(target, PROMPT + [t1])[-1], params)
    return joint


def pooled_buckets(probs: torch.Tensor, n: int) -> list[list[int]]:
    """Flat cell indices grouped so that every group's expected count is >= 5: cells of expected
    count < 5 are pooled into one bucket, merged with the next-smallest cells while still < 5.
    Cells of probability 0 are left out (they must stay empty)."""
    exp = probs.flatten() * n
    cells = sorted((i for i in range(exp.numel()) if exp[i] > 0), key=lambda i: float(exp[i]))
    small = [i for i in cells if exp[i] < 5]
    rest = [i for i in cells if exp[i] >= 5]
    if not small:
        return [[i] for i in rest]
    while float(exp[small].sum()) < 5 and rest:
        small.append(rest.pop(0))
    return [small, *[[i] for i in rest]]


def pooled_chisquare(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """(p-value, degrees of freedom) of Pearson's chi-square over `pooled_buckets`."""
    obs, exp = counts.flatten().double(), probs.flatten() * n
    assert float(obs[exp == 0].sum()) == 0, "a sample landed on a cell of target probability 0"
    buckets = pooled_buckets(probs, n)
    stat = sum((float(obs[b].sum()) - float(exp[b].sum())) ** 2 / float(exp[b].sum()) for b in buckets)
    df = len(buckets) - 1
    return float(chi2.sf(stat, df)), df


def noncentrality(alt: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """Non-centrality of the pooled statistic when samples come from `alt` instead of `probs`."""
    a, p = alt.flatten(), probs.flatten()
    return n * sum(float(a[b].sum() - p[b].sum()) ** 2 / float(p[b].sum()) for b in pooled_buckets(probs, n))


def _power(df: int, n: int = N, tv: float = TV_DETECT) -> float:
    """Power of the chi-square test at ALPHA against the weakest deviation of total variation tv."""
    return float(ncx2.sf(chi2.isf(ALPHA, df), df, 4 * n * tv * tv))


def sample_joint(target, draft, method: str, n: int = N, budget: int = BUDGET, **kwargs) -> tuple[torch.Tensor, int, int]:
    """Counts [V, V] of the first two tokens over n seeded runs, and how many rounds accepted at
    least one drafted token / rejected a drafted token."""
    counts = torch.zeros(V, V, dtype=torch.long)
    accepted = rejected = 0
    for seed in range(n):
        result = generate(target, draft, PROMPT, max_new_tokens=2, method=method, budget=budget, seed=seed, **kwargs)
        assert len(result.tokens) == 2
        counts[result.tokens[0], result.tokens[1]] += 1
        accepted += sum(s.accepted > 0 for s in result.rounds)
        rejected += sum(s.accepted < s.tree_depth for s in result.rounds)
    return counts, accepted, rejected


def tv_bound(cells: int, n: int = N, alpha: float = ALPHA) -> float:
    """Bretagnolle-Huber-Carol: P(TV(empirical, true) > t) <= alpha for this t."""
    return math.sqrt((cells * math.log(2) + math.log(1 / alpha)) / (2 * n))


# One case per method; together they cover matching and mismatched draft temperatures, target
# top_k and top_p, and draft top_k / top_p truncation (sparse q on the wire).
CASES = [
    ("dyspec", dict(temperature=1.0, draft_temperature=0.6, top_p=0.95, draft_top_k=3)),
    # a confident, often wrong draft in wider trees: second and third siblings are verified often,
    # which is where a stale q (not renormalised after a rejected sibling) biases the output
    ("dyspec", dict(temperature=1.0, draft_temperature=0.3, budget=6)),
    ("dyspec-layer", dict(temperature=0.8, draft_temperature=0.8)),
    ("best-first", dict(temperature=1.0, draft_temperature=1.0, top_p=0.9)),
    ("sequoia", dict(temperature=1.2, draft_temperature=0.9, draft_top_k=4)),
    ("specinfer", dict(temperature=0.7, draft_temperature=1.3, top_k=4)),
    ("chain", dict(temperature=1.0, draft_temperature=0.8, draft_top_p=0.8)),
]


def test_cases_cover_every_speculative_method():
    assert {m for m, _ in CASES} == set(METHODS) - {"autoregressive"}
    assert any(k.get("draft_top_k") and k.get("top_p", 1.0) < 1 for _, k in CASES)
    assert any(k["draft_temperature"] != k["temperature"] and not k.get("draft_top_k") for _, k in CASES)
    assert any(k["draft_temperature"] == k["temperature"] for _, k in CASES)


@pytest.mark.parametrize("method,kwargs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_first_two_tokens_match_target_distribution(models, method, kwargs):
    target, draft = models
    sampling = SamplingParams(kwargs["temperature"], kwargs.get("top_k", 0), kwargs.get("top_p", 1.0))
    probs = exact_joint(target, sampling)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    counts, accepted, rejected = sample_joint(target, draft, method, **kwargs)
    # the verifier's accept and reject branches both ran often enough to matter
    assert accepted > N // 10 and rejected > N // 10, (accepted, rejected)
    p_value, df = pooled_chisquare(counts, probs, N)
    assert _power(df) >= 0.99, df
    tv = 0.5 * float((counts.double() / N - probs).abs().sum())
    assert p_value >= ALPHA, (p_value, tv, counts.tolist())
    assert tv <= tv_bound(V * V), tv


def test_negative_control_wrong_temperature(models):
    """Plain target sampling (the production path, `autoregressive`) at T=1.3 scored against the
    exact T=1.0 distribution must fail. The non-centrality of this bias at N is recomputed here, so
    an edit that removes the control's power fails loudly instead of passing vacuously."""
    target, draft = models
    probs = exact_joint(target, SamplingParams(1.0))
    wrong = exact_joint(target, SamplingParams(1.3))
    assert float(wrong[probs == 0].sum()) == 0
    nc = noncentrality(wrong, probs, N)
    counts, _, _ = sample_joint(target, draft, "autoregressive", temperature=1.3)
    p_value, df = pooled_chisquare(counts, probs, N)
    assert float(ncx2.sf(chi2.isf(ALPHA, df), df, nc)) > 0.999, nc
    assert p_value < ALPHA, p_value
    # and the same samples pass against the distribution they do come from
    assert pooled_chisquare(counts, wrong, N)[0] >= ALPHA


def test_negative_control_planted_verifier_bug(models, monkeypatch):
    """Planted bug through the real `generate`: after every sibling is rejected, draw the next token
    from p instead of the residual. Same N, same check: it must fail."""
    target, draft = models
    monkeypatch.setattr(StochasticVerifier, "final_distribution", staticmethod(lambda r, p: p))
    probs = exact_joint(target, SamplingParams(1.0))
    counts, _, rejected = sample_joint(target, draft, "dyspec", temperature=1.0, draft_temperature=1.0)
    assert rejected > N // 10
    p_value, _ = pooled_chisquare(counts, probs, N)
    assert p_value < ALPHA, p_value


def test_pooled_chisquare_helper():
    """The helper itself: exact expected counts give p ~ 1; a shifted cell gives p ~ 0; pooling
    keeps every bucket >= 5; a count on an impossible cell is an error."""
    probs = torch.tensor([[0.5, 0.3], [0.198, 0.002]], dtype=torch.float64)
    n = 1000
    assert pooled_buckets(probs, n) == [[3, 2], [1], [0]]  # 2 expected is pooled with 198
    p_value, df = pooled_chisquare((probs * n).round(), probs, n)
    assert p_value > 0.99 and df == 2
    assert noncentrality(probs, probs, n) == 0
    assert pooled_chisquare(torch.tensor([[600.0, 200.0], [198.0, 2.0]]), probs, n)[0] < 1e-9
    with pytest.raises(AssertionError):
        pooled_chisquare(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 0.5], [0.0, 0.0]]), 2)
