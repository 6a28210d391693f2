"""Per-backend `max_connections` (nginx `max_conns`, HAProxy `maxconn` on a server line):
a backend at its cap is not available.

The EchoBackend's /hold path keeps a request in flight until the test releases it,
so "at the cap" is a state the test controls, not a race it hopes to win. What the
backend accepted (connections, requests) is counted at the backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from backends import EchoBackend, closed_port, wait_for
from conftest import ProxyFactory, admin_backends, metric
from test_resilience import WAIT, get

from pyproxy.config.schema import BackendConfig, RetryConfig
from pyproxy.process.service import Service


def capped(backend: EchoBackend, cap: int) -> BackendConfig:
    return BackendConfig(url=backend.url, name=backend.name, max_connections=cap)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(8)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)  # held requests end with the backend


def hold(service: Service) -> requests.Response:
    return get(service, "/hold")


def test_a_backend_at_its_cap_is_skipped(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    pool: ThreadPoolExecutor,
) -> None:
    full, other = make_echo_backend("full"), make_echo_backend("other")
    proxy = make_proxy([capped(full, 1), other])
    held = pool.submit(hold, proxy)  # round robin's first pick: the capped backend
    assert full.holding.wait(WAIT)
    facts = admin_backends(proxy)["full"]
    assert (facts["in_flight"], facts["max_connections"], facts["available"]) == (1, 1, False)
    assert facts["why_unavailable"] == "at max_connections (1)"
    for _ in range(5):
        assert get(proxy).headers["X-Backend"] == "other"
    assert len(full.requests()) == 1 and full.connections == 1
    full.release.set()
    assert held.result(timeout=WAIT).status_code == 200
    assert wait_for(lambda: admin_backends(proxy)["full"]["in_flight"] == 0)
    assert "full" in {get(proxy).headers["X-Backend"] for _ in range(4)}  # back in rotation


def test_with_every_backend_full_the_client_gets_503_at_once(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, pool: ThreadPoolExecutor
) -> None:
    proxy = make_proxy([capped(echo_backend, 1)])
    held = pool.submit(hold, proxy)
    assert echo_backend.holding.wait(WAIT)
    started = time.monotonic()
    reply = get(proxy)
    assert time.monotonic() - started < 0.5  # no waiting in a queue, no connect attempt
    assert reply.status_code == 503
    assert reply.text == (
        "503 Service Unavailable: no backend available in pool default: "
        "echo at max_connections (1)\n"
    )
    assert int(reply.headers["Retry-After"]) >= 1
    assert reply.headers["X-Request-ID"]
    assert len(echo_backend.requests()) == 1 and echo_backend.connections == 1
    assert metric(proxy, "proxy_errors_total", backend="", reason="no_backend") == 1
    ready = requests.get(proxy.admin_url + "/readyz", timeout=WAIT)
    assert ready.status_code == 503  # nothing available: not ready
    echo_backend.release.set()
    assert held.result(timeout=WAIT).status_code == 200


def test_concurrent_requests_never_exceed_the_cap(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, pool: ThreadPoolExecutor
) -> None:
    proxy = make_proxy([capped(echo_backend, 2)])
    replies = [pool.submit(hold, proxy) for _ in range(6)]
    assert wait_for(lambda: sum(r.done() for r in replies) == 4, WAIT)  # 4 turned away
    assert len(echo_backend.requests()) == 2 and echo_backend.connections == 2
    echo_backend.release.set()
    statuses = sorted(r.result(timeout=WAIT).status_code for r in replies)
    assert statuses == [200, 200, 503, 503, 503, 503]
    assert len(echo_backend.requests()) == 2


def test_a_client_that_leaves_mid_response_gives_its_slot_back(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = make_proxy([capped(echo_backend, 1)])
    with requests.get(proxy.proxy_url + "/large?size=50000000", stream=True, timeout=WAIT) as r:
        assert r.status_code == 200
        next(r.iter_content(65536))
        assert admin_backends(proxy)[echo_backend.name]["in_flight"] == 1
    # The client hung up without reading the rest; the slot must come back.
    assert wait_for(lambda: admin_backends(proxy)[echo_backend.name]["in_flight"] == 0, WAIT)
    assert get(proxy).status_code == 200


def test_a_failed_attempt_gives_its_slot_back(make_proxy: ProxyFactory) -> None:
    dead = BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name="dead", max_connections=1)
    proxy = make_proxy([dead], retries=RetryConfig(max_retries=0))
    for _ in range(3):
        assert get(proxy).status_code == 502  # refused each time, never "full" (503)
    assert admin_backends(proxy)["dead"]["in_flight"] == 0


def test_a_failure_status_relayed_gives_its_slot_back(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = make_proxy([capped(echo_backend, 1)])
    for _ in range(3):
        assert get(proxy, "/status/503").text.startswith("status 503 from")
    assert wait_for(lambda: admin_backends(proxy)[echo_backend.name]["in_flight"] == 0, WAIT)
