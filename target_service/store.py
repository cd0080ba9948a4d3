"""Bounded session store: a session limit, a cached-token limit, and eviction after idling.

Knows nothing about models: entries are opaque values with a token count. Not thread-safe; the
target calls it only from its model thread. Ended sessions leave a short tombstone, so a late
request learns *why* its session is gone (closed, or evicted) rather than just "unknown".
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import grpc

from serving.errors import ServiceError

T = TypeVar("T")
_TOMBSTONES = 4096  # recently ended session ids remembered for the NOT_FOUND message


@dataclass
class _Entry(Generic[T]):
    value: T
    tokens: int
    last_used: float


class SessionStore(Generic[T]):
    def __init__(self, max_sessions: int, max_cached_tokens: int, idle_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.max_sessions, self.max_cached_tokens, self.idle_timeout_s = max_sessions, max_cached_tokens, idle_timeout_s
        self.clock = clock
        self.cached_tokens = 0
        self.evicted_total = 0
        self._entries: dict[str, _Entry[T]] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def check_add(self, session_id: str, tokens: int) -> None:
        """Raise the status `add` would raise, without adding (to check before building the value)."""
        if session_id in self._entries:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"session {session_id!r} is already open")
        if len(self._entries) >= self.max_sessions:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"session limit reached ({self.max_sessions} open); retry later")
        self.check_room(tokens)

    def add(self, session_id: str, value: T, tokens: int) -> None:
        self.check_add(session_id, tokens)
        self._entries[session_id] = _Entry(value, tokens, self.clock())
        self.cached_tokens += tokens
        self._ended.pop(session_id, None)

    def items(self) -> list[tuple[str, T]]:
        """(session id, value) of every open session, without marking any used."""
        return [(session_id, entry.value) for session_id, entry in self._entries.items()]

    def get(self, session_id: str) -> T:
        """The session's value (marking it used); NOT_FOUND, saying why, if it is not open."""
        entry = self._entries.get(session_id)
        if entry is None:
            reason = self._ended.get(session_id, "unknown")
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} is not open ({reason})")
        entry.last_used = self.clock()
        return entry.value

    def check_room(self, extra_tokens: int) -> None:
        """RESOURCE_EXHAUSTED unless `extra_tokens` more cached tokens fit under the limit."""
        if self.cached_tokens + extra_tokens > self.max_cached_tokens:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"cached-token limit reached ({self.cached_tokens} + {extra_tokens} > "
                               f"{self.max_cached_tokens}); retry later")

    def set_tokens(self, session_id: str, tokens: int) -> None:
        entry = self._entries[session_id]
        self.cached_tokens += tokens - entry.tokens
        entry.tokens = tokens

    def remove(self, session_id: str, reason: str = "closed") -> T | None:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return None
        self.cached_tokens -= entry.tokens
        self._ended[session_id] = reason
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        return entry.value

    def idle_sessions(self) -> list[str]:
        """Sessions unused for longer than the idle timeout (the caller evicts them)."""
        deadline = self.clock() - self.idle_timeout_s
        return [sid for sid, entry in self._entries.items() if entry.last_used < deadline]

    def evict(self, session_id: str) -> T | None:
        value = self.remove(session_id, f"evicted after {self.idle_timeout_s:g} s idle")
        self.evicted_total += value is not None
        return value
