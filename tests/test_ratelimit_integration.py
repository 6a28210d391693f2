"""Rate limits end to end (docs/rate-limiting.md): real sockets. A client over its rate
gets 429 (RFC 6585 §4); a request no backend has a token for gets 503 (RFC 9110 §15.6.4).

A real pyproxy on 127.0.0.1 port 0 in front of echo backends that record every
request, so "nothing went upstream" is counted at the backend, not inferred. Where
a test needs exact bucket levels, the runtime's limiter is swapped for one built on
a FakeClock (the limiters take a `clock`; the Service does not pass one through),
so nothing depends on how fast this machine sends six requests.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path

import requests
from backends import EchoBackend
from conftest import FakeClock, ProxyFactory, admin_backends, metric_value, registry_value

from pyproxy.config.load import load_config, parse_config
from pyproxy.config.schema import Rate, RateLimitConfig
from pyproxy.policy.ratelimit import BackendLimiter, MemoryClientLimiter
from pyproxy.process.service import Service
from pyproxy.runtime.snapshot import build_runtime

WAIT = 5.0


def use_limiters(
    service: Service,
    *,
    client: MemoryClientLimiter | None = None,
    backend: BackendLimiter | None = None,
) -> None:
    """Swap the running snapshot's limiters (the way a reload swaps a runtime)."""
    runtime = service.holder.runtime
    if client is not None:
        runtime = dataclasses.replace(runtime, client_limiter=client)
    if backend is not None:
        pool = dataclasses.replace(runtime.default_pool, backend_limiter=backend)
        runtime = runtime.replacing_pool(pool)
    service.holder.runtime = runtime


def limited_proxy(
    make_proxy: ProxyFactory, backends: list[EchoBackend], clock: FakeClock, **settings: object
) -> Service:
    """A proxy with `rate_limit` settings, its per-client limiter on `clock`."""
    rate_limit = RateLimitConfig(**settings)  # type: ignore[arg-type]
    service = make_proxy(backends, rate_limit=rate_limit)
    assert rate_limit.per_client is not None
    use_limiters(
        service,
        client=MemoryClientLimiter(
            rate_limit.per_client, rate_limit.burst, rate_limit.max_clients, clock=clock
        ),
    )
    return service


def statuses(
    session: requests.Session, url: str, count: int, headers: dict[str, str] | None = None
) -> list[int]:
    return [session.get(url, headers=headers, timeout=WAIT).status_code for _ in range(count)]


# -- per client: the 429 itself --------------------------------------------------------


