"""Tree builders: budgets, validity, draw order, node values, and each builder's own contract.

Builders run against fake draft oracles: `TableOracle` (next-token probabilities looked up by the
last token, for hand-computed cases) and `PathOracle` (pseudo-random logits that are a pure
function of the root->node path, i.e. a deterministic "draft model"). Coins are scripted where a
case is computed by hand. No transformers models here.
"""
from __future__ import annotations

import itertools
import math
import random
from functools import lru_cache

import pytest
import torch

from dyspec.builders import BUILDERS, make_builder, sequoia_shape
from dyspec.builders.best_first import BestFirstBuilder
from dyspec.builders.chain import ChainBuilder
from dyspec.builders.dyspec_heap import DySpecBuilder
from dyspec.builders.dyspec_layer import DySpecLayerBuilder
from dyspec.builders.sequoia import DEFAULT_ACCEPTANCE, SequoiaBuilder
from dyspec.builders.specinfer import SpecInferBuilder
from dyspec.coins import TorchCoins
from dyspec.tree import ROOT, Draw, TokenTree, validate_tree
from dyspec.warp import SamplingParams, draft_distribution

T1 = SamplingParams(temperature=1.0)


# ----------------------------------------------------------------------------- fakes


class TableOracle:
    """Draft next-token probabilities keyed by the path's last token (None at the root)."""

    def __init__(self, table: dict, vocab_size: int):
        self.vocab_size = vocab_size
        self.rows = {}
        for key, probs in table.items():
            dense = torch.zeros(vocab_size, dtype=torch.float64)
            for tok, p in probs.items():
                dense[tok] = p
            self.rows[key] = torch.log(dense).float()  # -inf where the draft has no mass
        self.calls: list[list[int]] = []

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        self.calls.append(list(nodes))
        return torch.stack([self.rows[None if n == ROOT else tree.tokens[n]] for n in nodes])


class PathOracle:
    """Pseudo-random logits that depend only on the root->node path (a deterministic draft model)."""

    def __init__(self, vocab_size: int, seed: int = 0, scale: float = 2.0):
        self.vocab_size, self.seed, self.scale = vocab_size, seed, scale
        self.calls: list[list[int]] = []

    def row(self, path: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((self.seed, path)) & 0x7FFFFFFF)
        return (torch.randn(self.vocab_size, generator=gen) * self.scale).float()

    def logits(self, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        self.calls.append(list(nodes))
        for n in nodes:
            assert n == ROOT or 0 <= n < len(tree), n
        return torch.stack([self.row(() if n == ROOT else tuple(tree.path_tokens(n))) for n in nodes])


class ScriptedCoins:
    """`sample` returns the scripted indices in order and records the weights it was given."""

    def __init__(self, script):
        self.script = list(script)
        self.seen: list[torch.Tensor] = []

    def sample(self, weights: torch.Tensor) -> int:
        assert weights.dtype == torch.float64
        idx = self.script.pop(0)
        assert float(weights[idx]) > 0, (weights, idx)
        self.seen.append(weights.clone())
        return idx

    def accept(self, prob: float) -> bool:
        raise AssertionError("builders never make accept decisions")


class RuleCoins:
    """`sample` picks by a fixed rule: the first or the last index with positive weight."""

    def __init__(self, last: bool):
        self.last = last
        self.seen: list[torch.Tensor] = []

    def sample(self, weights: torch.Tensor) -> int:
        self.seen.append(weights.clone())
        nz = torch.nonzero(weights > 0).flatten()
        return int(nz[-1] if self.last else nz[0])

    def accept(self, prob: float) -> bool:
        raise AssertionError("builders never make accept decisions")


def path_prob(oracle: PathOracle, tree: TokenTree, node: int, params: SamplingParams) -> float:
    """Draft probability of the path to `node`, computed from the oracle, not from the tree's q."""
    toks = tree.path_tokens(node)
    prob = 1.0
    for depth, tok in enumerate(toks):
        dist = draft_distribution(oracle.row(tuple(toks[:depth])), params)
        w = dict(zip(dist.ids.tolist(), dist.weights64().tolist()))
        prob *= w[tok]
    return prob


def make(name: str, params: SamplingParams = T1, **options):
    return make_builder(name, draft_params=params, **options)


def same_tree(a: TokenTree, b: TokenTree) -> bool:
    return (a.tokens == b.tokens and a.parents == b.parents and a.values == b.values and a.draw == b.draw
            and a.q.keys() == b.q.keys()
            and all(torch.equal(a.q[k].ids, b.q[k].ids) and torch.equal(a.q[k].probs, b.q[k].probs) for k in a.q))


# ----------------------------------------------------------------------------- all builders


ALL = sorted(BUILDERS)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [1, 2, 5, 16, 40])
def test_budget_validity_values_and_q(name, budget):
    """Full-support draft (V=12): every builder fills the budget exactly, the tree validates, each
    node's value is its draft path probability, and every q is exactly the draft distribution."""
    vocab = 12
    for seed in range(3):
        oracle = PathOracle(vocab, seed=seed)
        builder = make(name, SamplingParams(temperature=0.8))
        tree = builder.build(oracle, budget, TorchCoins(seed))
        assert len(tree) == budget
        assert tree.draw is builder.draw
        validate_tree(tree, vocab, budget)
        params = builder.draft_params
        for node in range(len(tree)):
            assert tree.depths[node] == len(tree.path_tokens(node))
            assert tree.values[node] == pytest.approx(path_prob(oracle, tree, node, params), rel=1e-9, abs=1e-15)
        if builder.draw is Draw.DETERMINISTIC:
            assert tree.q == {}
        else:
            expanded = {ROOT, *tree.parents}
            assert set(tree.q) == expanded  # q for exactly the nodes that got children
            for node, dist in tree.q.items():
                path = () if node == ROOT else tuple(tree.path_tokens(node))
                want = draft_distribution(oracle.row(path), params)
                assert torch.equal(dist.ids, want.ids) and torch.equal(dist.probs, want.probs)


