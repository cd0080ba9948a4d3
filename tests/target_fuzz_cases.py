"""Seeded fuzz cases for the target's Session stream (tests/test_target_fuzz.py runs them).

A case is a short scripted conversation on one stream: serialized requests, each with the outcomes
it may get, an answer kind ("opened", "verdict", "closed") or a status code. A conversation whose
every request was answered is closed by the runner; one that ended in a status is over. Kinds:

- bytes: random bytes as the first message, and byte-level mutations (bit flips, overwrites,
  insertions, deletions, truncation) of valid opens, and of valid trees sent after a valid open. The
  allowed outcomes follow from what the bytes decode to here (protobuf is the same library on both
  sides): undecodable bytes are INVALID_ARGUMENT, a decoded tree may be valid, and so on.
- field: one field-level mutation of a valid tree that makes it certainly invalid (bad parents,
  cycles, out-of-vocabulary ids, length mismatches, oversize, bad draw modes, distributions that are
  missing, duplicated, on a leaf, not summing to 1, with non-positive or NaN probabilities, ...):
  INVALID_ARGUMENT; wrong round numbers: FAILED_PRECONDITION; a tree past the context limit.
- protocol: requests out of order or against the store (a tree before open, a second open, resume
  of an unknown or a non-resumable session, an id already open, bad ids, prompts and sampling
  parameters, the wrong model, empty requests, conflicting replays).
- edge: valid but unusual sessions and trees (empty trees, chains and stars at the node limit,
  full-vocabulary supports, extreme but valid probabilities, duplicate siblings drawn with
  replacement, deterministic trees, extreme sampling parameters), run as many rounds per session
  as the context allows: every one must get a well-formed verdict.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import grpc

from proto.dyspec.v1 import sampling_pb2, target_pb2
from google.protobuf.message import DecodeError

Code = grpc.StatusCode
INVALID = frozenset({Code.INVALID_ARGUMENT})
PRECONDITION = frozenset({Code.FAILED_PRECONDITION})
INT32_MAX, INT32_MIN, UINT32_MAX = 2**31 - 1, -2**31, 2**32 - 1
WITHOUT, WITH, DETERMINISTIC = (target_pb2.DRAW_MODE_WITHOUT_REPLACEMENT, target_pb2.DRAW_MODE_WITH_REPLACEMENT,
                                target_pb2.DRAW_MODE_DETERMINISTIC)


@dataclass(frozen=True)
class Limits:
    vocab: int
    max_nodes: int
    max_context: int
    model: str


@dataclass
class Step:
    message: bytes
    allowed: frozenset  # answer kinds (str) and status codes this request may get
    tree: target_pb2.Tree | None = None  # the tree sent, to check a verdict against


@dataclass
class Case:
    kind: str  # "bytes", "field", "protocol" or "edge", then ":" and the variant
    steps: list[Step] = field(default_factory=list)
    cases: int = 1  # fuzz cases this conversation counts for (an edge session runs many trees)


def request(**kind) -> bytes:
    return target_pb2.TargetRequest(**kind).SerializeToString()


def open_bytes(session_id: str, prompt: list[int], temperature: float = 0.0, seed: int | None = 0,
               resumable: bool = False, model: str = "", **sampling) -> bytes:
    params = sampling_pb2.SamplingParams(temperature=temperature, seed=seed, **sampling)
    return request(open=target_pb2.OpenSession(session_id=session_id, model=model, prompt_token_ids=prompt,
                                               sampling=params, resumable=resumable))


def close_bytes() -> bytes:
    return request(close=target_pb2.CloseSession())


# --- valid trees ----------------------------------------------------------------------------------


def _probs(rng: random.Random, n: int) -> list[float]:
    weights = [rng.random() + 1e-3 for _ in range(n)]
    total = sum(weights)
    return [w / total for w in weights]  # float32 on the wire: the sum stays within 1e-6 of 1


def valid_tree(rng: random.Random, limits: Limits, nodes: int | None = None, draw: int | None = None,
               round_number: int = 1) -> target_pb2.Tree:
    """A random well-formed tree: parents precede children, distinct siblings unless drawn with
    replacement, and a distribution on every expanded node holding its children's tokens."""
    draw = rng.choice([WITHOUT, WITHOUT, WITH, DETERMINISTIC]) if draw is None else draw
    n = rng.randint(0, limits.max_nodes) if nodes is None else nodes
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[int, list[int]] = {}
    for i in range(n):
        parent = rng.choice([-1, -1] + list(range(max(0, i - 4), i)))
        used = {tokens[c] for c in children.get(parent, [])}
        token = rng.randrange(limits.vocab)
        while draw != WITH and token in used:
            token = rng.randrange(limits.vocab)
        tokens.append(token)
        parents.append(parent)
        children.setdefault(parent, []).append(i)
    tree = target_pb2.Tree(round=round_number, token_ids=tokens, parent_indices=parents, draw_mode=draw)
    if draw != DETERMINISTIC:
        for node in sorted(children):
            support = sorted({tokens[c] for c in children[node]} | set(rng.sample(range(limits.vocab), rng.randint(0, 6))))
            rng.shuffle(support)
            tree.distributions.add(node_index=node, token_ids=support, probs=_probs(rng, len(support)))
    return tree


