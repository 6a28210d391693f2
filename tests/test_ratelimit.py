"""Token buckets, the per-client table and its memory bound, per-backend buckets, headers.

Time is a FakeClock the tests advance; nothing sleeps.
"""

from __future__ import annotations

import math
import re
import threading
import time

import pytest
from conftest import FakeClock, run_to_end

from pyproxy.config.schema import Rate
from pyproxy.policy.ratelimit import (
    BackendLimiter,
    ClientLimiter,
    Decision,
    MemoryClientLimiter,
    rate_limit_headers,
)
from pyproxy.policy.token_bucket import TokenBucket

PER_SECOND = Rate(1, 1.0)
PER_MINUTE_6 = Rate(6, 60.0)  # one token every 10 s


# -- TokenBucket -------------------------------------------------------------


def test_bucket_starts_full_and_empties() -> None:
    bucket = TokenBucket(rate_per_second=1.0, capacity=3, now=0.0)
    assert bucket.level(0.0) == 3
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.level(0.0) == 0


def test_bucket_refills_at_its_rate_and_never_beyond_capacity() -> None:
    bucket = TokenBucket(rate_per_second=2.0, capacity=4, now=0.0)
    for _ in range(4):
        bucket.take(0.0)
    assert bucket.level(0.5) == pytest.approx(1.0)
    assert bucket.level(1.25) == pytest.approx(2.5)
    assert bucket.level(100.0) == 4


def test_a_refused_take_takes_nothing() -> None:
    bucket = TokenBucket(rate_per_second=1.0, capacity=5, now=0.0)
    assert bucket.take(0.0, tokens=3)
    assert not bucket.take(0.0, tokens=3)
    assert bucket.level(0.0) == 2


def test_seconds_until() -> None:
    bucket = TokenBucket(rate_per_second=0.5, capacity=2, now=0.0)
    assert bucket.seconds_until(0.0) == 0.0
    bucket.take(0.0, tokens=2)
    assert bucket.seconds_until(0.0) == pytest.approx(2.0)
    assert bucket.seconds_until(1.0) == pytest.approx(1.0)
    assert bucket.seconds_until(1.0, tokens=2) == pytest.approx(3.0)
    assert bucket.seconds_until(1.0, tokens=3) == math.inf  # more than it can ever hold


def test_a_bucket_that_never_refills() -> None:
    bucket = TokenBucket(rate_per_second=0.0, capacity=1, now=0.0)
    bucket.take(0.0)
    assert bucket.seconds_until(1e9) == math.inf


def test_time_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(rate_per_second=1.0, capacity=2, now=10.0)
    bucket.take(10.0, tokens=2)
    assert bucket.level(5.0) == 0
    assert bucket.level(11.0) == pytest.approx(1.0)  # measured from 10, not from 5


def test_float_slack_makes_whole_tokens_on_time() -> None:
    bucket = TokenBucket(rate_per_second=3.0, capacity=2, now=1000.0)
    bucket.take(1000.0, tokens=2)
    # (1000 + 2/3 - 1000) * 3 is 1.99999999999989 in floats: still two tokens.
    assert bucket.seconds_until(1000.0 + 2 / 3, tokens=2) == 0.0
    assert bucket.take(1000.0 + 2 / 3, tokens=2)
    assert bucket.level(1000.0 + 2 / 3) == 0.0  # never a hair below zero


# -- MemoryClientLimiter: decisions ------------------------------------------


def test_burst_then_refusal_with_headers_numbers() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_SECOND, burst=3, max_clients=10, clock=clock)
    decisions = [limiter.check("a") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert [d.retry_after for d in decisions] == [0, 0, 0, 1]
    assert all(d.limit == 3 for d in decisions)
    assert decisions[0].reset_seconds == pytest.approx(1.0)
    assert decisions[3].reset_seconds == pytest.approx(3.0)


def test_burst_defaults_to_the_rate_count() -> None:
    limiter = MemoryClientLimiter(Rate(5, 60.0), burst=None, max_clients=10, clock=FakeClock())
    assert sum(limiter.check("a").allowed for _ in range(10)) == 5


def test_burst_above_the_rate() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_MINUTE_6, burst=20, max_clients=10, clock=clock)
    assert sum(limiter.check("a").allowed for _ in range(30)) == 20
    clock.advance(60)  # the rate, not the burst, governs the refill
    assert sum(limiter.check("a").allowed for _ in range(30)) == 6


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_MINUTE_6, burst=1, max_clients=10, clock=clock)
    assert limiter.check("a").allowed
    assert limiter.check("a").retry_after == 10
    clock.advance(2.5)
    assert limiter.check("a").retry_after == 8  # 7.5 s rounds up
    clock.advance(7.499)
    assert limiter.check("a").retry_after == 1  # 0.001 s is still "1", never 0
    clock.advance(0.001)
    on_time = limiter.check("a")
    assert on_time.allowed and on_time.retry_after == 0