@pytest.mark.parametrize("name", ALL)
def test_budget_with_truncated_draft_support(name):
    """draft top_k=2: never more than `budget` nodes; the tree is still valid; builders whose shape
    is not fixed in advance still fill the budget (a node can always get a child)."""
    vocab, budget = 10, 12
    params = SamplingParams(temperature=1.0, top_k=2)
    builder = make(name, params)
    tree = builder.build(PathOracle(vocab, seed=4), budget, TorchCoins(4))
    validate_tree(tree, vocab, budget)
    assert len(tree) <= budget
    if name != "sequoia":  # sequoia's static shape wants more than 2 children at the root
        assert len(tree) == budget
    for node in [ROOT, *range(len(tree))]:
        kids = tree.children_of(node)
        if name != "specinfer":
            assert len(kids) <= 2
        if node in tree.q:
            assert tree.q[node].ids.numel() <= 2


@pytest.mark.parametrize("name", ALL)
def test_children_in_draw_order(name):
    """Coins that always pick the LEAST likely remaining token: siblings must be stored in the order
    they were drawn (ascending draft probability), not re-sorted (the verifier depends on it)."""
    vocab, budget = 6, 14
    oracle = PathOracle(vocab, seed=7)
    builder = make(name)
    coins = RuleCoins(last=True)
    tree = builder.build(oracle, budget, coins)
    validate_tree(tree, vocab, budget)
    multi = 0
    for node in [ROOT, *range(len(tree))]:
        kids = [tree.tokens[c] for c in tree.children_of(node)]
        if not kids:
            continue
        multi += len(kids) > 1
        path = () if node == ROOT else tuple(tree.path_tokens(node))
        ranked = draft_distribution(oracle.row(path), builder.draft_params).ids.tolist()  # by decreasing prob
        if builder.draw is Draw.WITHOUT_REPLACEMENT:
            assert kids == ranked[::-1][:len(kids)]
        elif builder.draw is Draw.WITH_REPLACEMENT:
            assert kids == [ranked[-1]] * len(kids)  # i.i.d. draws from the unchanged q
        else:  # deterministic best-first: chosen best first, coins never used
            assert kids == ranked[:len(kids)]
    if builder.draw is Draw.DETERMINISTIC:
        assert coins.seen == []
    if name != "chain":
        assert multi > 0  # the check above saw sibling lists


@pytest.mark.parametrize("name", ALL)
def test_fresh_and_reproducible(name):
    oracle = PathOracle(9, seed=2)
    builder = make(name)
    a = builder.fresh().build(oracle, 10, TorchCoins(3))
    b = builder.fresh().build(oracle, 10, TorchCoins(3))
    assert same_tree(a, b)
    assert type(builder.fresh()) is type(builder) and builder.fresh().draft_params == builder.draft_params


