"""When the SDK retries: UNAVAILABLE only, and only before the first message arrived (nothing was
generated yet, so a retry cannot duplicate output), with capped exponential backoff and full
jitter, within the call's deadline."""
from __future__ import annotations

import random
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # including the first
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_attempts >= 1 and 0 <= initial_backoff_s <= max_backoff_s")

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Sleep before attempt `attempt` + 1 (attempt counts from 1): uniform in [0, cap] ("full
        jitter"), so clients that failed together do not come back together."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return rng.uniform(0.0, cap)

    def should_retry(self, code: grpc.StatusCode, attempt: int, received: bool, remaining_s: float,
                     delay_s: float) -> bool:
        return (code == grpc.StatusCode.UNAVAILABLE and not received and attempt < self.max_attempts
                and delay_s < remaining_s)
