"""Every admission is given back exactly once, on every path, exceptions included.

A request holds its place in flight, a backend's slot, a breaker permit (in
half-open, one of the few trial slots), a rate token and, once it retries, a retry
token. These tests break the request path at each step, through a real pyproxy on
real sockets, and check that every counter comes back to zero. The circuits are
half-open with one trial slot, so a leaked permit would also take the backend out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from backends import EchoBackend, ScriptedBackend, send, wait_for
from conftest import FakeClock, ProxyFactory, admin_backends, base_config, metric
from prometheus_client import CollectorRegistry
from test_resilience import WAIT

from pyproxy.config.schema import (
    BackendConfig,
    CircuitBreakerConfig,
    Rate,
    RateLimitConfig,
    RetryConfig,
    Timeouts,
)
from pyproxy.observe.metrics import Metrics
from pyproxy.policy.ratelimit import BackendLimiter
from pyproxy.pool import upstream
from pyproxy.pool.breaker import CircuitBreaker, CircuitState
from pyproxy.process.service import Service
from pyproxy.proxy import stream as relay_module
from pyproxy.proxy.admission import BackendLease
from pyproxy.runtime.pools import Pool

OPEN_FOR = 30.0


class Injected(Exception):
    """The failure a test plants in the request path."""


def refusing_start_response(service: Service, exc: Exception, status: str = "200") -> None:
    """Make the edge's start_response raise `exc` for the first head with `status`,
    the way waitress refuses a head it cannot send (a hop-by-hop field, a bad
    Content-Length). Later heads (the 502 pyproxy sends instead) go through."""
    server = service.proxy_server._server
    app = server.application
    refused = []

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def picky(head: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            if head.startswith(status) and not refused:
                refused.append(head)
                start_response(head, headers, *exc_info)  # waitress has taken it in
                raise exc
            return start_response(head, headers, *exc_info)

        return app(environ, picky)

    server.application = middleware


def assert_all_given_back(service: Service) -> None:
    """Every counter an admission touches is back to zero (waited for: a relayed
    response is closed by waitress after its last byte went out)."""
    app = service.app
    backends = service.holder.runtime.backends

    def settled() -> bool:
        return (
            app.budget.requests_in_flight == 0
            and app.budget.retries_in_flight == 0
            and all(b.in_flight == 0 for b in backends)
            and all(b.breaker.trials_in_flight == 0 for b in backends)
        )

    assert wait_for(settled, WAIT), {
        "requests_in_flight": app.budget.requests_in_flight,
        "retries_in_flight": app.budget.retries_in_flight,
        "in_flight": {b.name: b.in_flight for b in backends},
        "trials": {b.name: b.breaker.trials_in_flight for b in backends},
    }
    assert metric(service, "proxy_in_flight_requests") == 0
    for facts in admin_backends(service).values():
        assert facts["in_flight"] == 0


# -- a head the server refuses ------------------------------------------------------------


def test_a_refused_response_head_is_a_502_and_frees_the_backend(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend's head made waitress's start_response raise: the client got a 500,
    the backend's slot was never given back, and with max_connections: 1 the
    backend was out of service until a restart."""
    config = BackendConfig(url=echo_backend.url, name=echo_backend.name, max_connections=1)
    service = make_proxy([config])
    refusing_start_response(service, AssertionError('"Trailers" is a "hop-by-hop" header'))
    with caplog.at_level(logging.INFO):
        reply = requests.get(service.proxy_url + "/", timeout=WAIT)
    assert reply.status_code == 502
    assert reply.text == "502 Bad Gateway: invalid response head from backend\n"
    assert reply.headers["X-Request-ID"]
    assert_all_given_back(service)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # an expected case
    assert metric(service, "proxy_errors_total", backend="echo", reason="bad_response") == 1
    again = requests.get(service.proxy_url + "/", timeout=WAIT)  # the slot is free again
    assert again.status_code == 200 and again.json()["target"] == "/"