def expanded(tree: target_pb2.Tree) -> list[int]:
    return sorted(set(tree.parent_indices))


def leaves(tree: target_pb2.Tree) -> list[int]:
    return sorted(set(range(len(tree.token_ids))) - set(tree.parent_indices))


# --- field mutations: each returns False when it does not apply to this tree -----------------------


def _parent_not_earlier(rng, t, limits):
    i = rng.randrange(len(t.token_ids))
    t.parent_indices[i] = rng.choice([i, i + rng.randint(1, 4), len(t.token_ids) + 7, INT32_MAX])  # self, cycle, beyond


def _parent_negative(rng, t, limits):
    t.parent_indices[rng.randrange(len(t.token_ids))] = rng.choice([-2, -3, -1000, INT32_MIN])


def _token_oov(rng, t, limits):
    t.token_ids[rng.randrange(len(t.token_ids))] = rng.choice(
        [limits.vocab, limits.vocab + rng.randint(1, 10**6), INT32_MAX, -1, rng.randint(INT32_MIN, -1)])


def _lengths(rng, t, limits):
    which = rng.randrange(3)
    if which == 0:
        t.token_ids.append(rng.randrange(limits.vocab))
    elif which == 1:
        t.parent_indices.append(-1)
    else:
        t.parent_indices.pop()


def _oversize(rng, t, limits):
    start = len(t.token_ids)
    extra = limits.max_nodes + rng.randint(1, 3 * limits.max_nodes) - start
    for k in range(extra):  # a chain below the last node: only the size is wrong
        t.token_ids.append(rng.randrange(limits.vocab))
        t.parent_indices.append(start + k - 1)
    t.draw_mode = DETERMINISTIC
    del t.distributions[:]


def _draw_mode(rng, t, limits):
    t.draw_mode = rng.choice([0, 4, 5, 1000, INT32_MAX, -1])


def _with_dists(mutate):
    def apply(rng, t, limits):
        if t.draw_mode == DETERMINISTIC or not t.distributions:
            return False
        return mutate(rng, t, limits, rng.choice(t.distributions))
    return apply


def _dist_node(rng, t, limits, d):
    d.node_index = rng.choice([len(t.token_ids) + rng.randint(0, 5), -2, INT32_MIN, INT32_MAX])


def _dist_on_leaf(rng, t, limits, d):
    leaf = rng.choice(leaves(t))
    t.distributions.add(node_index=leaf, token_ids=[0], probs=[1.0])


def _dist_duplicate(rng, t, limits, d):
    t.distributions.append(d)


def _dist_missing(rng, t, limits, d):
    t.distributions.remove(d)


