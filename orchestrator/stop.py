"""OpenAI `stop` sequences over streamed text: the output ends just before the first occurrence of
any stop string, which is not returned. A stop string may span several chunks, so text that could
still be the start of one is held back until the next chunk decides."""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything received
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text that is safe to release after `delta`; sets `stopped` once a stop string appeared."""
        if self.stopped:
            return ""
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))  # a match may straddle `sent`
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The rest of the text at the end of the generation (no stop string can complete now)."""
        return "" if self.stopped else self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out