def test_retry_after_is_not_pushed_up_by_float_error() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(Rate(1, 60.0), burst=1, max_clients=10, clock=clock)
    limiter.check("a")
    clock.advance(42)
    assert limiter.check("a").retry_after == 18  # the float says 18.000000000000004
    clock.advance(4.7)
    assert limiter.check("a").retry_after == 14  # 13.3 rounds up, not to nearest


def test_remaining_counts_whole_tokens_only() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_SECOND, burst=3, max_clients=10, clock=clock)
    for _ in range(3):
        limiter.check("a")
    clock.advance(1.6)
    assert limiter.check("a").remaining == 0  # 0.6 of a token is not a request


def test_clients_have_separate_buckets() -> None:
    limiter = MemoryClientLimiter(PER_SECOND, burst=1, max_clients=10, clock=FakeClock())
    assert limiter.check("a").allowed
    assert not limiter.check("a").allowed
    assert limiter.check("b").allowed


@pytest.mark.parametrize(
    ("rate", "burst", "max_clients"),
    [(Rate(0, 60.0), None, 10), (Rate(1, 0.0), None, 10), (PER_SECOND, 0, 10), (PER_SECOND, 1, 0)],
)
def test_nonsense_settings_are_refused(rate: Rate, burst: int | None, max_clients: int) -> None:
    with pytest.raises(ValueError):
        MemoryClientLimiter(rate, burst, max_clients)


def test_memory_limiter_fits_the_protocol_and_is_truthy_when_empty() -> None:
    limiter: ClientLimiter = MemoryClientLimiter(PER_SECOND, None, 10)
    assert limiter  # `limiter or make_new()` must not replace an empty one
    assert isinstance(limiter.check("a"), Decision)


# -- MemoryClientLimiter: the memory bound -----------------------------------


def test_table_never_exceeds_max_clients_and_evicts_least_recently_used() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_MINUTE_6, burst=2, max_clients=3, clock=clock)
    for key in "abc":
        limiter.check(key)
    limiter.check("a")  # a is now the most recently used; b the least
    limiter.check("d")
    assert len(limiter) == 3
    assert limiter.evicted_active == 1
    assert limiter.check("a").remaining == 0  # a kept its bucket (2 taken)...
    assert limiter.check("b").remaining == 1  # ...b lost its own and starts full


def test_full_buckets_go_first_and_for_free() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_SECOND, burst=1, max_clients=4, clock=clock)
    for key in "abcd":
        limiter.check(key)
    clock.advance(1)  # all four refilled: they hold no information any more
    limiter.check("e")
    assert limiter.evicted_active == 0
    assert len(limiter) == 3  # two dropped for one added: the table shrinks when idle


def test_a_limited_client_that_keeps_asking_is_not_evicted_by_new_keys() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_MINUTE_6, burst=1, max_clients=100, clock=clock)
    limiter.check("abuser")
    for i in range(1000):
        if i % 50 == 0:  # asks more often than 100 new keys arrive
            assert not limiter.check("abuser").allowed
        limiter.check(f"new-{i}")
    assert not limiter.check("abuser").allowed
    assert len(limiter) == 100


