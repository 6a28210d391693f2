"""Chaos injection end to end (`chaos` settings, docs/chaos.md): real sockets, exact randomness.

An injected failure replaces the upstream exchange (the backend is not contacted)
and then takes the path of a real answer of `error_status`: the same retries, the
same breaker, `proxy_errors_total{reason="chaos"}`. Latency is a sleep before a real
attempt, inside the `timeouts.total` deadline.

Exact tests seed the random source by swapping `service.app.context` (a frozen
dataclass) for one whose `rng` is `random.Random(seed)`, then replay the same seed
here to know which attempts fail. Only chaos (and retry backoff, 0 here) draws from
that rng, so the replay is exact while requests are sent one at a time.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable

import requests
from backends import EchoBackend
from conftest import ProxyFactory, admin_backends, registry_value

from pyproxy.config.schema import ChaosConfig, CircuitBreakerConfig, RetryConfig, Timeouts
from pyproxy.process.service import Service
from pyproxy.runtime.snapshot import build_runtime

WAIT = 5.0
RETRIES_ON = RetryConfig(max_retries=2, backoff=0.0)


def total(service: Service, name: str, **labels: str) -> float:
    """A counter summed over every label set that matches `labels`."""
    found = 0.0
    for family in service.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found += s.value
    return found


def seed(service: Service, value: int) -> None:
    service.app.context = dataclasses.replace(service.app.context, rng=random.Random(value))


def received(backends: list[EchoBackend]) -> int:
    return sum(len(b.requests()) for b in backends)


# -- every attempt fails -------------------------------------------------------------


def test_error_rate_one_answers_error_status_and_never_contacts_the_backend(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend], chaos=ChaosConfig(error_rate=1.0, error_status=503))
    answers = [
        http.get(proxy.proxy_url + f"/c{i}", headers={"X-Request-ID": f"chaos-{i}"}, timeout=WAIT)
        for i in range(5)
    ]
    for i, answer in enumerate(answers):
        assert answer.status_code == 503
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert answer.text == "503 Service Unavailable: chaos injected 503\n"
        assert answer.headers["X-Request-ID"] == f"chaos-{i}"
    assert echo_backend.requests() == []
    assert registry_value(proxy, "proxy_errors_total", backend="echo", reason="chaos") == 5
    assert (
        registry_value(proxy, "proxy_errors_total", backend="echo", reason="upstream_status") == 0
    )
    assert total(proxy, "proxy_retries_total") == 0


def test_the_configured_error_status_is_what_the_client_gets(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend], chaos=ChaosConfig(error_rate=1.0, error_status=502))
    answer = http.get(proxy.proxy_url, timeout=WAIT)
    assert answer.status_code == 502
    assert answer.text == "502 Bad Gateway: chaos injected 502\n"
    assert echo_backend.requests() == []


def test_an_error_status_outside_the_proxys_own_table_keeps_its_reason_phrase(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend], chaos=ChaosConfig(error_rate=1.0, error_status=500))
    answer = http.get(proxy.proxy_url, timeout=WAIT)
    assert answer.status_code == 500
    assert answer.reason == "Internal Server Error"
    assert answer.text == "500 Internal Server Error: chaos injected 500\n"


def test_with_retries_every_attempt_is_injected_and_retried_on_another_backend(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    proxy = make_proxy(three_backends, retries=RETRIES_ON, chaos=ChaosConfig(error_rate=1.0))
    codes = [http.get(proxy.proxy_url, timeout=WAIT).status_code for _ in range(4)]
    assert codes == [503] * 4
    assert received(three_backends) == 0
    assert total(proxy, "proxy_retries_total") == 4 * 2  # 3 attempts per request
    for backend in three_backends:  # each attempt of a request went to a backend not yet tried
        assert (
            registry_value(proxy, "proxy_errors_total", backend=backend.name, reason="chaos") == 4
        )


def test_a_post_is_not_retried_after_an_injected_failure_just_as_after_a_real_one(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    """An injected failure takes the path of a real backend that answered 503, and a
    503 to a POST is not retried under `idempotent_only` (RFC 9110 §9.2.2: POST is
    not idempotent)."""
    proxy = make_proxy(three_backends, retries=RETRIES_ON, chaos=ChaosConfig(error_rate=1.0))
    assert http.post(proxy.proxy_url, data=b"x", timeout=WAIT).status_code == 503
    assert total(proxy, "proxy_retries_total") == 0
    assert total(proxy, "proxy_errors_total", reason="chaos") == 1


# -- some attempts fail: the retry path hides them ----------------------------------------


def replay(
    seed_value: int, requests_count: int, error_rate: float, attempts: int
) -> tuple[int, int]:
    """(successes, retries) that `seed_value` must produce for sequential requests."""
    rng = random.Random(seed_value)
    successes = retries = 0
    for _ in range(requests_count):
        for attempt in range(1, attempts + 1):
            if rng.random() >= error_rate:
                successes += 1
                break
            if attempt < attempts:
                retries += 1
    return successes, retries


def test_half_the_attempts_fail_and_retries_hide_most_of_it_exactly_as_the_seed_says(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    proxy = make_proxy(three_backends, retries=RETRIES_ON, chaos=ChaosConfig(error_rate=0.5))
    seed(proxy, 7)
    count = 60
    codes = [http.get(proxy.proxy_url, timeout=WAIT).status_code for _ in range(count)]

    successes, retries = replay(7, count, 0.5, attempts=3)
    assert codes.count(200) == successes
    assert codes.count(503) == count - successes
    assert total(proxy, "proxy_retries_total") == retries > 0
    assert codes.count(200) >= 0.75 * count  # 1 - 0.5**3 = 87.5% expected
    assert received(three_backends) == successes  # only the lucky attempts got through
    injected = total(proxy, "proxy_errors_total", reason="chaos")
    assert injected == retries + (count - successes)


def test_the_injected_rate_is_within_binomial_bounds(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """400 attempts at 20% on the default (unseeded) rng: mean 80, sigma 8.

    The bounds are mean +- 4.5 sigma (44..116), a false alarm about once in 150,000
    runs; a rate applied per request twice, or never, lands far outside them.
    """
    n, p = 400, 0.2
    proxy = make_proxy([echo_backend], chaos=ChaosConfig(error_rate=p))
    started = time.monotonic()
    codes = [http.get(proxy.proxy_url, timeout=WAIT).status_code for _ in range(n)]
    elapsed = time.monotonic() - started

    failures = codes.count(503)
    mean, sigma = n * p, math.sqrt(n * p * (1 - p))
    assert mean - 4.5 * sigma <= failures <= mean + 4.5 * sigma, failures
    assert failures + codes.count(200) == n
    assert len(echo_backend.requests()) == n - failures
    assert registry_value(proxy, "proxy_errors_total", backend="echo", reason="chaos") == failures
    assert elapsed < 30


def test_a_seeded_rng_makes_the_injected_failures_exact(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend], chaos=ChaosConfig(error_rate=0.2))
    seed(proxy, 2024)
    codes = [http.get(proxy.proxy_url, timeout=WAIT).status_code for _ in range(100)]
    rng = random.Random(2024)
    expected = [503 if rng.random() < 0.2 else 200 for _ in range(100)]
    assert codes == expected


# -- the breaker sees injected failures ---------------------------------------------------


def test_injected_failures_open_the_circuit_when_the_status_counts_as_a_failure(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy(
        [echo_backend],
        circuit_breaker=CircuitBreakerConfig(failure_threshold=3, open_duration=60.0),
        chaos=ChaosConfig(error_rate=1.0, error_status=503),
    )
    assert registry_value(proxy, "proxy_circuit_state", backend="echo") == 0
    assert [http.get(proxy.proxy_url, timeout=WAIT).status_code for _ in range(3)] == [503] * 3

    assert registry_value(proxy, "proxy_circuit_state", backend="echo") == 2
    assert registry_value(proxy, "proxy_circuit_opens_total", backend="echo") == 1
    assert admin_backends(proxy)["echo"]["circuit"] == "open"

    refused = http.get(proxy.proxy_url, timeout=WAIT)  # now nothing is available
    assert refused.status_code == 503
    assert refused.text == (
        "503 Service Unavailable: no backend available in pool default: echo circuit open\n"
    )
    assert "Retry-After" in refused.headers
    assert registry_value(proxy, "proxy_errors_total", backend="", reason="no_backend") == 1
    assert registry_value(proxy, "proxy_errors_total", backend="echo", reason="chaos") == 3
    assert echo_backend.requests() == []


def test_injected_statuses_the_breaker_does_not_count_leave_it_closed(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy(
        [echo_backend],
        circuit_breaker=CircuitBreakerConfig(
            failure_threshold=2, failure_statuses=frozenset({502})
        ),
        chaos=ChaosConfig(error_rate=1.0, error_status=503),
    )
    assert [http.get(proxy.proxy_url, timeout=WAIT).status_code for _ in range(5)] == [503] * 5
    assert registry_value(proxy, "proxy_circuit_state", backend="echo") == 0
    assert registry_value(proxy, "proxy_circuit_opens_total", backend="echo") == 0


def test_retries_and_the_breaker_together_move_traffic_off_a_chaotic_backend(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    """Every attempt fails, so each request tries all three backends (one retry each
    to a backend not yet tried); after `failure_threshold` requests every circuit is
    open and the next requests get 503 at once, with no attempt at all."""
    backends = [make_echo_backend(f"b{i}") for i in range(3)]
    proxy = make_proxy(
        backends,
        retries=RETRIES_ON,
        circuit_breaker=CircuitBreakerConfig(failure_threshold=2, open_duration=60.0),
        chaos=ChaosConfig(error_rate=1.0),
    )
    codes = [http.get(proxy.proxy_url, timeout=WAIT).status_code for _ in range(3)]
    assert codes == [503] * 3
    states = [registry_value(proxy, "proxy_circuit_state", backend=b.name) for b in backends]
    assert states == [2, 2, 2]
    last = http.get(proxy.proxy_url, timeout=WAIT)
    assert last.text == (
        "503 Service Unavailable: no backend available in pool default: "
        "b0 circuit open, b1 circuit open, b2 circuit open\n"
    )
    assert total(proxy, "proxy_errors_total", reason="chaos") == 2 * 3
    assert registry_value(proxy, "proxy_errors_total", backend="", reason="no_backend") == 2
    assert total(proxy, "proxy_retries_total") == 2 * 2
    assert received(backends) == 0


# -- latency ----------------------------------------------------------------------------


def test_latency_delays_the_response_and_the_backend_still_answers(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend], chaos=ChaosConfig(latency=0.3, latency_rate=1.0))
    started = time.monotonic()
    answer = http.get(proxy.proxy_url, timeout=WAIT)
    elapsed = time.monotonic() - started
    assert answer.status_code == 200
    assert 0.29 <= elapsed < 4.0, elapsed  # generous: a shared machine may be slow
    assert len(echo_backend.requests()) == 1


def test_latency_rate_zero_adds_nothing(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend], chaos=ChaosConfig(latency=3.0, latency_rate=0.0))
    started = time.monotonic()
    assert http.get(proxy.proxy_url, timeout=WAIT).status_code == 200
    assert time.monotonic() - started < 2.5


def test_latency_counts_against_the_total_deadline(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy(
        [echo_backend],
        timeouts=Timeouts(connect=1.0, read=2.0, total=0.4),
        chaos=ChaosConfig(latency=30.0, latency_rate=1.0),
    )
    started = time.monotonic()
    answer = http.get(proxy.proxy_url, timeout=WAIT)
    elapsed = time.monotonic() - started
    assert answer.status_code == 504
    assert answer.text.startswith("504 Gateway Timeout: ")
    assert 0.35 <= elapsed < 4.0, elapsed  # the deadline, not the 30 s of latency
    assert echo_backend.requests() == []  # no time was left for a real attempt
    assert (
        registry_value(proxy, "proxy_errors_total", backend="echo", reason="deadline_exceeded") == 1
    )


def test_latency_that_uses_up_the_deadline_is_a_504_even_when_a_failure_is_injected_too(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy(
        [echo_backend],
        timeouts=Timeouts(connect=1.0, read=2.0, total=0.4),
        chaos=ChaosConfig(latency=3.0, latency_rate=1.0, error_rate=1.0),
    )
    answer = http.get(proxy.proxy_url, timeout=WAIT)
    assert answer.status_code == 504  # the deadline passed before any attempt could start
    assert (
        registry_value(proxy, "proxy_errors_total", backend="echo", reason="deadline_exceeded") == 1
    )


# -- chaos follows the running config --------------------------------------------------------


def test_chaos_is_turned_on_and_off_by_a_new_runtime(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend])
    assert http.get(proxy.proxy_url, timeout=WAIT).status_code == 200
    config = proxy.holder.runtime.config
    on = dataclasses.replace(config, chaos=ChaosConfig(error_rate=1.0))
    proxy.holder.runtime, _ = build_runtime(on, previous=proxy.holder.runtime)
    assert http.get(proxy.proxy_url, timeout=WAIT).status_code == 503
    proxy.holder.runtime, _ = build_runtime(config, previous=proxy.holder.runtime)
    assert http.get(proxy.proxy_url, timeout=WAIT).status_code == 200
    assert len(echo_backend.requests()) == 2