def test_the_request_after_the_burst_gets_a_complete_429_and_never_reaches_a_backend(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    proxy = limited_proxy(make_proxy, [echo_backend], clock, per_client=Rate(5, 1.0), burst=5)

    ok = [http.get(proxy.proxy_url + f"/n{i}", timeout=WAIT) for i in range(5)]
    refused = http.get(proxy.proxy_url + "/n5", headers={"X-Request-ID": "rl-6"}, timeout=WAIT)

    assert [r.status_code for r in ok] == [200] * 5
    assert refused.status_code == 429
    assert refused.headers["Content-Type"].startswith("text/plain")
    assert refused.text.startswith("429 Too Many Requests: ")
    assert refused.headers["X-Request-ID"] == "rl-6"
    retry_after = refused.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1  # whole seconds, at least one
    assert int(retry_after) == 1  # 5/second: the next token is 0.2 s away, rounded up
    assert refused.headers["RateLimit-Policy"] == '"default";q=5;w=1'
    assert re.fullmatch(r'"default";r=0;t=\d+', refused.headers["RateLimit"])
    assert [r.target for r in echo_backend.requests()] == [f"/n{i}" for i in range(5)]


def test_the_bucket_refills_at_the_rate(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    proxy = limited_proxy(make_proxy, [echo_backend], clock, per_client=Rate(5, 1.0), burst=5)
    assert statuses(http, proxy.proxy_url, 6) == [200] * 5 + [429]
    clock.advance(0.2)  # one token at 5/second
    assert statuses(http, proxy.proxy_url, 2) == [200, 429]
    clock.advance(10)  # never more than the burst
    assert statuses(http, proxy.proxy_url, 6) == [200] * 5 + [429]
    assert len(echo_backend.requests()) == 11


def test_retry_after_counts_whole_seconds_until_a_token_is_back(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    proxy = limited_proxy(make_proxy, [echo_backend], clock, per_client=Rate(6, 60.0), burst=2)
    assert statuses(http, proxy.proxy_url, 2) == [200, 200]
    first = http.get(proxy.proxy_url, timeout=WAIT)
    assert first.status_code == 429
    assert first.headers["Retry-After"] == "10"  # 6/minute: a token every 10 s
    assert first.headers["RateLimit-Policy"] == '"default";q=6;w=60;pyproxy-burst=2'
    clock.advance(7.5)
    assert http.get(proxy.proxy_url, timeout=WAIT).headers["Retry-After"] == "3"  # 2.5 -> 3


def test_the_limit_holds_on_the_real_clock_without_injection(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """The limiter the Service builds itself (real monotonic clock): 3/hour, burst 3."""
    proxy = make_proxy([echo_backend], rate_limit=RateLimitConfig(per_client=Rate(3, 3600.0)))
    assert statuses(http, proxy.proxy_url, 4) == [200, 200, 200, 429]
    assert len(echo_backend.requests()) == 3


def test_rate_limited_requests_are_counted(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    proxy = limited_proxy(make_proxy, [echo_backend], clock, per_client=Rate(2, 1.0))
    assert statuses(http, proxy.proxy_url, 5) == [200, 200, 429, 429, 429]
    assert registry_value(proxy, "proxy_rate_limited_total", scope="client") == 3
    assert registry_value(proxy, "proxy_errors_total", backend="", reason="rate_limited") == 3
    assert registry_value(proxy, "proxy_rate_limited_total", scope="backend") == 0
    # and over the wire, as Prometheus sees it
    assert metric_value(proxy, "proxy_rate_limited_total", scope="client") == 3
    assert metric_value(proxy, "proxy_requests_total", backend="", method="GET", code="429") == 3


# -- per client: the key -----------------------------------------------------------------


def test_a_bare_integer_rate_means_per_minute() -> None:
    config = parse_config(
        {"backends": [], "rate_limit": {"per_client": 100, "per_backend": "7"}}, env={}
    )
    assert config.rate_limit.per_client == Rate(100, 60.0)
    assert config.rate_limit.per_backend == Rate(7, 60.0)
    for spelled in ("5/s", "5/second"):
        parsed = parse_config({"backends": [], "rate_limit": {"per_client": spelled}}, env={})
        assert parsed.rate_limit.per_client == Rate(5, 1.0)


def test_header_key_gives_each_key_its_own_bucket_and_falls_back_to_the_address(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    proxy = limited_proxy(
        make_proxy, [echo_backend], clock, per_client=Rate(2, 60.0), client_key="header:X-Api-Key"
    )
    url = proxy.proxy_url
    assert statuses(http, url, 3, {"X-Api-Key": "alice"}) == [200, 200, 429]
    assert statuses(http, url, 3, {"X-Api-Key": "bob"}) == [200, 200, 429]
    # No header: the client address is the key, a bucket of its own, full until now.
    assert statuses(http, url, 3) == [200, 200, 429]
    # An empty header is no key either: it is the address's (now empty) bucket.
    assert statuses(http, url, 1, {"X-Api-Key": ""}) == [429]
    # A header value that looks like the address does not share the address's bucket
    # (and so cannot be used to drain someone else's).
    assert statuses(http, url, 1, {"X-Api-Key": "127.0.0.1"}) == [200]
    assert len(echo_backend.requests()) == 7


def test_behind_a_trusted_proxy_the_forwarded_client_is_the_key(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    rate_limit = RateLimitConfig(per_client=Rate(2, 60.0))
    proxy = make_proxy(
        [echo_backend], rate_limit=rate_limit, trusted_proxies=(ip_network("127.0.0.0/8"),)
    )
    use_limiters(proxy, client=MemoryClientLimiter(Rate(2, 60.0), None, 100, clock=clock))
    url = proxy.proxy_url
    assert statuses(http, url, 3, {"X-Forwarded-For": "203.0.113.1"}) == [200, 200, 429]
    assert statuses(http, url, 2, {"X-Forwarded-For": "203.0.113.2"}) == [200, 200]
    # Entries left of the first untrusted hop are anyone's words: changing them does
    # not make a new client.
    assert statuses(http, url, 1, {"X-Forwarded-For": "198.51.100.9, 203.0.113.2"}) == [429]
    assert statuses(http, url, 1, {"X-Forwarded-For": "198.51.100.7, 203.0.113.2"}) == [429]
    # A trusted hop on the right is walked past: the client is still 203.0.113.1.
    assert statuses(http, url, 1, {"X-Forwarded-For": "203.0.113.1, 127.0.0.5"}) == [429]


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_gets_no_fresh_bucket(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    proxy = limited_proxy(make_proxy, [echo_backend], clock, per_client=Rate(2, 60.0))
    assert proxy.config.trusted_proxies == ()
    codes = [
        http.get(
            proxy.proxy_url, headers={"X-Forwarded-For": f"198.51.100.{i}"}, timeout=WAIT
        ).status_code
        for i in range(6)
    ]
    assert codes == [200, 200, 429, 429, 429, 429]
    assert len(echo_backend.requests()) == 2


# -- per client: buckets survive what they must ------------------------------------------


def write_config(path: Path, backend: EchoBackend, per_client: str) -> None:
    path.write_text(
        "backends:\n"
        f"  - url: {backend.url}\n"
        f"    name: {backend.name}\n"
        "health_check: {enabled: false}\n"
        "circuit_breaker: {enabled: false}\n"
        "retries: {max_retries: 0}\n"
        "access_log: {enabled: false}\n"
        f"rate_limit: {{per_client: '{per_client}'}}\n",
        encoding="utf-8",
    )


def test_a_reload_with_the_same_rate_limit_keeps_every_bucket(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session, tmp_path: Path
) -> None:
    path = tmp_path / "pyproxy.yaml"
    write_config(path, echo_backend, "2/hour")
    config = load_config(str(path))
    proxy = make_proxy([echo_backend], rate_limit=config.rate_limit, source_path=str(path))
    limiter = proxy.holder.runtime.client_limiter
    assert statuses(http, proxy.proxy_url, 3) == [200, 200, 429]

    result = proxy.reload("test")
    assert result.ok, result
    assert proxy.holder.runtime.client_limiter is limiter
    assert statuses(http, proxy.proxy_url, 1) == [429]  # still empty: no free refill

    # A changed limit is a new limiter, and build_runtime says so.
    changed = dataclasses.replace(
        proxy.holder.runtime.config, rate_limit=RateLimitConfig(per_client=Rate(3, 3600.0))
    )
    rebuilt, _ = build_runtime(changed, previous=proxy.holder.runtime)
    assert rebuilt.client_limiter is not limiter
    same = dataclasses.replace(proxy.holder.runtime.config, chaos=proxy.config.chaos)
    assert build_runtime(same, previous=proxy.holder.runtime)[0].client_limiter is limiter


def test_the_client_table_stays_bounded_under_a_flood_of_distinct_keys() -> None:
    config = parse_config(
        {"backends": [], "rate_limit": {"per_client": "10/second", "max_clients": 1000}}, env={}
    )
    runtime, _ = build_runtime(config)
    limiter = runtime.client_limiter
    assert isinstance(limiter, MemoryClientLimiter)
    started = time.perf_counter()
    high_water = 0
    for i in range(100_000):
        assert limiter.check(f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}").allowed
        if i % 997 == 0:
            high_water = max(high_water, len(limiter))
    elapsed = time.perf_counter() - started
    assert len(limiter) <= 1000 and high_water <= 1000
    assert elapsed < 20, f"100k checks took {elapsed:.1f}s: eviction is not O(1)"


# -- per backend -----------------------------------------------------------------------


def backend_limited_proxy(
    make_proxy: ProxyFactory, backends: list[EchoBackend], rate: Rate
) -> tuple[Service, BackendLimiter, FakeClock]:
    clock = FakeClock()
    proxy = make_proxy(backends, rate_limit=RateLimitConfig(per_backend=rate))
    limiter = BackendLimiter(rate, clock=clock)
    use_limiters(proxy, backend=limiter)
    return proxy, limiter, clock


def test_traffic_moves_off_a_backend_whose_bucket_is_empty(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    first, second = make_echo_backend("first"), make_echo_backend("second")
    proxy, limiter, _ = backend_limited_proxy(make_proxy, [first, second], Rate(2, 1.0))
    assert limiter.take("first") and limiter.take("first")  # first's bucket is now empty

    assert statuses(http, proxy.proxy_url, 2) == [200, 200]
    assert (len(first.requests()), len(second.requests())) == (0, 2)
    assert registry_value(proxy, "proxy_rate_limited_total", scope="backend") == 0


def test_per_backend_buckets_spread_then_refuse_with_503_and_retry_after(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    first, second = make_echo_backend("first"), make_echo_backend("second")
    proxy, _, clock = backend_limited_proxy(make_proxy, [first, second], Rate(2, 1.0))

    assert statuses(http, proxy.proxy_url, 4) == [200] * 4
    assert (len(first.requests()), len(second.requests())) == (2, 2)

    refused = http.get(proxy.proxy_url, headers={"X-Request-ID": "all-empty"}, timeout=WAIT)
    assert refused.status_code == 503
    assert refused.text.startswith("503 Service Unavailable: ")
    assert refused.headers["X-Request-ID"] == "all-empty"
    assert refused.headers["Retry-After"].isdigit()
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(first.requests()) + len(second.requests()) == 4  # no upstream attempt
    assert registry_value(proxy, "proxy_rate_limited_total", scope="backend") == 1
    assert registry_value(proxy, "proxy_errors_total", backend="", reason="no_backend") == 1

    clock.advance(0.5)  # one token each at 2/second
    assert statuses(http, proxy.proxy_url, 3) == [200, 200, 503]
    assert len(first.requests()) + len(second.requests()) == 6


def test_retry_after_for_empty_backend_buckets_waits_for_the_first_token(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy, _, clock = backend_limited_proxy(make_proxy, [echo_backend], Rate(1, 60.0))
    assert statuses(http, proxy.proxy_url, 1) == [200]
    clock.advance(15)
    refused = http.get(proxy.proxy_url, timeout=WAIT)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "45"
    assert len(echo_backend.requests()) == 1


def test_backend_buckets_on_the_real_clock(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    """The limiter the Service builds itself: 2/hour each, two backends, four requests."""
    first, second = make_echo_backend("first"), make_echo_backend("second")
    proxy = make_proxy([first, second], rate_limit=RateLimitConfig(per_backend=Rate(2, 3600.0)))
    assert statuses(http, proxy.proxy_url, 5) == [200, 200, 200, 200, 503]
    assert (len(first.requests()), len(second.requests())) == (2, 2)
    assert registry_value(proxy, "proxy_rate_limited_total", scope="backend") == 1


def test_admin_backends_says_a_backend_with_an_empty_bucket_is_not_available(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy, limiter, _ = backend_limited_proxy(make_proxy, [echo_backend], Rate(1, 60.0))
    assert statuses(http, proxy.proxy_url, 2) == [200, 503]
    assert not limiter.has_token(echo_backend.name)
    (entry,) = admin_backends(proxy).values()
    assert entry["available"] is False  # available needs a token in its bucket (docs/balancing.md)


def test_a_client_limit_refuses_before_a_backend_token_is_spent(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    clock = FakeClock()
    proxy = make_proxy(
        [echo_backend],
        rate_limit=RateLimitConfig(per_client=Rate(1, 60.0), per_backend=Rate(5, 60.0)),
    )
    backend_limiter = BackendLimiter(Rate(5, 60.0), clock=clock)
    use_limiters(
        proxy,
        client=MemoryClientLimiter(Rate(1, 60.0), None, 100, clock=clock),
        backend=backend_limiter,
    )
    assert statuses(http, proxy.proxy_url, 4) == [200, 429, 429, 429]
    assert math.isclose(backend_limiter.level(echo_backend.name), 4.0)


def test_a_huge_header_key_is_stored_as_a_short_digest(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """A 60 KiB X-Api-Key must not cost 60 KiB of table for as long as its bucket lives:
    times max_clients (100,000 by default) that would be gigabytes."""
    proxy = make_proxy(
        [echo_backend],
        rate_limit=RateLimitConfig(per_client=Rate(1, 60.0), client_key="header:X-Api-Key"),
    )
    huge = "k" * (60 * 1024)
    assert statuses(http, proxy.proxy_url, 2, {"X-Api-Key": huge}) == [200, 429]
    assert statuses(http, proxy.proxy_url, 1, {"X-Api-Key": huge[:-1] + "x"}) == [200]
    limiter = proxy.holder.runtime.client_limiter
    assert isinstance(limiter, MemoryClientLimiter)
    keys = list(limiter._buckets)
    assert len(keys) == 2
    assert all(len(key) <= 64 for key in keys), [len(key) for key in keys]
    assert not any("kkkk" in key for key in keys)  # the credential itself is not kept


def test_an_address_key_stays_readable_and_a_long_one_is_bounded() -> None:
    limiter = MemoryClientLimiter(Rate(1, 60.0), None, 10)
    limiter.check("ip:192.0.2.7")
    limiter.check("ip:" + "1" * 5000)  # a forwarded "address" a trusted hop passed on as is
    keys = list(limiter._buckets)
    assert keys[0] == "ip:192.0.2.7"
    assert len(keys[1]) <= 64