def test_a_content_length_list_never_costs_the_backend_its_slot(
    make_proxy: ProxyFactory, make_scripted_backend: Callable[..., ScriptedBackend]
) -> None:
    """`Content-Length: 2, 2` passed pyproxy's check but not waitress's start_response
    (int("2, 2")): two such answers took a max_connections: 2 backend out for good.
    Whether the head is made valid or answered 502, the slot comes back."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"
    backend = make_scripted_backend({}, default=[send(head)], name="listy")
    service = make_proxy([BackendConfig(url=backend.url, name="listy", max_connections=2)])
    for _ in range(4):
        reply = requests.get(service.proxy_url + "/", timeout=WAIT)
        assert reply.status_code in (200, 502), reply.text
        assert_all_given_back(service)


# -- an exception at every step ----------------------------------------------------------

# (name, owner, attribute, once per attempt): where the request path is broken.
STEPS: list[tuple[str, Any, str, bool]] = [
    ("selection", Pool, "candidates", True),
    ("breaker admission", CircuitBreaker, "try_acquire", True),
    ("rate token", BackendLimiter, "take", True),
    ("upstream send", None, "send", True),  # None: the app's injected send (below)
    ("response check", upstream, "check", True),
    ("breaker verdict", CircuitBreaker, "record_failure", True),
    ("lease verdict", BackendLease, "judge", True),
    ("response headers", relay_module, "downstream_response_headers", False),
    ("metrics", Metrics, "observe_request", False),
    ("relay iteration", upstream.BodyRelay, "__iter__", False),
    ("relay close", upstream.BodyRelay, "close", False),
]


@pytest.fixture
def half_open_pair(
    make_echo_backend: Callable[[str], EchoBackend],
) -> Iterator[tuple[Service, FakeClock]]:
    """A pyproxy on a fake clock over two echo backends whose circuits are half-open
    with one trial slot, retries and a per-backend rate limit on."""
    clock = FakeClock()
    backends = [make_echo_backend(name) for name in ("a", "b")]
    config = base_config(
        backends,
        circuit_breaker=CircuitBreakerConfig(
            failure_threshold=1, open_duration=OPEN_FOR, half_open_requests=1
        ),
        retries=RetryConfig(max_retries=2),
        rate_limit=RateLimitConfig(per_backend=Rate(100_000, 1.0)),
        # No total deadline: the header watchdog (connection.py) reads the real
        # monotonic clock, and a deadline on the fake one would be long past.
        timeouts=Timeouts(connect=1.0, read=5.0, total=0.0),
    )
    service = Service(
        config, registry=CollectorRegistry(), access_log_stream=io.StringIO(), clock=clock
    )
    service.start()
    try:
        for backend in service.holder.runtime.backends:
            backend.breaker.record_failure()
        clock.advance(OPEN_FOR)
        assert all(
            b.breaker.state is CircuitState.HALF_OPEN for b in service.holder.runtime.backends
        )
        yield service, clock
    finally:
        service.close()


def plant(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, on_call: int) -> list[int]:
    """Make `owner.name` raise Injected on its `on_call`-th call; returns the call count."""
    original = getattr(owner, name)
    calls = [0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == on_call:
            raise Injected(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, broken)
    return calls


@pytest.mark.parametrize("retried", [False, True], ids=["first-attempt", "after-a-retry"])
@pytest.mark.parametrize(
    ("step", "owner", "attribute", "per_attempt"), STEPS, ids=[s[0] for s in STEPS]
)
def test_an_exception_at_any_step_gives_everything_back(
    half_open_pair: tuple[Service, FakeClock],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    owner: Any,
    attribute: str,
    per_attempt: bool,
    retried: bool,
) -> None:
    """After a retry, the first backend answered 503 (a failure: its circuit opens
    again) and the request holds a retry token when the step breaks."""
    service, _ = half_open_pair
    path = "/status/503" if retried else "/"
    on_call = 2 if retried and per_attempt else 1
    if step == "breaker verdict" and not retried:
        attribute = "record_success"  # a 200's verdict
    if owner is None:
        # The exchange with a backend is a seam of the running app (AttemptContext.send),
        # bound when the app was built: plant the break there.
        context = service.app.context
        seam = types.SimpleNamespace(send=context.send)
        calls = plant(monkeypatch, seam, attribute, on_call)
        monkeypatch.setattr(service.app, "context", dataclasses.replace(context, send=seam.send))
    else:
        calls = plant(monkeypatch, owner, attribute, on_call)
    with contextlib.suppress(requests.RequestException):  # a break mid-body cuts the connection
        requests.get(service.proxy_url + path, timeout=WAIT)
    # (the relay is closed after its last byte went out: wait for that step too)
    assert wait_for(lambda: calls[0] >= on_call, WAIT), f"{step} was never reached"
    assert_all_given_back(service)


@pytest.mark.parametrize("retried", [False, True], ids=["first-attempt", "after-a-retry"])
def test_an_unexpected_start_response_error_gives_everything_back(
    half_open_pair: tuple[Service, FakeClock], retried: bool
) -> None:
    service, _ = half_open_pair
    refusing_start_response(service, Injected("start_response"), "503" if retried else "200")
    reply = requests.get(service.proxy_url + ("/status/503" if retried else "/"), timeout=WAIT)
    assert reply.status_code == 500  # a bug of the server's: waitress answers it
    assert_all_given_back(service)