def test_make_builder_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        make_builder("beam")


# ----------------------------------------------------------------------------- dyspec (Algorithm 1)

# vocab 4; token 3 never has draft mass
TABLE = {
    None: {0: 0.6, 1: 0.3, 2: 0.1},
    0: {2: 0.7, 0: 0.2, 1: 0.1},
    1: {1: 0.8, 0: 0.2},
    2: {0: 1.0},
}


@pytest.mark.parametrize("prefetch", [1, 8])
def test_dyspec_hand_computed(prefetch):
    """Budget 7 with scripted draws, traced by hand (v = slot value, R = residual at the slot):

    pop (1.00, root)  R=[.6 .3 .1] draw idx0 tok0 -> n0 = .6;    slots (.6, n0), (.4, root)
    pop (0.60, n0)    R=[.7 .2 .1] draw idx1 tok0 -> n1 = .12;   slots (.12, n1), (.6*.8=.48, n0)
    pop (0.48, n0)    R=[.875 0 .125] draw idx0 tok2 -> n2 = .42; slots (.42, n2), (.48*.125=.06, n0)
    pop (0.42, n2)    R=[1]          draw idx0 tok0 -> n3 = .42; residual empty: no sibling slot
    pop (0.42, n3)    R=[.7 .2 .1] draw idx2 tok1 -> n4 = .042;  slots (.042, n4), (.42*.9=.378, n3)
    pop (0.40, root)  R=[0 .75 .25] draw idx1 tok1 -> n5 = .3;   slots (.3, n5), (.4*.25=.1, root)
    pop (0.378, n3)   R=[.7/.9 .2/.9 0] draw idx0 tok2 -> n6 = .294
    """
    oracle = TableOracle(TABLE, vocab_size=4)
    coins = ScriptedCoins([0, 1, 0, 0, 2, 1, 0])
    tree = DySpecBuilder(T1, prefetch=prefetch).build(oracle, 7, coins)
    assert coins.script == []
    assert tree.tokens == [0, 0, 2, 0, 1, 1, 2]
    assert tree.parents == [ROOT, 0, 0, 2, 3, ROOT, 3]
    assert tree.values == pytest.approx([0.6, 0.12, 0.42, 0.42, 0.042, 0.3, 0.294], rel=1e-6)
    assert tree.children_of(ROOT) == [0, 5] and tree.children_of(3) == [4, 6]  # draw order
    want_weights = [[.6, .3, .1], [.7, .2, .1], [.875, 0, .125], [1.0], [.7, .2, .1], [0, .75, .25],
                    [.7 / .9, .2 / .9, 0]]
    assert len(coins.seen) == len(want_weights)
    for got, want in zip(coins.seen, want_weights):
        assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert set(tree.q) == {ROOT, 0, 2, 3}
    validate_tree(tree, 4, 7)
    if prefetch == 1:  # the paper's one draft forward per newly expanded node
        assert oracle.calls == [[ROOT], [0], [2], [3]]
    else:  # n1 (the best other unevaluated slot) rides along with n2
        assert oracle.calls == [[ROOT], [0], [2, 1], [3]]


def test_dyspec_budget_prefix_and_exhausted_support():
    """Budget 5 with the same draws is the first 5 nodes of the budget-7 tree; a one-token support
    (top_k=1) makes a chain and never pushes an empty sibling slot."""
    tree = DySpecBuilder(T1, prefetch=1).build(TableOracle(TABLE, 4), 5, ScriptedCoins([0, 1, 0, 0, 2]))
    assert tree.tokens == [0, 0, 2, 0, 1] and tree.parents == [ROOT, 0, 0, 2, 3]
    greedy_tree = DySpecBuilder(SamplingParams(temperature=1.0, top_k=1)).build(TableOracle(TABLE, 4), 6,
                                                                                ScriptedCoins([0] * 6))
    assert greedy_tree.parents == [ROOT, 0, 1, 2, 3, 4]
    assert greedy_tree.tokens == [0, 2, 0, 2, 0, 2]
    assert greedy_tree.values == [1.0] * 6


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [3, 17, 48])
def test_dyspec_prefetch_does_not_change_the_tree(seed, budget):
    trees, calls = [], []
    for prefetch in (1, 8):
        oracle = PathOracle(8, seed=seed)
        trees.append(DySpecBuilder(SamplingParams(temperature=0.7), prefetch=prefetch).build(oracle, budget, TorchCoins(seed)))
        calls.append(oracle.calls)
    assert same_tree(*trees)
    assert all(len(c) == 1 for c in calls[0])
    assert len(calls[1]) <= len(calls[0])
    expanded = {ROOT, *trees[0].parents}
    for c in calls:  # every node evaluated at most once, every expanded node evaluated
        flat = [n for batch in c for n in batch]
        assert len(flat) == len(set(flat))
        assert expanded <= set(flat)
    assert {n for c in calls[0] for n in c} == expanded  # prefetch=1 evaluates nothing extra


