"""Where a session's model state lives: in this process (tp_size 1), or mirrored across the
tensor-parallel ranks (target_service.tp). The engine only sees this interface."""
from __future__ import annotations

from typing import Protocol

import torch

from dyspec.decoding import TargetSession
from dyspec.hf_runner import HFTargetSession
from dyspec.tree import TokenTree
from engine.batched_forward import forward_rounds, prefill_sessions
from serving.models import threads_for


class SessionBackend(Protocol):
    def create(self, session_id: str, prompt: list[int]) -> TargetSession:
        """A target session over `prompt`; it exposes `tokens` (the committed tokens)."""

    def forward_trees(self, rounds: list[tuple[TargetSession, TokenTree]]) -> list[torch.Tensor]:
        """Each (session made by `create`, tree)'s logits, from one forward over all of them; each
        session's `commit` then works as after its own `forward_tree`."""

    def prefill(self, session: TargetSession) -> int:
        """Cache the session's prompt but its last token now, ahead of its first tree; the tokens
        forwarded (HFTargetSession.prefill)."""

    def prefill_many(self, sessions: list[TargetSession]) -> list[int]:
        """`prefill` for several sessions, each getting the rows its own would; the tokens each
        cached. A failure leaves every one of them as it was."""

    def release(self, session_ids: list[str]) -> None:
        """Free these sessions' caches (the engine drops its references too)."""

    def tick(self) -> None:
        """Called about once a second from the model thread, busy or idle."""

    def shutdown(self) -> None: ...


# uncached committed tokens from which a round's forward counts as a prompt's prefill
PROMPT_ROWS = 32


class LocalBackend:
    """tp_size 1: the sessions are plain HFTargetSessions of this process's model.

    `batched_threads` > 0: while two or more sessions are open, prompt prefills run on that many
    threads (our kernels' where every linear layer runs on ours, else torch's:
    serving.models.threads_for), and round forwards (batched or not) too while no session outside
    the forward is being drafted for (its last round carried a tree, and its next is not in this
    forward: its draft worker is drafting it now); otherwise forwards keep the process's own count,
    leaving a draft worker on the same machine its core (BatchingConfig.batched_threads says why)."""

    def __init__(self, model, batched_threads: int = 0):
        self.model, self.batched_threads = model, batched_threads
        self.open_sessions: dict[str, HFTargetSession] = {}
        self.tree_nodes: dict[int, int] = {}  # id(session) -> nodes of its last round's tree
        self.loaded_forwards = 0  # forwards run on batched_threads
        self._threads = threads_for(model)

    def create(self, session_id: str, prompt: list[int]) -> HFTargetSession:
        session = HFTargetSession(self.model, prompt)
        self.open_sessions[session_id] = session
        return session

    def forward_trees(self, rounds: list[tuple[HFTargetSession, TokenTree]]) -> list[torch.Tensor]:
        for session, tree in rounds:
            self.tree_nodes[id(session)] = len(tree)
        # A round 1 that overtook its session's prefill at open (queued behind a batch while a burst
        # of sessions opened) carries the whole prompt: the forward is then a prefill, compute-bound
        # and long, and takes the threads as one (`prefill`). On one thread, such forwards held a
        # burst of 16 sessions' first tokens 14-22 s longer than plain decoding's (on the Zen 4).
        carries_prompt = any(len(session.suffix) >= PROMPT_ROWS for session, _ in rounds)
        return self._under_load(forward_rounds, self.model, rounds, drafting_too=carries_prompt,
                                in_forward=[session for session, _ in rounds])

    def prefill(self, session: HFTargetSession) -> int:
        """The prompt's forward ahead of the first tree (target_service.tp mirrors it to every rank),
        on batched_threads while two or more sessions are open, drafting or not: a prompt's forward is
        compute-bound and long (~1.8 s for 128 tokens of the 1.5B fp32 target on one core), so a second
        core nearly halves it, which the draft's forwards slowed meanwhile cost less than; under load
        the prompts queued behind it are most of the wait."""
        return self._under_load(session.prefill, drafting_too=True)

    def prefill_many(self, sessions: list[HFTargetSession]) -> list[int]:
        """Several sessions' prompts in one forward (engine.batched_forward.prefill_sessions), on
        batched_threads as `prefill`: a burst of sessions' prompts read the weights once, in products
        of all their rows, instead of one prompt a forward."""
        return self._under_load(prefill_sessions, self.model, sessions, drafting_too=True)

    def drafting(self, in_forward: list[HFTargetSession] = ()) -> bool:
        """Whether some open session outside `in_forward` is being drafted for: its last round carried
        a tree, so its draft worker drafts its next one now. A session whose round is in the forward
        waits for its verdict, its draft idle (serial rounds, a co-located worker's default; a worker
        running overlapped rounds drafts meanwhile, but those are for drafts on other machines); a
        session without a round yet counts as not drafting, so prompt prefills under load get the
        threads. Counting sessions in the forward too kept batches of drafting sessions on one thread
        while their drafts sat idle: at 2-4 streams, where their forwards are the longest (~20-40 rows)."""
        skip = {id(session) for session in in_forward}
        return any(self.tree_nodes.get(id(session), 0) > 0 for session in self.open_sessions.values()
                   if id(session) not in skip)

    def _under_load(self, forward, *args, drafting_too: bool = False, in_forward: list[HFTargetSession] = ()):
        """forward(*args), on batched_threads threads while two or more sessions are open and none
        outside `in_forward` is drafting (or whether or not one is, with `drafting_too`). A model on
        our kernels gives them to its kernels only (engine.kernel_threads says why torch's ops stay on
        their count); one on stock kernels to torch."""
        if (self.batched_threads < 1 or len(self.open_sessions) < 2
                or (not drafting_too and self.drafting(in_forward))):
            return forward(*args)
        self.loaded_forwards += 1
        with self._threads(self.batched_threads):  # the model thread is the only one computing
            return forward(*args)

    def release(self, session_ids: list[str]) -> None:
        for session_id in session_ids:  # the engine held the only other reference to each session
            session = self.open_sessions.pop(session_id, None)
            if session is not None:
                self.tree_nodes.pop(id(session), None)

    def tick(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
