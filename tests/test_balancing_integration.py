"""The balancing strategies (docs/balancing.md), end to end: three echo backends behind
a real pyproxy.

Which backend served a request is read from the backends' own records (and the
`X-Backend` header they set), never from what pyproxy says about itself.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import requests
from backends import EchoBackend, wait_for
from conftest import ProxyFactory

from pyproxy.config.schema import BackendConfig


def served_by(session: requests.Session, url: str, count: int) -> list[str]:
    """Send `count` sequential requests; the backend name that answered each."""
    names = []
    for index in range(count):
        response = session.get(f"{url}/pick/{index}", timeout=5)
        assert response.status_code == 200
        names.append(response.headers["X-Backend"])
    return names


def fetch(url: str) -> int:
    """GET in a fresh session (safe from another thread); the status code."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=10).status_code


def received_counts(backends: list[EchoBackend]) -> dict[str, int]:
    return {b.name: len(b.requests()) for b in backends}


def weighted(backend: EchoBackend, weight: int) -> BackendConfig:
    return BackendConfig(url=backend.url, name=backend.name, weight=weight)


def test_round_robin_takes_each_backend_in_turn(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    proxy = make_proxy(three_backends, strategy="round_robin")

    names = served_by(http, proxy.proxy_url, 12)

    assert sorted(names[:3]) == ["app1", "app2", "app3"]
    assert names == names[:3] * 4
    assert received_counts(three_backends) == {"app1": 4, "app2": 4, "app3": 4}


def test_weighted_gives_each_backend_exactly_its_weight_in_every_window(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    weights = {"app1": 5, "app2": 2, "app3": 1}
    proxy = make_proxy([weighted(b, weights[b.name]) for b in three_backends], strategy="weighted")
    window = sum(weights.values())

    names = served_by(http, proxy.proxy_url, 3 * window)

    # nginx's smooth weighted round robin: any `window` consecutive picks hold each
    # backend exactly `weight` times (not only aligned windows).
    for start in range(len(names) - window + 1):
        assert Counter(names[start : start + window]) == weights, (start, names)
    assert received_counts(three_backends) == {name: 3 * w for name, w in weights.items()}


def test_weighted_interleaves_rather_than_bunching(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    weights = {"app1": 5, "app2": 1, "app3": 1}
    proxy = make_proxy([weighted(b, weights[b.name]) for b in three_backends], strategy="weighted")

    names = served_by(http, proxy.proxy_url, 7)

    # nginx's documented sequence for 5:1:1 is a a b a c a a; never five a's in a row.
    assert names == ["app1", "app1", "app2", "app1", "app3", "app1", "app1"]


def test_weight_zero_gets_no_requests_under_any_strategy(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    app1, app2, app3 = three_backends
    configs = [weighted(app1, 1), weighted(app2, 0), weighted(app3, 2)]
    for strategy in ("round_robin", "random", "least_connections", "weighted"):
        proxy = make_proxy(configs, strategy=strategy)
        served_by(http, proxy.proxy_url, 12)
        proxy.close()

    assert app2.requests() == []
    assert len(app1.requests()) > 0 and len(app3.requests()) > 0


def test_random_reaches_every_backend_roughly_evenly(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    proxy = make_proxy(three_backends, strategy="random")

    counts = Counter(served_by(http, proxy.proxy_url, 150))

    # Expected 50 each (sd ~5.8); 25 is more than 4 sd away.
    assert set(counts) == {"app1", "app2", "app3"}
    assert all(count >= 25 for count in counts.values()), counts
    assert received_counts(three_backends) == dict(counts)


def test_least_connections_avoids_the_backend_with_a_request_in_flight(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    backends = [make_echo_backend(f"app{i}") for i in (1, 2, 3)]
    proxy = make_proxy(backends, strategy="least_connections")
    slow_result: list[int] = []
    pinned = threading.Thread(
        target=lambda: slow_result.append(fetch(proxy.proxy_url + "/hold")),
        name="test-slow-request",
        daemon=True,
    )
    pinned.start()
    try:
        assert wait_for(lambda: any(b.holding.is_set() for b in backends), timeout=5)
        busy = next(b for b in backends if b.holding.is_set())

        names = served_by(http, proxy.proxy_url, 20)

        assert busy.name not in names
        # The two idle backends tie; ties are broken at random, so both get some.
        assert set(names) == {b.name for b in backends if b is not busy}
    finally:
        for backend in backends:
            backend.release.set()
        pinned.join(timeout=10)
    assert slow_result == [200]


def test_least_connections_goes_back_to_a_backend_once_it_is_idle(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    backends = [make_echo_backend(f"app{i}") for i in (1, 2)]
    proxy = make_proxy(backends, strategy="least_connections")
    pinned = threading.Thread(
        target=fetch, args=(proxy.proxy_url + "/hold",), name="test-slow-request", daemon=True
    )
    pinned.start()
    assert wait_for(lambda: any(b.holding.is_set() for b in backends), timeout=5)
    busy = next(b for b in backends if b.holding.is_set())
    busy.release.set()
    pinned.join(timeout=10)
    assert wait_for(lambda: all(b.in_flight == 0 for b in proxy.holder.runtime.backends), timeout=5)

    names = served_by(http, proxy.proxy_url, 30)

    assert busy.name in names  # not penalised after its request finished