def _dist_lengths(rng, t, limits, d):
    if rng.random() < 0.5:
        d.probs.append(0.5)
    else:
        d.token_ids.append(limits.vocab - 1)


def _dist_sum(rng, t, limits, d):
    k = rng.randrange(len(d.probs))
    if rng.random() < 0.5:
        d.probs[k] = d.probs[k] + rng.choice([0.01, 0.1, 1.0, 1e6])
    else:
        for j in range(len(d.probs)):
            d.probs[j] = d.probs[j] * 0.5


def _dist_bad_prob(rng, t, limits, d):
    d.probs[rng.randrange(len(d.probs))] = rng.choice([0.0, -0.0, -0.25, math.nan, math.inf, -math.inf, -1e-30])


def _dist_id_oov(rng, t, limits, d):
    d.token_ids[rng.randrange(len(d.token_ids))] = rng.choice([limits.vocab, -1, INT32_MAX, INT32_MIN])


def _dist_duplicate_ids(rng, t, limits, d):
    if len(d.token_ids) < 2:
        return False
    j, k = rng.sample(range(len(d.token_ids)), 2)
    d.token_ids[k] = d.token_ids[j]


def _dist_empty(rng, t, limits, d):
    del d.token_ids[:]
    del d.probs[:]


def _child_not_in_support(rng, t, limits, d):
    kids = [i for i, p in enumerate(t.parent_indices) if p == d.node_index]
    gone = t.token_ids[rng.choice(kids)]
    keep = [(i, p) for i, p in zip(d.token_ids, d.probs) if i != gone]
    del d.token_ids[:]
    del d.probs[:]
    if keep:
        total = sum(p for _, p in keep)
        d.token_ids.extend(i for i, _ in keep)
        d.probs.extend(p / total for _, p in keep)


def _duplicate_siblings(rng, t, limits):
    if t.draw_mode == WITH:
        return False
    for node in expanded(t):
        kids = [i for i, p in enumerate(t.parent_indices) if p == node]
        if len(kids) >= 2:
            t.token_ids[kids[1]] = t.token_ids[kids[0]]  # still in the support, but drawn twice without replacement
            return True
    return False


FIELD_MUTATIONS = {
    "parent_not_earlier": _parent_not_earlier, "parent_negative": _parent_negative, "token_oov": _token_oov,
    "lengths": _lengths, "oversize": _oversize, "draw_mode": _draw_mode,
    "dist_node": _with_dists(_dist_node), "dist_on_leaf": _with_dists(_dist_on_leaf),
    "dist_duplicate": _with_dists(_dist_duplicate), "dist_missing": _with_dists(_dist_missing),
    "dist_lengths": _with_dists(_dist_lengths), "dist_sum": _with_dists(_dist_sum),
    "dist_bad_prob": _with_dists(_dist_bad_prob), "dist_id_oov": _with_dists(_dist_id_oov),
    "dist_duplicate_ids": _with_dists(_dist_duplicate_ids), "dist_empty": _with_dists(_dist_empty),
    "child_not_in_support": _with_dists(_child_not_in_support), "duplicate_siblings": _duplicate_siblings,
}


FIELD_VARIANTS = (*FIELD_MUTATIONS, "round", "context")


def prompt(rng: random.Random, limits: Limits) -> list[int]:
    return [rng.randrange(limits.vocab) for _ in range(rng.randint(1, 8))]


