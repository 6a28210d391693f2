"""Rate limiting with token buckets: per client and per backend.

Each client (by address or header) and each backend has a token bucket
(policy/token_bucket.py): each request takes one token, and a request that finds
no token is refused (429 for a client, "unavailable" for a backend).

See docs/rate-limiting.md.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from pyproxy.config.schema import Rate
from pyproxy.policy.token_bucket import EPSILON, TokenBucket


class Decision(NamedTuple):
    """Decision: the verdict on one request and the numbers for its headers.

    `limit` is the bucket's capacity (the burst); `remaining` the whole tokens
    left after this request; `reset_seconds` the time until the bucket is full
    again (0 = full); `retry_after` whole seconds (>= 1) until a token is back
    when refused, 0 when allowed. Immutable; a NamedTuple, one is made per request
    with a client limit (0.3 us, a frozen dataclass 0.9 us).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float
    retry_after: int


# Longest key kept as written: an IPv6 address with a zone id fits; anything longer
# (a forwarded "address" passed on unchecked by a trusted hop) is digested.
MAX_READABLE_KEY = 64


def bucket_key(key: str) -> str:
    """The name a client's bucket is stored under: bounded in size, whatever the key.

    A key taken from a header (`header:<value>`) is an API key or a token: up to 64
    KiB of text a client chooses, and a credential. It is stored as a 128-bit BLAKE2b
    digest instead (32 hex digits), so each bucket costs the same few bytes and
    neither memory nor Redis holds the credential. The digest is unkeyed on purpose:
    instances sharing a Redis store must name one client's bucket alike, and a
    digest of a high-entropy API key reveals nothing usable (a guessable key could be
    confirmed by whoever reads Redis, as with any shared deterministic name).
    Collisions merge two clients' buckets; finding one costs about 2**64 hashes.
    Address keys (`ip:<address>`) stay readable for debugging, unless too long.
    """
    if len(key) <= MAX_READABLE_KEY and not key.startswith("header:"):
        return key
    kind = key.partition(":")[0][:8]
    digest = hashlib.blake2b(key.encode(), digest_size=16, person=b"pyproxy-ratekey").hexdigest()
    return f"{kind}#{digest}"


class ClientLimiter(Protocol):
    """ClientLimiter: where per-client buckets live (this process, or Redis)."""

    def check(self, key: str) -> Decision:
        """Take one token from `key`'s bucket and say whether the request may pass."""
        ...


def _check_rate(rate: Rate, capacity: int) -> None:
    if rate.count < 1 or rate.per_seconds <= 0:
        raise ValueError(f"rate must be at least 1 per period, got {rate}")
    if capacity < 1:
        raise ValueError(f"burst must be >= 1, got {capacity}")


class MemoryClientLimiter:
    """MemoryClientLimiter: per-client token buckets in this process. Thread-safe.

    `rate` refills each client's bucket; `burst` is its size (None = `rate.count`);
    at most `max_clients` buckets are kept.

    Memory bound. Buckets sit in an OrderedDict in least-recently-used order, and
    every check, allowed or refused, moves its key to the back. A bucket that has
    refilled to full holds no information (a new one would be identical), so
    before adding a key we drop up to two full buckets from the front; dropping
    two for each one added lets the table shrink after a busy period, and, as in
    nginx's limit_req, it is amortised O(1): each key is added once and dropped
    once, with no scan. If the table is still full, the least recently used
    bucket goes even though it is not full (HAProxy stick-tables and nginx
    limit_req zones do the same), and `evicted_active` counts it.

    The trade-off. That last eviction forgets a deficit: the evicted client comes
    back with a full bucket. But to push out a client that keeps sending,
    `max_clients` other keys must arrive between two of its requests, and a
    client that stops sending refills within `burst / rate` seconds anyway. So a
    flood that frees one limited client costs `max_clients` requests and wins it
    at most `burst` extra ones: keep `max_clients` well above `burst` and that
    never pays. What no table can fix is a key the client chooses: each new key
    is a fresh full bucket, so the key must come from a trusted hop (the peer
    address or an authenticated header), never from a header anyone can set.
    """

    def __init__(
        self,
        rate: Rate,
        burst: int | None,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = rate.count if burst is None else burst
        _check_rate(rate, self.capacity)
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.rate = rate
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()  # guards _buckets and the counter; never held across I/O
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # LRU first
        self.evicted_active = 0  # buckets dropped while not yet full (table full of busy keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def __bool__(self) -> bool:
        return True  # without this, __len__ makes a limiter that tracks nobody yet falsy

    def check(self, key: str) -> Decision:
        """Take one token from `key`'s bucket (a new key starts full) and decide."""
        key = bucket_key(key)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                self._make_room(now)
                bucket = TokenBucket(self.rate.per_second, self.capacity, now)
                self._buckets[key] = bucket
            else:
                self._buckets.move_to_end(key)
            allowed = bucket.take(now)
            level = bucket.level(now)  # take() refilled it to `now`: this only reads
        # Arithmetic on the level just read: no need to hold the lock or refill again.
        to_full = bucket.seconds_from(level, self.capacity)
        wait = 0.0 if allowed else bucket.seconds_from(level)
        return Decision(
            allowed=allowed,
            limit=self.capacity,
            remaining=math.floor(level + EPSILON),
            reset_seconds=to_full,
            retry_after=0 if allowed else max(1, math.ceil(wait - EPSILON)),
        )

    def _make_room(self, now: float) -> None:
        """Drop up to two full buckets from the LRU front, then the LRU one if still full."""
        for _ in range(2):
            if not self._buckets:
                return
            oldest = next(iter(self._buckets.values()))  # O(1) on an OrderedDict
            if oldest.level(now) + EPSILON < oldest.capacity:
                break
            self._buckets.popitem(last=False)
        if len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)
            self.evicted_active += 1