def test_a_flood_of_distinct_keys_stays_bounded_and_fast() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_MINUTE_6, burst=10, max_clients=1000, clock=clock)
    started = time.perf_counter()
    for i in range(100_000):
        decision = limiter.check(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        assert decision.allowed
        if i % 997 == 0:
            assert len(limiter) <= 1000
            clock.advance(0.001)
    assert len(limiter) == 1000
    assert limiter.evicted_active == 99_000
    # Very generous: a scan per request would take minutes; O(1) takes about a second.
    assert time.perf_counter() - started < 30


@pytest.mark.usefixtures("busy_switching")
def test_one_key_hammered_by_threads_gets_exactly_its_burst() -> None:
    limiter = MemoryClientLimiter(PER_MINUTE_6, burst=500, max_clients=10, clock=FakeClock())
    allowed: list[bool] = []
    lock = threading.Lock()

    def client() -> None:
        mine = [limiter.check("shared").allowed for _ in range(300)]
        with lock:
            allowed.extend(mine)

    run_to_end([threading.Thread(target=client) for _ in range(6)])
    assert allowed.count(True) == 500


def test_buckets_are_only_touched_under_the_limiters_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TokenBucket is not locked itself: each limiter must hold its lock around it."""
    held: list[bool] = []
    owner: list[MemoryClientLimiter | BackendLimiter] = []
    real_refill = TokenBucket._refill

    def watched_refill(bucket: TokenBucket, now: float) -> None:
        held.append(owner[-1]._lock.locked())
        real_refill(bucket, now)

    monkeypatch.setattr(TokenBucket, "_refill", watched_refill)
    clients = MemoryClientLimiter(PER_SECOND, 1, max_clients=1, clock=FakeClock())
    owner.append(clients)
    for key in "abab":  # with max_clients=1 this evicts too
        clients.check(key)
    backends = BackendLimiter(PER_SECOND, clock=FakeClock())
    owner.append(backends)
    backends.has_token("a")
    backends.take("a")
    backends.level("a")
    backends.seconds_until_token(["a", "b"])
    assert len(held) > 8 and all(held)


# -- BackendLimiter ----------------------------------------------------------


def test_has_token_is_a_query_and_take_consumes() -> None:
    clock = FakeClock()
    limiter = BackendLimiter(Rate(2, 1.0), clock=clock)
    for _ in range(5):
        assert limiter.has_token("app1")
    assert limiter.take("app1") and limiter.take("app1")
    assert not limiter.has_token("app1")
    assert not limiter.take("app1")
    assert limiter.has_token("app2")  # buckets are per backend
    clock.advance(0.5)
    assert limiter.level("app1") == pytest.approx(1.0)
    assert limiter.has_token("app1")


def test_seconds_until_token_is_the_smallest_wait() -> None:
    clock = FakeClock()
    limiter = BackendLimiter(Rate(1, 1.0), clock=clock)
    limiter.take("a")
    clock.advance(0.75)
    limiter.take("b")
    assert limiter.seconds_until_token(["a", "b"]) == pytest.approx(0.25)
    assert limiter.seconds_until_token(["b"]) == pytest.approx(1.0)
    assert limiter.seconds_until_token(["a", "c"]) == 0.0
    assert limiter.seconds_until_token([]) == 0.0


def test_forget_drops_the_bucket() -> None:
    limiter = BackendLimiter(Rate(1, 60.0), clock=FakeClock())
    limiter.take("a")
    assert not limiter.has_token("a")
    limiter.forget("a")
    limiter.forget("never-seen")
    assert limiter.has_token("a")


# -- headers -----------------------------------------------------------------

# draft-ietf-httpapi-ratelimit-headers-11: an SF List item, a string then parameters.
ITEM = re.compile(r'^"[a-z]+"(;[a-z*][a-z0-9_.*-]*=\d+)+$')


def params(value: str) -> dict[str, int]:
    assert ITEM.match(value), value
    return {k: int(v) for k, v in (p.split("=") for p in value.split(";")[1:])}


def test_headers_when_allowed() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(Rate(100, 60.0), burst=None, max_clients=10, clock=clock)
    headers = rate_limit_headers(limiter.check("a"), Rate(100, 60.0), 100)
    assert headers == [
        ("RateLimit-Policy", '"default";q=100;w=60'),
        ("RateLimit", '"default";r=99;t=1'),  # 0.6 s to full, in whole seconds
    ]


def test_headers_when_refused_carry_retry_after_equal_to_the_window() -> None:
    clock = FakeClock()
    limiter = MemoryClientLimiter(PER_MINUTE_6, burst=2, max_clients=10, clock=clock)
    limiter.check("a")
    limiter.check("a")
    clock.advance(3)
    decision = limiter.check("a")
    assert not decision.allowed
    headers = dict(rate_limit_headers(decision, PER_MINUTE_6, 2))
    assert headers["Retry-After"] == "7"
    assert params(headers["RateLimit"]) == {"r": 0, "t": 7}
    assert params(headers["RateLimit-Policy"]) == {"q": 6, "w": 60, "pyproxy-burst": 2}
    assert rate_limit_headers(decision, PER_MINUTE_6, 2)[0][0] == "Retry-After"


def test_policy_for_a_per_second_rate() -> None:
    decision = Decision(True, 5, 4, 0.2, 0)
    headers = dict(rate_limit_headers(decision, Rate(5, 1.0), 5))
    assert headers["RateLimit-Policy"] == '"default";q=5;w=1'
    assert headers["RateLimit"] == '"default";r=4;t=1'
    assert "Retry-After" not in headers