def field_case(rng: random.Random, limits: Limits, sid: str) -> Case:
    name = rng.choice(FIELD_VARIANTS)
    opening = Step(open_bytes(sid, prompt(rng, limits)), frozenset({"opened"}))
    if name == "round":
        tree = valid_tree(rng, limits, round_number=rng.choice([0, 2, 3, 1000, INT32_MAX, UINT32_MAX]))
        return Case(f"field:{name}", [opening, Step(request(tree=tree), PRECONDITION)])
    if name == "context":  # a prompt the open accepts, then a tree with committed + nodes + 1 past the limit
        nodes = rng.randint(1, limits.max_nodes)
        length = rng.randint(max(1, limits.max_context - nodes), limits.max_context - 1)
        long_prompt = [rng.randrange(limits.vocab) for _ in range(length)]
        return Case(f"field:{name}", [Step(open_bytes(sid, long_prompt), frozenset({"opened"})),
                                      Step(request(tree=valid_tree(rng, limits, nodes=nodes)), INVALID)])
    while True:
        tree = valid_tree(rng, limits, nodes=rng.randint(3, limits.max_nodes))
        if FIELD_MUTATIONS[name](rng, tree, limits) is not False:
            return Case(f"field:{name}", [opening, Step(request(tree=tree), INVALID)])


# --- byte-level mutations ----------------------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a bit
            pos = min(pos, len(out) - 1)
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # overwrite a byte
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and out:  # delete a range
            del out[pos:pos + rng.randint(1, 8)]
        elif op == 4:  # truncate
            del out[pos:]
        else:  # duplicate a chunk (repeated fields grow, a field appears twice)
            chunk = out[pos:pos + rng.randint(1, 16)]
            out[pos:pos] = chunk
    return bytes(out)


def decoded(data: bytes) -> target_pb2.TargetRequest | None:
    try:
        return target_pb2.TargetRequest.FromString(data)
    except DecodeError:
        return None


def first_message_outcomes(data: bytes) -> frozenset:
    """What a first message of these bytes may get, from what they decode to."""
    msg = decoded(data)
    if msg is None:
        return INVALID
    return {
        None: INVALID,
        "tree": PRECONDITION,
        "close": frozenset({"closed"}),
        "resume": frozenset({Code.NOT_FOUND, Code.FAILED_PRECONDITION}),  # FAILED: it hit a live id
        "open": frozenset({"opened", Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS}),
    }[msg.WhichOneof("kind")]


def later_message_outcomes(data: bytes) -> frozenset:
    """What a message of these bytes may get on a stream with a fresh session open."""
    msg = decoded(data)
    if msg is None:
        return INVALID
    return {
        None: INVALID,
        "tree": frozenset({"verdict", Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION}),
        "close": frozenset({"closed"}),
        "resume": PRECONDITION,  # this stream is already attached
        "open": PRECONDITION,
    }[msg.WhichOneof("kind")]


BYTES_VARIANTS = ("random", "open", "tree")


def bytes_case(rng: random.Random, limits: Limits, sid: str) -> Case:
    variant = rng.choice(["random", "open", "tree", "tree"])
    if variant == "random":
        data = rng.randbytes(rng.randint(0, 64))
        return Case("bytes:random", [Step(data, first_message_outcomes(data))])
    if variant == "open":
        # Its own id namespace: a one-byte mutation of "fuzz-124" often still opens, as "fuzz-125" or
        # "fuzz-194", the id of a conversation running beside it, which then gets ALREADY_EXISTS for
        # its own valid open (or FAILED_PRECONDITION for its resume of an unknown id). A mutated
        # "mutated-fuzz-124" can only hit another mutated open's id, which allows ALREADY_EXISTS.
        data = mutate_bytes(rng, open_bytes("mutated-" + sid, prompt(rng, limits), temperature=rng.choice([0.0, 0.7]),
                                            seed=rng.randrange(2**40)))
        return Case("bytes:open", [Step(data, first_message_outcomes(data))])
    data = mutate_bytes(rng, request(tree=valid_tree(rng, limits)))
    msg = decoded(data)
    return Case("bytes:tree", [Step(open_bytes(sid, prompt(rng, limits)), frozenset({"opened"})),
                               Step(data, later_message_outcomes(data), msg.tree if msg is not None else None)])


# --- protocol: order and store -------------------------------------------------------------------


PROTOCOL_VARIANTS = ("tree_first", "double_open", "open_then_resume", "resume_unknown", "resume_live", "open_live",
                     "bad_id", "bad_prompt", "bad_sampling", "wrong_model", "empty", "empty_later", "close_first",
                     "replay_conflict")