# ----------------------------------------------------------------------------- best-first


def brute_force_top(oracle: PathOracle, params: SamplingParams, budget: int) -> dict[tuple, float]:
    """Top-`budget` paths of the full draft tree to depth `budget` by path probability."""
    scored = {}
    frontier = [((), 1.0)]
    for _ in range(budget):
        nxt = []
        for path, prob in frontier:
            dist = draft_distribution(oracle.row(path), params)
            for tok, w in zip(dist.ids.tolist(), dist.weights64().tolist()):
                scored[path + (tok,)] = prob * w
                nxt.append((path + (tok,), prob * w))
        frontier = nxt
    best = sorted(scored.items(), key=lambda kv: -kv[1])[:budget]
    return dict(best)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [1, 2, 4, 7])
@pytest.mark.parametrize("speculate", [0, 8])
def test_best_first_is_exact_top_b(seed, budget, speculate):
    oracle = PathOracle(3, seed=seed, scale=1.5)
    params = SamplingParams(temperature=1.0)
    tree = BestFirstBuilder(params, speculate=speculate, speculate_ratio=0.0).build(oracle, budget, RuleCoins(last=False))
    want = brute_force_top(oracle, params, budget)
    got = {tuple(tree.path_tokens(n)): tree.values[n] for n in range(len(tree))}
    assert set(got) == set(want)
    for path, value in got.items():
        assert value == pytest.approx(want[path], rel=1e-12)
    validate_tree(tree, 3, budget)


class RenumberingOracle(PathOracle):
    """A PathOracle that remembers which path each forwarded node of the tree it was shown had, and
    re-keys that memory when the builder renumbers (as a draft session re-keys its cache slots)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwarded: dict[int, tuple] = {}
        self.renumbered = 0

    def logits(self, tree, nodes):
        for n in nodes:
            if n != ROOT:
                assert n not in self.forwarded, "a node is forwarded once"
                self.forwarded[n] = tuple(tree.path_tokens(n))
        return super().logits(tree, nodes)

    def renumber(self, mapping):
        self.renumbered += 1
        self.forwarded = {mapping[n]: path for n, path in self.forwarded.items() if n in mapping}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [1, 5, 17, 60])
@pytest.mark.parametrize("speculate,ratio", [(1, 0.0), (4, 0.0), (16, 0.0), (8, 0.3)])
def test_best_first_speculation_builds_the_same_tree(seed, budget, speculate, ratio):
    """Forwarding the best candidates ahead of being chosen changes the forwards, not the tree;
    the oracle's per-node state follows the returned tree's numbering."""
    plain_oracle = PathOracle(7, seed=seed, scale=1.5)
    plain = BestFirstBuilder(T1, speculate=0).build(plain_oracle, budget, RuleCoins(last=False))
    oracle = RenumberingOracle(7, seed=seed, scale=1.5)
    tree = BestFirstBuilder(T1, speculate=speculate, speculate_ratio=ratio).build(oracle, budget, RuleCoins(last=False))
    assert same_tree(plain, tree) and tree.values == plain.values
    assert oracle.renumbered == 1
    # every node that was forwarded and kept maps to the node with the same path
    assert all(tuple(tree.path_tokens(n)) == path for n, path in oracle.forwarded.items())
    # the plain build forwards every node it expands; the kept forwarded nodes are at least those
    expanded = {n for call in plain_oracle.calls for n in call if n != ROOT}
    assert expanded <= set(oracle.forwarded)
    assert len(oracle.calls) <= len(plain_oracle.calls)
    if budget == 60 and ratio == 0.0 and speculate >= 4:
        assert len(oracle.calls) < len(plain_oracle.calls) / 2  # the point of it


def test_best_first_greedy_draft_ranks_at_temperature_one():
    oracle = PathOracle(5, seed=1)
    greedy = BestFirstBuilder(SamplingParams(temperature=0.0)).build(oracle, 6, RuleCoins(last=False))
    t1 = BestFirstBuilder(SamplingParams(temperature=1.0)).build(oracle, 6, RuleCoins(last=False))
    assert same_tree(greedy, t1)
    assert len({tuple(greedy.path_tokens(n)) for n in range(6)}) == 6


def test_best_first_max_children():
    tree = BestFirstBuilder(T1, max_children=2).build(PathOracle(8, seed=3, scale=0.1), 20, RuleCoins(last=False))
    assert len(tree) == 20
    assert max(len(tree.children_of(n)) for n in [ROOT, *range(20)]) <= 2


# ----------------------------------------------------------------------------- sequoia


@lru_cache(maxsize=None)
def ordered_forests(n: int) -> tuple:
    """All ordered forests with exactly n nodes; a tree is the tuple of its children's trees."""
    if n == 0:
        return ((),)
    out = []
    for first in range(1, n + 1):
        for kids in ordered_forests(first - 1):
            for rest in ordered_forests(n - first):
                out.append((kids, *rest))
    return tuple(out)


