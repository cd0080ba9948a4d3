"""Tensor parallelism: rank 0 mirrors every cache-changing call to the other ranks.

All ranks hold the same sessions and run the same forwards (DeepSpeed AutoTP all-reduces inside
them). Rank 0 alone talks gRPC, validates, and verifies; it broadcasts each command before running
it itself, and the followers replay the commands in order. The verdict is computed once, on rank 0,
and broadcast in the commit, so every rank keeps the same path even if the ranks' logits differed
in the last bit. An idle rank 0 broadcasts a heartbeat every second (`tick`), so the followers'
blocking broadcast never reaches the process group's timeout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from dyspec.hf_runner import HFTargetSession
from dyspec.tree import TokenTree
from dyspec.verify import Verdict
from engine.batched_forward import forward_rounds
from serving.wire import verdict_on


@dataclass(frozen=True)
class Open:
    session_id: str
    prompt: list[int]


@dataclass(frozen=True)
class Prefill:
    session_id: str  # forward its prompt but the last token (HFTargetSession.prefill)


@dataclass(frozen=True)
class Forward:
    session_id: str
    tokens: list[int]
    parents: list[int]


@dataclass(frozen=True)
class ForwardBatch:
    rounds: tuple[Forward, ...]  # one forward over all of them (engine.batched_forward)


@dataclass(frozen=True)
class Commit:
    session_id: str
    accepted: list[int]
    next_token: int


@dataclass(frozen=True)
class Release:
    session_ids: tuple[str, ...]  # empty: a heartbeat


@dataclass(frozen=True)
class Stop:
    pass


def _broadcast(command=None):
    """Rank 0 sends `command`; every other rank receives and returns it (pickled over gloo)."""
    box = [command]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _MirroredSession:
    def __init__(self, session_id: str, local: HFTargetSession):
        self.session_id, self.local = session_id, local

    @property
    def tokens(self) -> list[int]:
        return self.local.tokens

    @property
    def n_cached(self) -> int:
        return self.local.n_cached

    def forward_tree(self, tree: TokenTree):
        _broadcast(Forward(self.session_id, tree.tokens, tree.parents))
        return self.local.forward_tree(tree)

    def commit(self, tree: TokenTree, verdict: Verdict) -> None:
        _broadcast(Commit(self.session_id, verdict.accepted, verdict.next_token))
        self.local.commit(tree, verdict)


class MirroredBackend:
    """Rank 0's SessionBackend when tp_size > 1."""

    def __init__(self, model):
        self.model = model

    def create(self, session_id: str, prompt: list[int]) -> _MirroredSession:
        _broadcast(Open(session_id, prompt))
        return _MirroredSession(session_id, HFTargetSession(self.model, prompt))

    def forward_trees(self, rounds: list[tuple[_MirroredSession, TokenTree]]):
        _broadcast(ForwardBatch(tuple(Forward(s.session_id, t.tokens, t.parents) for s, t in rounds)))
        return forward_rounds(self.model, [(s.local, t) for s, t in rounds])

    def prefill(self, session: _MirroredSession) -> int:
        """Every rank prefills the session's prompt now (a failure here is as fatal to the group as a
        failed forward: the ranks' collectives would no longer match)."""
        _broadcast(Prefill(session.session_id))
        return session.local.prefill()

    def prefill_many(self, sessions: list[_MirroredSession]) -> list[int]:
        """One mirrored prefill after another: every rank replays each (a batched prefill would need
        its own command for the ranks to replay; not built)."""
        return [self.prefill(session) for session in sessions]

    def release(self, session_ids: list[str]) -> None:
        if session_ids:
            _broadcast(Release(tuple(session_ids)))

    def tick(self) -> None:
        _broadcast(Release(()))

    def shutdown(self) -> None:
        _broadcast(Stop())


def follow(model) -> None:
    """Ranks > 0: replay rank 0's commands until Stop."""
    sessions: dict[str, HFTargetSession] = {}
    trees: dict[str, TokenTree] = {}  # the last forwarded tree per session, needed by its commit
    while True:
        command = _broadcast()
        if isinstance(command, Open):
            sessions[command.session_id] = HFTargetSession(model, command.prompt)
        elif isinstance(command, Prefill):
            sessions[command.session_id].prefill()
        elif isinstance(command, Forward):
            tree = TokenTree.from_arrays(command.tokens, command.parents)
            trees[command.session_id] = tree
            sessions[command.session_id].forward_tree(tree)
        elif isinstance(command, ForwardBatch):
            batch = []
            for forward in command.rounds:
                trees[forward.session_id] = TokenTree.from_arrays(forward.tokens, forward.parents)
                batch.append((sessions[forward.session_id], trees[forward.session_id]))
            forward_rounds(model, batch)
        elif isinstance(command, Commit):
            tree = trees.pop(command.session_id)
            sessions[command.session_id].commit(tree, verdict_on(tree, command.accepted, command.next_token))
        elif isinstance(command, Release):
            for session_id in command.session_ids:
                sessions.pop(session_id, None)
                trees.pop(session_id, None)
        elif isinstance(command, Stop):
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command!r}")