def protocol_case(rng: random.Random, limits: Limits, sid: str, live_id: str) -> Case:
    """`live_id`: a session that stays open (non-resumable) through the fuzz."""
    p = prompt(rng, limits)
    opened = frozenset({"opened"})
    ok_open = Step(open_bytes(sid, p), opened)
    tree = valid_tree(rng, limits)
    variant = rng.choice(PROTOCOL_VARIANTS)
    steps = {
        "tree_first": lambda: [Step(request(tree=tree), PRECONDITION)],
        "double_open": lambda: [ok_open, Step(open_bytes(sid + "-again", p), PRECONDITION)],
        "open_then_resume": lambda: [ok_open, Step(request(resume=target_pb2.ResumeSession(session_id=sid)), PRECONDITION)],
        "resume_unknown": lambda: [Step(request(resume=target_pb2.ResumeSession(session_id=rng.choice(
            [sid, "", "x" * 300, "no such session", "\u00e9t\u00e9"]))), frozenset({Code.NOT_FOUND}))],
        "resume_live": lambda: [Step(request(resume=target_pb2.ResumeSession(session_id=live_id)), PRECONDITION)],
        "open_live": lambda: [Step(open_bytes(live_id, p), frozenset({Code.ALREADY_EXISTS}))],
        "bad_id": lambda: [Step(open_bytes(rng.choice(["", "a b", "x" * 129, "tab\t", "sl\u00e4sh", "semi;colon"]), p),
                                INVALID)],
        "bad_prompt": lambda: [Step(open_bytes(sid, rng.choice(
            [[], [limits.vocab], [-1], [INT32_MAX], [INT32_MIN], [0] * limits.max_context,
             [1] * (limits.max_context + rng.randint(0, 100))])), INVALID)],
        "bad_sampling": lambda: [Step(open_bytes(sid, p, **rng.choice([
            dict(temperature=-1.0), dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=-math.inf),
            dict(temperature=-1e-300), dict(top_p=1.5), dict(top_p=-0.5), dict(top_p=math.nan), dict(top_p=math.inf),
            dict(top_k=-1), dict(top_k=INT32_MIN), dict(seed=None), dict(seed=2**63), dict(seed=2**64 - 1)])), INVALID)],
        "wrong_model": lambda: [Step(open_bytes(sid, p, model=limits.model + "-other"), PRECONDITION)],
        "empty": lambda: [Step(b"", INVALID)],
        "empty_later": lambda: [ok_open, Step(b"", INVALID)],
        "close_first": lambda: [Step(close_bytes(), frozenset({"closed"}))],
        "replay_conflict": lambda: _replay_conflict(rng, limits, ok_open),
    }[variant]()
    return Case(f"protocol:{variant}", steps)


def _replay_conflict(rng: random.Random, limits: Limits, ok_open: Step) -> list[Step]:
    first = valid_tree(rng, limits, nodes=rng.randint(1, limits.max_nodes))
    other = target_pb2.Tree()
    other.CopyFrom(first)
    other.token_ids[0] = (other.token_ids[0] + 1) % limits.vocab  # may be malformed too: the replay check comes first
    return [ok_open, Step(request(tree=first), frozenset({"verdict"}), first),
            Step(request(tree=first), frozenset({"verdict"}), first),  # a true replay: the cached verdict
            Step(request(tree=other), PRECONDITION)]


# --- valid edge sessions ------------------------------------------------------------------------------


EDGE_SAMPLING = [dict(), dict(temperature=1.0), dict(temperature=0.6, top_k=5), dict(temperature=1.0, top_p=0.5),
                 dict(temperature=1e-6), dict(temperature=1e-300), dict(temperature=5e-324), dict(temperature=1e3),
                 dict(temperature=1e300), dict(temperature=1.0, top_k=INT32_MAX), dict(temperature=1.0, top_p=1e-30),
                 dict(temperature=1.0, top_k=1), dict(temperature=2.0, top_k=3, top_p=0.9),
                 dict(temperature=1.0, seed=2**63 - 1), dict(temperature=-0.0)]