def forest_score(forest: tuple, acceptance: tuple, prefix: float = 1.0) -> float:
    total = 0.0
    for rank, kids in enumerate(forest):
        v = prefix * (acceptance[rank] if rank < len(acceptance) else 0.0)
        total += v + forest_score(kids, acceptance, v)
    return total


def shape_score(parents: list[int], acceptance: tuple) -> float:
    value, rank_count, total = {}, {}, 0.0
    for i, par in enumerate(parents):
        rank = rank_count.get(par, 0)
        rank_count[par] = rank + 1
        acc = acceptance[rank] if rank < len(acceptance) else 0.0
        value[i] = (1.0 if par == ROOT else value[par]) * acc
        total += value[i]
    return total


def _acceptance_vectors():
    rng = random.Random(0)
    vecs = [DEFAULT_ACCEPTANCE, (0.9,), (0.5, 0.3), (0.3, 0.5, 0.1), (0.05, 0.9), (1.0, 1.0, 1.0)]
    for k in (2, 3, 5, 8):
        vecs.append(tuple(sorted((rng.random() for _ in range(k)), reverse=True)))
        vecs.append(tuple(rng.random() for _ in range(k)))
    return vecs


@pytest.mark.parametrize("acceptance", _acceptance_vectors())
def test_sequoia_dp_matches_brute_force(acceptance):
    assert len(ordered_forests(7)) == 429  # Catalan(7): the enumeration is complete
    for budget in range(0, 8):
        best = max(forest_score(f, acceptance) for n in range(budget + 1) for f in ordered_forests(n))
        parents, value = sequoia_shape(acceptance, budget)
        assert value == pytest.approx(best, abs=1e-12), budget
        assert len(parents) <= budget
        assert shape_score(parents, acceptance) == pytest.approx(best, abs=1e-12)
        # creation (BFS) order: parents precede children and are non-decreasing
        assert all(p == ROOT or 0 <= p < i for i, p in enumerate(parents))
        assert parents == sorted(parents)


def test_sequoia_builder_follows_shape():
    acceptance = (0.6, 0.2, 0.1)
    parents, _ = sequoia_shape(acceptance, 12)
    assert len(parents) == 12
    tree = SequoiaBuilder(T1, acceptance=acceptance).build(PathOracle(10, seed=0), 12, TorchCoins(0))
    assert tree.parents == parents
    assert tree.draw is Draw.WITHOUT_REPLACEMENT
    # a support smaller than the shape's widest node: missing slots (and their subtrees) are skipped
    narrow = SequoiaBuilder(SamplingParams(temperature=1.0, top_k=1), acceptance=acceptance)
    small = narrow.build(PathOracle(10, seed=0), 12, TorchCoins(0))
    validate_tree(small, 10, 12)
    assert 1 <= len(small) < 12
    assert all(len(small.children_of(n)) <= 1 for n in [ROOT, *range(len(small))])


