"""Fuzzing the target's Session stream: 10,000 seeded random or mutated conversations
(tests/target_fuzz_cases.py: random bytes, byte- and field-mutated trees, out-of-order and
store-violating requests, valid edge sessions) against a real target process on a loopback port.

Every answer must be one its case allows (INVALID_ARGUMENT / FAILED_PRECONDITION, NOT_FOUND /
ALREADY_EXISTS where those are right, or a well-formed answer), every refusal with a message that
says why; never UNKNOWN, INTERNAL, a hang or a crash. Meanwhile a control session at temperature 0 runs scripted rounds on its own channel, over
and over, and must commit exactly the target's greedy continuation every time (and the same
verdicts as on a quiet target before and after the fuzz); a live session stays open throughout
(the protocol cases open or resume its id); afterwards the store is back to its baseline.

Deeper runs: DYSPEC_FUZZ_SEED=<int> DYSPEC_FUZZ_CASES=<count> [DYSPEC_FUZZ_STREAMS=<concurrent>].
A failure names the case kind, its conversation number, the step and the bytes sent (hex), and
the seed to reproduce it with.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest

from proto.dyspec.v1 import sampling_pb2, target_pb2, target_pb2_grpc
from tests import target_fuzz_cases as fc
from tests.service_models import target as target_model
from tests.service_process import ServiceProcess
from tests.tiny_models import greedy_reference

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("DYSPEC_FUZZ_SEED", "14"))
CASES = int(os.environ.get("DYSPEC_FUZZ_CASES", "10000"))
STREAMS = int(os.environ.get("DYSPEC_FUZZ_STREAMS", "16"))  # conversations in flight at once
MAX_NODES, MAX_CONTEXT = 16, 64
METHOD = "/dyspec.v1.TargetVerification/Session"
CONVERSATION_DEADLINE_S = 30.0  # a conversation is a few messages: hitting this is a hang
CONTROL_PROMPT = [3, 1, 4, 1, 5]
CONTROL_PAUSE_S = 0.01  # between control rounds: the control runs throughout, but must not hog the model thread
MAX_REPORTED = 12
RUN_DEADLINE_S = 600  # the test's timeout, the live session's stream deadline
# The statuses a refused request may end its stream with. INVALID_ARGUMENT: the request is malformed
# whatever the state (undecodable bytes, a bad tree, id, prompt or sampling). FAILED_PRECONDITION:
# well-formed but wrong for this stream or store (a tree before open, a second open, a wrong round,
# the wrong model). Two store cases have their own codes, the ones gRPC defines for them, so a client
# can tell them apart without parsing the message: NOT_FOUND for a resume of a session id the target
# does not hold ("some requested entity was not found"), ALREADY_EXISTS for an open of an id that is
# already open ("the entity a client attempted to create already exists"). All four are the
# caller's mistake: none is retried, none says the target failed.
REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS})


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "target.log"
    # The idle timeout is long so nothing is evicted during a deep run: every session the fuzz
    # leaves behind still shows in the final open_sessions.
    process = ServiceProcess.module("target_service", [
        "--no-warmup", "--model-factory", "tests.service_models:target", "--max-tree-nodes", str(MAX_NODES),
        "--max-context-tokens", str(MAX_CONTEXT), "--idle-timeout-s", "3600", "--log-level", "WARNING"], log)
    try:
        process.wait_ready(120)
        yield process
    finally:
        process.stop()


# --- one conversation ------------------------------------------------------------------------------


@dataclass
class Failure:
    kind: str
    conversation: int
    step: int  # index into case.steps; len(case.steps) is the runner's closing `close`
    message: bytes
    problem: str
    first: bytes  # the conversation's first message (its open), which may be what the target trips on

    def __str__(self) -> str:
        text = (f"{self.kind} conversation #{self.conversation} step {self.step}: {self.problem}; "
                f"bytes {_hex(self.message)}")
        return text if self.step == 0 else f"{text}; step 0 bytes {_hex(self.first)}"


def _hex(data: bytes, shown: int = 120) -> str:
    return "(empty)" if not data else data.hex() if len(data) <= shown else (
        f"{data[:shown].hex()}... ({len(data)} bytes)")


@dataclass
class Tally:
    conversations: Counter = field(default_factory=Counter)  # kind -> conversations
    cases: Counter = field(default_factory=Counter)  # kind -> fuzz cases (an edge session counts its rounds)
    outcomes: Counter = field(default_factory=Counter)  # (kind, how the last fuzz step ended) -> count
    failures: list[Failure] = field(default_factory=list)
    verdicts: int = 0


async def _outcome(call, write: bytes | None):
    """Send `write` (unless None) and get the next answer: (answer kind or status code, response, details)."""
    try:
        if write is not None:
            await call.write(write)
        response = await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code(), None, exc.details()
    except asyncio.InvalidStateError:  # the call already ended (the server closed it): its status says how
        pass
    else:
        if response is not grpc.aio.EOF:
            return response.WhichOneof("kind"), response, None
    return await call.code(), None, await call.details()


def _verdict_problem(verdict: target_pb2.Verdict, tree: target_pb2.Tree | None, limits: fc.Limits) -> str | None:
    """Why `verdict` is not a well-formed answer to `tree`, or None."""
    if tree is None:
        return "a verdict for bytes that decode to no tree"
    if verdict.round != tree.round:
        return f"verdict for round {verdict.round}, the tree was round {tree.round}"
    parent = -1
    for node in verdict.accepted_node_indices:
        if not 0 <= node < len(tree.token_ids) or tree.parent_indices[node] != parent:
            return f"accepted nodes {list(verdict.accepted_node_indices)} are not a root path of the tree"
        parent = node
    if not 0 <= verdict.next_token_id < limits.vocab:
        return f"next token {verdict.next_token_id} outside vocabulary [0, {limits.vocab})"
    if verdict.timings.tree_nodes != len(tree.token_ids):
        return f"timings.tree_nodes {verdict.timings.tree_nodes} for a {len(tree.token_ids)}-node tree"
    return None


def _refusal_problem(code: grpc.StatusCode, details: str | None) -> str | None:
    """Why a stream that ended with `code` is not a proper refusal, or None: a refusal must be one
    of REFUSALS and say what was wrong (a bare code leaves the client guessing)."""
    if code not in REFUSALS:
        return f"{code.name} is not a refusal ({details})"
    if not (details or "").strip():
        return f"{code.name} without a message"
    return None


async def converse(channel, number: int, case: fc.Case, limits: fc.Limits, tally: Tally) -> None:
    """Run one case on its own stream; a failed check is recorded, and ends the conversation."""
    session = channel.stream_stream(METHOD, request_serializer=None,
                                    response_deserializer=target_pb2.TargetResponse.FromString)
    call = session(timeout=CONVERSATION_DEADLINE_S)
    attached = ""  # the session this stream has open, for the `closed` answer
    committed = 0
    previous: tuple[target_pb2.Tree, target_pb2.Verdict] | None = None  # the last verdict, to tell replays

    def fail(index: int, data: bytes, problem: str) -> None:
        tally.failures.append(Failure(case.kind, number, index, data, problem, case.steps[0].message))

    try:
        for index, step in enumerate(case.steps):
            got, response, details = await _outcome(call, step.message)
            label = got.name if isinstance(got, grpc.StatusCode) else got
            if got not in step.allowed:
                allowed = sorted(a.name if isinstance(a, grpc.StatusCode) else a for a in step.allowed)
                return fail(index, step.message, f"got {label} ({details}), allowed {allowed}")
            if response is None and (problem := _refusal_problem(got, details)):
                return fail(index, step.message, problem)
            if index == len(case.steps) - 1 or response is None:
                tally.outcomes[case.kind, label] += 1
            if response is None:  # an allowed status: the stream is over
                return
            if got == "opened":
                sent = fc.decoded(step.message)
                opened = response.opened
                if (opened.session_id, opened.committed_tokens, opened.last_round) != (
                        sent.open.session_id, len(sent.open.prompt_token_ids), 0):
                    return fail(index, step.message, f"opened {opened} for {sent}")
                if (opened.vocab_size, opened.max_tree_nodes, opened.max_context_tokens) != (
                        limits.vocab, limits.max_nodes, limits.max_context):
                    return fail(index, step.message, f"opened with other limits: {opened}")
                attached, committed = opened.session_id, opened.committed_tokens
            elif got == "verdict":
                tally.verdicts += 1
                verdict = response.verdict
                problem = _verdict_problem(verdict, step.tree, limits)
                if problem is None and previous is not None and previous[0] == step.tree:
                    first = previous[1]
                    if not verdict.replayed or (list(verdict.accepted_node_indices), verdict.next_token_id) != (
                            list(first.accepted_node_indices), first.next_token_id):
                        problem = f"a resent round got {verdict}, not the replay of {first}"
                elif problem is None:
                    committed += len(verdict.accepted_node_indices) + 1
                    if verdict.replayed:
                        problem = "a new round's verdict says replayed"
                    elif committed > limits.max_context:
                        problem = f"{committed} tokens committed, over the context limit {limits.max_context}"
                if problem is not None:
                    return fail(index, step.message, problem)
                previous = (step.tree, verdict)
            elif got == "closed":
                if response.closed.session_id != attached:
                    return fail(index, step.message, f"closed {response.closed.session_id!r}, not {attached!r}")
                break
        else:  # every request answered: close it
            data = fc.close_bytes()
            got, response, details = await _outcome(call, data)
            if got != "closed" or response.closed.session_id != attached:
                return fail(len(case.steps), data, f"close got {got} ({details}) {response}")
        got, _, details = await _outcome(call, None)  # after `closed` the stream ends with OK
        if got != grpc.StatusCode.OK:
            fail(len(case.steps), b"", f"the stream ended with {got} ({details}) after closed, not OK")
    finally:
        call.cancel()


# --- the control session: greedy rounds whose verdicts are known ---------------------------------


def control_round(rng: random.Random, greedy: list[int], position: int, room: int, round_number: int,
                  vocab: int) -> tuple[target_pb2.Tree, tuple[list[int], int]]:
    """A tree below committed token `position` of the greedy continuation (a chain of the next
    greedy tokens, maybe one of them wrong, decoy siblings before or after chain nodes), at most
    `room` nodes, and the verdict a greedy target must give it."""
    length = rng.randint(0, min(6, room))
    chain = greedy[position:position + length]
    if chain and rng.random() < 0.5:
        wrong = rng.randrange(length)
        chain[wrong] = (chain[wrong] + rng.randint(1, vocab - 1)) % vocab
    tokens, parents = [], []
    parent = -1
    for depth, token in enumerate(chain):
        decoy = len(tokens) + 1 + length - depth <= room and rng.random() < 0.4  # room for it and the chain left
        decoy_first = rng.random() < 0.5
        decoy_token = (token + rng.randint(1, vocab - 1)) % vocab
        if decoy and decoy_first:
            tokens.append(decoy_token), parents.append(parent)
        tokens.append(token), parents.append(parent)
        node = len(tokens) - 1
        if decoy and not decoy_first:
            tokens.append(decoy_token), parents.append(parent)
        parent = node
    tree = target_pb2.Tree(round=round_number, token_ids=tokens, parent_indices=parents,
                           draw_mode=target_pb2.DRAW_MODE_WITHOUT_REPLACEMENT)
    for node in sorted(set(parents)):  # the expanded nodes
        kids = [tokens[i] for i, p in enumerate(parents) if p == node]
        extra = [t for t in rng.sample(range(vocab), 3) if t not in kids]
        support = kids + extra
        weights = [rng.random() + 0.05 for _ in support]
        tree.distributions.add(node_index=node, token_ids=support, probs=[w / sum(weights) for w in weights])
    accepted, node = [], -1  # at temperature 0 a child is accepted iff it is the greedy token
    while True:
        want = greedy[position + len(accepted)]
        match = next((i for i, p in enumerate(parents) if p == node and tokens[i] == want), None)
        if match is None:
            break
        accepted.append(match)
        node = match
    return tree, (accepted, greedy[position + len(accepted)])


async def control_session(channel, number: int, greedy: list[int], vocab: int, pause_s: float) -> list:
    """One control session from open to close; its verdicts (accepted, next). AssertionError if any
    answer is not the greedy one."""
    rng = random.Random(SEED + 1)  # the same script every time
    call = target_pb2_grpc.TargetVerificationStub(channel).Session(timeout=CONVERSATION_DEADLINE_S)
    sid = f"control-{number}"
    verdicts = []
    try:
        await call.write(target_pb2.TargetRequest(open=target_pb2.OpenSession(
            session_id=sid, prompt_token_ids=CONTROL_PROMPT, sampling=sampling_pb2.SamplingParams(seed=7))))
        assert (await call.read()).opened.session_id == sid
        position, round_number = 0, 0
        while (room := MAX_CONTEXT - len(CONTROL_PROMPT) - position - 1) >= 0:
            round_number += 1
            tree, expected = control_round(rng, greedy, position, room, round_number, vocab)
            await call.write(target_pb2.TargetRequest(tree=tree))
            verdict = (await call.read()).verdict
            got = (list(verdict.accepted_node_indices), verdict.next_token_id)
            assert got == expected and verdict.round == round_number, (
                f"control session {sid} round {round_number}: verdict {got}, the greedy target gives {expected}")
            verdicts.append(got)
            position += len(got[0]) + 1
            await asyncio.sleep(pause_s)
        await call.write(target_pb2.TargetRequest(close=target_pb2.CloseSession()))
        assert (await call.read()).closed.session_id == sid
        assert await call.read() is grpc.aio.EOF and await call.code() == grpc.StatusCode.OK
        return verdicts
    finally:
        call.cancel()


# --- the run ----------------------------------------------------------------------------------------


async def stats(channel) -> target_pb2.TargetStatsResponse:
    return await target_pb2_grpc.TargetVerificationStub(channel).Stats(target_pb2.TargetStatsRequest(), timeout=5)


async def fuzz(address: str, greedy: list[int]) -> dict:
    async with grpc.aio.insecure_channel(address) as channel, grpc.aio.insecure_channel(address) as control:
        baseline = await stats(channel)
        probe = target_pb2_grpc.TargetVerificationStub(channel).Session(timeout=RUN_DEADLINE_S)  # open all along
        await probe.write(target_pb2.TargetRequest(open=target_pb2.OpenSession(
            session_id=f"live-{SEED}", prompt_token_ids=[1, 2, 3], sampling=sampling_pb2.SamplingParams(seed=1))))
        opened = (await probe.read()).opened  # stays open (the live session) until the end
        limits = fc.Limits(opened.vocab_size, opened.max_tree_nodes, opened.max_context_tokens, opened.model)
        assert (limits.max_nodes, limits.max_context) == (MAX_NODES, MAX_CONTEXT)

        reference = await control_session(control, 0, greedy, limits.vocab, 0)  # on a quiet target
        tally = Tally()
        stop = asyncio.Event()
        control_runs = 0

        async def keep_controlling() -> None:
            nonlocal control_runs
            while not stop.is_set():
                control_runs += 1
                verdicts = await control_session(control, control_runs, greedy, limits.vocab, CONTROL_PAUSE_S)
                assert verdicts == reference, f"control session {control_runs} differs from the quiet one"

        cases = enumerate(fc.generate_cases(random.Random(SEED), limits, opened.session_id, CASES), 1)

        async def worker() -> None:
            for number, case in cases:  # one shared generator: drawn in order, whatever finishes first
                tally.conversations[case.kind] += 1
                tally.cases[case.kind] += case.cases
                await converse(channel, number, case, limits, tally)
                if len(tally.failures) >= MAX_REPORTED:
                    return

        start = time.monotonic()
        controller = asyncio.create_task(keep_controlling())
        try:
            await asyncio.gather(*(worker() for _ in range(STREAMS)))
        finally:
            stop.set()
        fuzz_s = time.monotonic() - start
        await asyncio.wait_for(controller, CONVERSATION_DEADLINE_S)  # re-raises a control mismatch

        # The live session was never disturbed: its round 1 still verifies, and it closes cleanly.
        await probe.write(target_pb2.TargetRequest(tree=target_pb2.Tree(round=1, draw_mode=fc.DETERMINISTIC)))
        assert (await probe.read()).verdict.round == 1
        await probe.write(target_pb2.TargetRequest(close=target_pb2.CloseSession()))
        assert (await probe.read()).closed.session_id == opened.session_id
        after = await control_session(control, control_runs + 1, greedy, limits.vocab, 0)
        assert after == reference, "a fresh control session after the fuzz differs from the one before"

        deadline = time.monotonic() + 5
        while (now := await stats(channel)).open_sessions != baseline.open_sessions or (
                now.cached_tokens != baseline.cached_tokens):
            assert time.monotonic() < deadline, (
                f"sessions leaked: {now.open_sessions} open / {now.cached_tokens} cached tokens, "
                f"{baseline.open_sessions} / {baseline.cached_tokens} before the fuzz")
            await asyncio.sleep(0.05)
        return dict(tally=tally, fuzz_s=fuzz_s, control_runs=control_runs, control_rounds=len(reference),
                    rounds_verified=now.rounds_verified - baseline.rounds_verified,
                    batched_rounds=now.batched_rounds - baseline.batched_rounds)


EXPECTED_KINDS = ({f"bytes:{v}" for v in fc.BYTES_VARIANTS} | {f"field:{v}" for v in fc.FIELD_VARIANTS}
                  | {f"protocol:{v}" for v in fc.PROTOCOL_VARIANTS} | {"edge:session"})


@pytest.mark.timeout(RUN_DEADLINE_S)
def test_fuzzed_session_streams_get_only_their_statuses_and_disturb_nothing(target):
    greedy = greedy_reference(target_model(), CONTROL_PROMPT, MAX_CONTEXT - len(CONTROL_PROMPT))
    result = asyncio.run(fuzz(target.address, greedy))
    tally: Tally = result["tally"]
    total = sum(tally.cases.values())
    print(f"\nfuzz seed {SEED}: {total} cases in {sum(tally.conversations.values())} conversations, "
          f"{result['fuzz_s']:.1f} s ({total / result['fuzz_s']:.0f} cases/s, {STREAMS} streams); "
          f"{tally.verdicts} fuzz verdicts, {result['rounds_verified']} rounds verified "
          f"({result['batched_rounds']} batched); control: {result['control_runs']} sessions of "
          f"{result['control_rounds']} rounds")
    for kind in sorted(tally.cases):
        ends = ", ".join(f"{label} {n}" for (k, label), n in sorted(tally.outcomes.items()) if k == kind)
        print(f"  {kind:34} {tally.cases[kind]:5}  ({ends})")

    assert not tally.failures, (f"{len(tally.failures)} fuzz failures (reproduce with DYSPEC_FUZZ_SEED={SEED} "
                                f"DYSPEC_FUZZ_CASES={CASES}):\n" + "\n".join(map(str, tally.failures)))
    assert total >= CASES
    if CASES >= 5000:  # a short run may leave rare variants out
        assert not EXPECTED_KINDS - set(tally.cases), f"never exercised: {sorted(EXPECTED_KINDS - set(tally.cases))}"
    assert target.proc.poll() is None, "the target exited"
    log = target.log_path.read_text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def test_a_vanishing_temperature_is_the_argmax_not_nan():
    """Found by the fuzz: T = 5e-324 is valid on the wire, and logits / T overflowed to inf, the
    softmax to NaN, and the target answered INTERNAL. It is the argmax, ties shared evenly."""
    import torch

    from dyspec.warp import SamplingParams, warped_sparse

    ids, probs = warped_sparse(torch.tensor([0.5, 2.0, -1.0, 2.0]), SamplingParams(5e-324))
    assert sorted(ids.tolist()) == [1, 3] and probs.tolist() == [0.5, 0.5]
    ids, probs = warped_sparse(torch.tensor([0.5, 3.0, -1.0]), SamplingParams(1e-300, top_k=2))
    assert ids.tolist() == [1] and probs.tolist() == [1.0]