class BackendLimiter:
    """BackendLimiter: one token bucket per backend name, for `per_backend`. Thread-safe.

    Each bucket holds `rate.count` tokens and starts full; a name seen for the
    first time gets a full bucket. A backend with no token takes no new request,
    so selection asks `has_token` and the chosen one calls `take`.
    """

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        _check_rate(rate, rate.count)
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()  # guards _buckets; never held across I/O
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, name: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(self.rate.per_second, self.rate.count, now)
        return bucket

    def has_token(self, name: str) -> bool:
        """Would `take(name)` succeed now? A query: takes nothing."""
        now = self._clock()
        with self._lock:
            level = self._bucket(name, now).level(now)
        return 1.0 - level <= EPSILON  # what seconds_until(now) == 0.0 tests

    def take(self, name: str) -> bool:
        """Take a token for one request to `name`; False if its bucket is empty."""
        now = self._clock()
        with self._lock:
            return self._bucket(name, now).take(now)

    def level(self, name: str) -> float:
        """Tokens left in `name`'s bucket (for the status page)."""
        now = self._clock()
        with self._lock:
            return self._bucket(name, now).level(now)

    def seconds_until_token(self, names: Iterable[str]) -> float:
        """Smallest wait until any of `names` has a token (for Retry-After); 0 if none given."""
        now = self._clock()
        with self._lock:
            waits = [self._bucket(name, now).seconds_until(now) for name in names]
        return min(waits, default=0.0)

    def forget(self, name: str) -> None:
        """Drop a removed backend's bucket (a later one of that name starts full)."""
        with self._lock:
            self._buckets.pop(name, None)


def rate_limit_headers(decision: Decision, rate: Rate, burst: int) -> list[tuple[str, str]]:
    """The 429 / rate-limit response headers for `decision` under `rate` and `burst`.

    Fields per draft-ietf-httpapi-ratelimit-headers-11 (§3, §4): each is a
    Structured Fields List whose item is a string naming the policy;
    `RateLimit-Policy` carries the quota `q` per window `w` seconds and
    `RateLimit` the remaining quota `r` and effective window `t` seconds.
    The burst is a vendor-prefixed parameter, as the draft asks for
    implementation-specific ones (§3.1). `t` is the time until the bucket is
    full again; when refused it is the Retry-After instead, since the draft
    (§6) says Retry-After should not point before the end of the window.
    """
    window = max(1, round(rate.per_seconds))  # §3.1.3: a whole, non-zero number of seconds
    quota = round(rate.count * window / rate.per_seconds)
    policy = f'"default";q={quota};w={window}'
    if burst != quota:
        policy += f";pyproxy-burst={burst}"
    if decision.allowed:
        effective = math.ceil(decision.reset_seconds - EPSILON)
    else:
        effective = decision.retry_after
    headers = [
        ("RateLimit-Policy", policy),
        ("RateLimit", f'"default";r={decision.remaining};t={effective}'),
    ]
    if not decision.allowed:
        # RFC 9110 §10.2.3: delay-seconds, a whole number.
        headers.insert(0, ("Retry-After", str(decision.retry_after)))
    return headers


__all__ = [
    "BackendLimiter",
    "ClientLimiter",
    "Decision",
    "MemoryClientLimiter",
    "bucket_key",
    "rate_limit_headers",
]
