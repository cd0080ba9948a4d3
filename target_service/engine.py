"""Session lifecycle and verification on rank 0: every check before any model call, round
numbering with replay, store limits, and the timings each verdict carries.

Not thread-safe by design: every method runs on the one model thread, which so serialises all
model work and all session state (the servicer only translates and queues).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

import grpc

from dyspec.coins import VERIFY_STREAM, TorchCoins, stream_seed
from dyspec.decoding import LocalVerifier, TargetSession
from dyspec.tree import TokenTree, validate_tree
from proto.dyspec.v1 import target_pb2
from serving.errors import ServiceError
from serving.wire import sampling_from_proto, tree_from_proto, verdict_to_proto
from target_service.backend import SessionBackend
from target_service.store import SessionStore

log = logging.getLogger(__name__)
_SESSION_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_context_tokens: int  # a round needs committed + tree nodes + 1 <= this


@dataclass
class _Session:
    target: TargetSession
    verifier: LocalVerifier
    resumable: bool = False  # OpenSession.resumable: a new stream may take it over (resume)
    last_round: int = 0
    last_tree: target_pb2.Tree | None = None  # kept to tell a replay from a conflicting resend
    last_verdict: target_pb2.Verdict | None = None


def _invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class PreparedRound:
    """A checked round waiting for its forward (VerificationEngine.prepare)."""

    session_id: str
    session: _Session
    msg: target_pb2.Tree
    tree: TokenTree
    received_ns: int  # perf_counter_ns when its tree arrived
    start_ns: int  # when its checks began: the end of its queue wait
    rows: int  # rows it adds to a forward: the uncached suffix, the root and the tree nodes


class VerificationEngine:
    def __init__(self, backend: SessionBackend, info: ModelInfo, store: SessionStore[_Session], max_tree_nodes: int,
                 prefill_batch_rows: int = 0):
        """`prefill_batch_rows` > 0: prompts queued for prefill together share forwards of up to that
        many rows (prefill_queued); 0: one prompt a forward."""
        self.backend, self.info, self.store, self.max_tree_nodes = backend, info, store, max_tree_nodes
        self.prefill_batch_rows = prefill_batch_rows
        self._to_prefill: deque[str] = deque()  # session ids from queue_prefill, any thread
        self._prefill_lock = threading.Lock()
        self.rounds_verified = 0
        self.forwards = 0  # target forwards run for rounds (one per batch)
        self.rows_forwarded = 0  # rows in them, summed
        self.batched_rounds = 0  # rounds verified in a forward shared with another session's
        self.prefilled_tokens = 0  # prompt tokens forwarded at open, ahead of round 1

    def open(self, msg: target_pb2.OpenSession) -> target_pb2.Opened:
        if not _SESSION_ID.fullmatch(msg.session_id):
            raise _invalid(f"session_id must be 1-128 characters of [A-Za-z0-9._:/-], got {msg.session_id!r}")
        if msg.model and msg.model != self.info.name:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"this target serves model {self.info.name!r}, not {msg.model!r}")
        prompt = list(msg.prompt_token_ids)
        if not prompt:
            raise _invalid("prompt_token_ids is empty")
        bad = [t for t in prompt if not 0 <= t < self.info.vocab_size]
        if bad:
            raise _invalid(f"prompt token {bad[0]} outside vocabulary [0, {self.info.vocab_size})")
        if len(prompt) >= self.info.max_context_tokens:
            raise _invalid(f"prompt has {len(prompt)} tokens; the context limit is {self.info.max_context_tokens} "
                           "(prompt plus at least one new token)")
        try:
            sampling, seed = sampling_from_proto(msg.sampling)
        except ValueError as exc:
            raise _invalid(f"sampling: {exc}") from None
        if seed is None:
            raise _invalid("sampling.seed is required (the seed the draft drafts with)")
        self.store.check_add(msg.session_id, len(prompt))  # before the backend builds (and mirrors) anything
        target = self.backend.create(msg.session_id, prompt)
        verifier = LocalVerifier(target, sampling, TorchCoins(stream_seed(seed, VERIFY_STREAM)))
        self.store.add(msg.session_id, _Session(target, verifier, msg.resumable), len(prompt))
        return self._opened(msg.session_id, 0, len(prompt))

    def prefill(self, session_id: str) -> int:
        """Model thread, right after `open`: forward the session's prompt (but its last token) while
        the draft drafts the first tree, so round 1 forwards only root and tree. A no-op (0) for a
        session already gone or past its first round; a failure is logged and leaves the prefill to round 1 (under tensor parallelism a failed
        forward on any rank is fatal to the group, as for a round)."""
        try:
            session = self.store.get(session_id)
        except ServiceError:
            return 0
        if session.last_round:
            return 0
        try:
            tokens = self.backend.prefill(session.target)
        except Exception:  # noqa: BLE001 - round 1 will try again, with the tree, and report what it finds
            log.exception("session %s: prefill at open failed; round 1 carries it", session_id)
            return 0
        self.prefilled_tokens += tokens
        return tokens

    def queue_prefill(self, session_id: str) -> None:
        """Any thread: the next `prefill_queued` on the model thread prefills `session_id`."""
        with self._prefill_lock:
            self._to_prefill.append(session_id)

    def prefill_queued(self) -> int:
        """Model thread: prefill every session queued by `queue_prefill` that is still open and before
        its first round, several prompts a forward (up to prefill_batch_rows rows); the tokens
        forwarded. The servicer queues one call per open: the first to run takes every prompt queued
        by then (a burst's), the rest find none. Why: one prompt a forward, a burst of 16 sessions
        waited ~2.5 s a prompt on two cores for its first tokens, where transformers' one padded
        forward of them all took ~1.95 s a prompt; on the packed float32 kernel, whose cost grows
        with rows at these sizes, one forward of 15 prompts took about what 15 forwards did
        (benchmarks/reports/concurrency/emr_amx_batched_prefill): the saving waits for a kernel cheaper
        a row at hundreds of rows. A failed forward of several is retried one session at a time, so a
        failure stays its own session's (logged; round 1 then carries it)."""
        with self._prefill_lock:
            queued, self._to_prefill = list(self._to_prefill), deque()
        ready = []
        for session_id in dict.fromkeys(queued):
            try:
                session = self.store.get(session_id)
            except ServiceError:
                continue
            if not session.last_round:
                ready.append((session_id, session))
        tokens = 0
        for group in self._prefill_groups(ready):
            tokens += self._prefill_together(group)
        return tokens

    def _prefill_groups(self, ready: list[tuple[str, _Session]]) -> list[list[tuple[str, _Session]]]:
        """`ready` in arrival order, cut into forwards of at most prefill_batch_rows uncached rows
        (one session each without a limit; a longer prompt alone)."""
        groups: list[list[tuple[str, _Session]]] = []
        rows = 0
        for entry in ready:
            target = entry[1].target
            uncached = len(target.tokens) - getattr(target, "n_cached", 0)
            if groups and self.prefill_batch_rows and rows + uncached <= self.prefill_batch_rows:
                groups[-1].append(entry)
                rows += uncached
            else:
                groups.append([entry])
                rows = uncached
        return groups

    def _prefill_together(self, group: list[tuple[str, _Session]]) -> int:
        if len(group) == 1:
            return self.prefill(group[0][0])
        try:
            tokens = sum(self.backend.prefill_many([session.target for _, session in group]))
        except Exception:  # noqa: BLE001 - every cache is as it was: each prompt on its own
            log.exception("prefill of %d prompts in one forward failed; prefilling them one by one", len(group))
            return sum(self.prefill(session_id) for session_id, _ in group)
        self.prefilled_tokens += tokens
        return tokens

    def resume(self, session_id: str) -> target_pb2.Opened:
        session = self.store.get(session_id)
        if not session.resumable:  # its stream owns it: no other stream may take it over
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {session_id!r} was opened without resumable; it ends with its stream")
        return self._opened(session_id, session.last_round, len(session.target.tokens))

    def _opened(self, session_id: str, last_round: int, committed: int) -> target_pb2.Opened:
        return target_pb2.Opened(session_id=session_id, model=self.info.name, vocab_size=self.info.vocab_size,
                                 max_tree_nodes=self.max_tree_nodes, max_context_tokens=self.info.max_context_tokens,
                                 eos_token_ids=self.info.eos_token_ids, last_round=last_round,
                                 committed_tokens=committed)

    def verify(self, session_id: str, msg: target_pb2.Tree, received_ns: int) -> target_pb2.Verdict:
        """Verify and commit one round alone. `received_ns` (perf_counter_ns) is when the tree arrived."""
        prepared = self.prepare(session_id, msg, received_ns)
        if isinstance(prepared, target_pb2.Verdict):
            return prepared
        outcome = self.verify_batch([prepared])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def prepare(self, session_id: str, msg: target_pb2.Tree, received_ns: int,
                reserved_tokens: int = 0) -> "PreparedRound | target_pb2.Verdict":
        """Every check of a round before its forward: a replay's cached verdict, or the round ready
        for `verify_batch`; ServiceError for a bad round. `reserved_tokens`: cached tokens that
        rounds prepared earlier in the same batch may commit (the store counts them only after)."""
        start = time.perf_counter_ns()
        session = self.store.get(session_id)
        if msg.round == session.last_round and session.last_verdict is not None:
            if msg != session.last_tree:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"round {msg.round} was already verified with a different tree")
            replay = target_pb2.Verdict()
            replay.CopyFrom(session.last_verdict)
            replay.replayed = True
            return replay
        if msg.round != session.last_round + 1:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"expected round {session.last_round + 1} (or a replay of {session.last_round}), "
                               f"got {msg.round}")
        try:
            tree = tree_from_proto(msg)
            validate_tree(tree, self.info.vocab_size, self.max_tree_nodes)
        except ValueError as exc:
            raise _invalid(f"round {msg.round}: malformed tree: {exc}") from None
        committed = len(session.target.tokens)
        if committed + len(tree) + 1 > self.info.max_context_tokens:
            raise _invalid(f"round {msg.round}: {committed} committed tokens + {len(tree)} tree nodes + 1 exceed "
                           f"the context limit {self.info.max_context_tokens}")
        self.store.check_room(reserved_tokens + len(tree) + 1)
        uncached = committed - session.target.n_cached if hasattr(session.target, "n_cached") else 1
        return PreparedRound(session_id, session, msg, tree, received_ns, start, uncached + len(tree))

    def verify_batch(self, rounds: list["PreparedRound"]) -> list["target_pb2.Verdict | BaseException"]:
        """One forward over every prepared round (of distinct sessions), then each session's walk
        and commit. The outcome of each round, in order: its verdict, or the exception that ended
        it. A walk or commit that fails ends its own round only; a failed forward, after which no
        cache in it can be trusted, ends them all."""
        if not rounds:
            return []
        forward_start = time.perf_counter_ns()
        try:
            logits = self.backend.forward_trees([(r.session.target, r.tree) for r in rounds])
        except Exception as exc:  # noqa: BLE001 - handed to each round's caller, which reports it
            return [exc] * len(rounds)
        forward_ns = time.perf_counter_ns() - forward_start
        rows = sum(r.rows for r in rounds)
        self.forwards += 1
        self.rows_forwarded += rows
        self.batched_rounds += len(rounds) if len(rounds) > 1 else 0
        outcomes: list[target_pb2.Verdict | BaseException] = []
        for prepared, session_logits in zip(rounds, logits):
            try:
                outcomes.append(self._finish(prepared, session_logits, forward_ns, len(rounds), rows))
            except Exception as exc:  # noqa: BLE001 - this session's failure is not its batch-mates'
                outcomes.append(exc)
        return outcomes

    def _finish(self, prepared: "PreparedRound", logits, forward_ns: int, batch_sessions: int,
                batch_rows: int) -> target_pb2.Verdict:
        session, msg, tree = prepared.session, prepared.msg, prepared.tree
        verdict = session.verifier.finish(tree, logits, forward_ns / 1e9)
        self.store.set_tokens(prepared.session_id, len(session.target.tokens))
        self.rounds_verified += 1
        verifier = session.verifier
        timings = target_pb2.VerifyTimings(
            queue_ns=max(0, prepared.start_ns - prepared.received_ns), forward_ns=forward_ns,
            verify_ns=round(verifier.last_walk_s * 1e9), commit_ns=round(verifier.last_commit_s * 1e9),
            total_ns=max(0, time.perf_counter_ns() - prepared.received_ns), tree_nodes=len(tree),
            batch_sessions=batch_sessions, batch_rows=batch_rows)
        session.last_round, session.last_tree = msg.round, msg
        session.last_verdict = verdict_to_proto(verdict, msg.round, timings)
        return session.last_verdict

    def plain_sessions(self) -> set[str]:
        """Open sessions whose last round carried no tree (plain decoding): a worker sends their next
        round within milliseconds of the verdict, having nothing to draft."""
        return {sid for sid, session in self.store.items()
                if session.last_tree is not None and not session.last_tree.token_ids}

    def close(self, session_id: str) -> None:
        if self.store.remove(session_id) is not None:
            self.backend.release([session_id])

    def tick(self) -> list[str]:
        """Periodic upkeep: evict idle sessions, keep the backend alive; returns the evicted ids."""
        evicted = [sid for sid in self.store.idle_sessions() if self.store.evict(sid) is not None]
        self.backend.release(evicted)
        self.backend.tick()
        return evicted