# ----------------------------------------------------------------------------- dyspec-layer


@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_dyspec_layer_fills_budget_and_adapts_threshold(budget):
    builder = DySpecLayerBuilder(SamplingParams(temperature=0.8))
    assert builder.threshold is None
    previous = 1.0 / budget  # the paper's starting point
    for round_no in range(4):
        tree = builder.build(PathOracle(16, seed=round_no), budget, TorchCoins(round_no))
        assert len(tree) == budget
        validate_tree(tree, 16, budget)
        # every round moves t: lowered after an under-fill, or towards the last drawn value
        assert builder.threshold is not None and 0 < builder.threshold != previous
        previous = builder.threshold
    assert builder.fresh().threshold is None


def test_dyspec_layer_threshold_lowered_after_underfill():
    builder = DySpecLayerBuilder(T1, threshold=0.99)
    tree = builder.build(PathOracle(16, seed=1), 24, TorchCoins(1))
    assert len(tree) == 24
    k = math.log(builder.threshold / 0.99) / math.log(0.25)
    assert k >= 1 and abs(k - round(k)) < 1e-9  # lowered by whole factors of 4


def test_dyspec_layer_threshold_raised_after_overfill():
    builder = DySpecLayerBuilder(T1, threshold=1e-12)
    tree = builder.build(PathOracle(16, seed=1), 24, TorchCoins(1))
    assert len(tree) == 24
    assert 1e-12 < builder.threshold < 1.0
    # with t tiny every slot is drawn layer by layer: the first layer is the whole root support
    assert len(tree.children_of(ROOT)) == 16


def test_dyspec_layer_one_forward_per_layer():
    """Without threshold lowering each draft call holds nodes of a single depth."""
    oracle = PathOracle(16, seed=5)
    tree = DySpecLayerBuilder(T1, threshold=1e-12).build(oracle, 40, TorchCoins(5))
    for batch in oracle.calls:
        depths = {0 if n == ROOT else tree.depths[n] for n in batch}
        assert len(depths) == 1
    assert [0 if c[0] == ROOT else tree.depths[c[0]] for c in oracle.calls] == list(range(len(oracle.calls)))


# ----------------------------------------------------------------------------- specinfer and chain


@pytest.mark.parametrize("branching", [1, 2, 3])
@pytest.mark.parametrize("budget", [1, 2, 5, 7, 13])
def test_specinfer_k_ary_layers(branching, budget):
    oracle = PathOracle(8, seed=branching)
    coins = RuleCoins(last=False)  # always the most likely token: duplicates among siblings
    tree = SpecInferBuilder(T1, branching=branching).build(oracle, budget, coins)
    assert tree.parents == [ROOT if i < branching else (i - branching) // branching for i in range(budget)]
    assert tree.draw is Draw.WITH_REPLACEMENT
    validate_tree(tree, 8, budget)  # duplicate siblings are legal with replacement
    for node in [ROOT, *range(budget)]:
        kids = tree.children_of(node)
        if kids:
            assert len({tree.tokens[k] for k in kids}) == 1
    # i.i.d. siblings: every draw sees the node's full distribution, never a residual
    for w in coins.seen:
        assert bool((w > 0).all()) and float(w.sum()) == pytest.approx(1.0)
    # one batched draft call per layer
    assert [len(c) for c in oracle.calls] == [len(layer) for layer in _layers(tree)]


def _layers(tree: TokenTree) -> list[list[int]]:
    layers, layer = [], [ROOT]
    while layer and any(tree.children_of(n) for n in layer):
        layers.append(layer)
        layer = [k for n in layer for k in tree.children_of(n)]
    return layers


def test_specinfer_rejects_bad_branching():
    with pytest.raises(ValueError):
        SpecInferBuilder(T1, branching=0)


@pytest.mark.parametrize("budget", [1, 2, 9])
def test_chain_length(budget):
    tree = ChainBuilder(T1).build(PathOracle(6, seed=0), budget, TorchCoins(0))
    assert len(tree) == budget
    assert tree.parents == [i - 1 for i in range(budget)]
    assert tree.depths == list(range(1, budget + 1))
    assert set(tree.q) == {ROOT, *range(budget - 1)}
    assert all(a >= b for a, b in itertools.pairwise(tree.values))  # path probability only shrinks