def edge_tree(rng: random.Random, limits: Limits, room: int, round_number: int) -> target_pb2.Tree:
    n = min(room, limits.max_nodes)
    shape = rng.choice(["empty", "chain", "star", "random", "full_support", "extreme_probs", "with_replacement",
                        "deterministic"])
    if shape == "empty" or n == 0:
        return target_pb2.Tree(round=round_number, draw_mode=rng.choice([WITHOUT, WITH, DETERMINISTIC]))
    if shape in ("chain", "star"):
        tokens = rng.sample(range(limits.vocab), n)
        parents = [i - 1 for i in range(n)] if shape == "chain" else [-1] * n
        tree = target_pb2.Tree(round=round_number, token_ids=tokens, parent_indices=parents, draw_mode=WITHOUT)
        for node in sorted(set(parents)):
            kids = [tokens[i] for i, p in enumerate(parents) if p == node]
            tree.distributions.add(node_index=node, token_ids=kids, probs=_probs(rng, len(kids)))
        return tree
    draw = {"with_replacement": WITH, "deterministic": DETERMINISTIC}.get(shape, WITHOUT)
    duplicate = draw == WITH and n >= 2
    tree = valid_tree(rng, limits, nodes=rng.randint(1, n - duplicate), draw=draw, round_number=round_number)
    if duplicate:  # a root child drawn twice, as sampling with replacement may: allowed
        first = tree.parent_indices[:].index(-1) if -1 in tree.parent_indices else None
        if first is not None:
            tree.token_ids.append(tree.token_ids[first])
            tree.parent_indices.append(-1)
    for d in tree.distributions:
        if shape == "full_support":
            probs = _probs(rng, limits.vocab)
            del d.token_ids[:], d.probs[:]
            d.token_ids.extend(range(limits.vocab))
            d.probs.extend(probs)
        elif shape == "extreme_probs" and len(d.probs) >= 2:
            tiny = 1e-7
            d.probs[:] = [tiny] * (len(d.probs) - 1) + [1.0 - tiny * (len(d.probs) - 1)]
    return tree


def edge_case(rng: random.Random, limits: Limits, sid: str) -> Case:
    """One valid session with unusual parameters, run for as many rounds as its context allows."""
    p = prompt(rng, limits)
    sampling = {"seed": rng.randrange(2**63), **rng.choice(EDGE_SAMPLING)}
    steps = [Step(open_bytes(sid, p, **sampling), frozenset({"opened"}))]
    committed_max = len(p)  # a verdict commits at most nodes + 1 tokens: plan for the worst case
    round_number = 0
    while committed_max + 2 <= limits.max_context and round_number < 24:
        round_number += 1
        tree = edge_tree(rng, limits, limits.max_context - committed_max - 1, round_number)
        steps.append(Step(request(tree=tree), frozenset({"verdict"}), tree))
        committed_max += _depth(tree) + 1
    return Case("edge:session", steps, cases=len(steps) - 1)


def _depth(tree: target_pb2.Tree) -> int:
    depth: list[int] = []
    for parent in tree.parent_indices:
        depth.append(1 if parent == -1 else depth[parent] + 1)
    return max(depth, default=0)


def generate_cases(rng: random.Random, limits: Limits, live_id: str, count: int):
    """At least `count` fuzz cases (counting each edge round), as Case conversations."""
    made = 0
    index = 0
    while made < count:
        index += 1
        sid = f"fuzz-{index}"
        roll = rng.random()  # an edge session counts one case per round (~20): it is drawn rarely
        if roll < 0.35:
            case = bytes_case(rng, limits, sid)
        elif roll < 0.75:
            case = field_case(rng, limits, sid)
        elif roll < 0.985:
            case = protocol_case(rng, limits, sid, live_id)
        else:
            case = edge_case(rng, limits, sid)
        made += case.cases
        yield case
