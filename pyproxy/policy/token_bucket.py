"""TokenBucket: the rate limiter's algorithm, alone.

A token bucket holds at most `capacity` tokens (the burst) and refills at `rate`
tokens per second; a request takes one. A bucket is two numbers, its level and when
it was last updated, and refills lazily when it is next looked at, so nothing runs
in the background. policy/ratelimit.py keeps one per client and one per backend.
"""

from __future__ import annotations

import math

# Float slack: 0.1 token/s for 10 s must make a whole token, not 0.9999999999.
EPSILON = 1e-9


class TokenBucket:
    """TokenBucket: `capacity` tokens, refilled at `rate_per_second`; starts full.

    Not locked: its owner holds a lock around every call. `now` is the owner's
    clock; a `now` earlier than the last one counts as no time passing.
    """

    __slots__ = ("_tokens", "_updated", "capacity", "rate")

    def __init__(self, rate_per_second: float, capacity: float, now: float) -> None:
        self.rate = rate_per_second  # tokens per second; 0 = never refills
        self.capacity = capacity
        self._tokens = capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now

    def take(self, now: float, tokens: float = 1.0) -> bool:
        """Take `tokens` if the bucket holds them; False (and take nothing) if not."""
        self._refill(now)
        if self._tokens + EPSILON < tokens:
            return False
        self._tokens = max(0.0, self._tokens - tokens)
        return True

    def level(self, now: float) -> float:
        """Tokens in the bucket at `now` (0 .. capacity)."""
        self._refill(now)
        return self._tokens

    def seconds_until(self, now: float, tokens: float = 1.0) -> float:
        """Seconds until the bucket holds `tokens`: 0 if it does now, inf if never."""
        return self.seconds_from(self.level(now), tokens)

    def seconds_from(self, level: float, tokens: float = 1.0) -> float:
        """Seconds until a bucket at `level` (just read by `level()`) holds `tokens`."""
        missing = tokens - level
        if missing <= EPSILON:
            return 0.0
        if self.rate <= 0 or tokens > self.capacity:
            return math.inf
        return missing / self.rate
