"""A backend is judged only on its own behaviour.

A failure caused by the request itself, or by pyproxy, before a byte reached the
backend never counts against it: no breaker failure, no failures_total, no retry.
And a backend that dies costs the clients nothing when a retry can hide it: a retry
after a connection refused sent nothing, so the retry budget never refuses it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests
from backends import EchoBackend, wait_for
from conftest import ProxyFactory, admin_backends, base_config, metric
from rawhttp import exchange
from test_resilience import WAIT, dead

from pyproxy.config.schema import (
    ChaosConfig,
    CircuitBreakerConfig,
    HealthCheckConfig,
    RetryConfig,
    Timeouts,
)
from pyproxy.observe.metrics import Metrics
from pyproxy.policy.retry import MIN_RETRY_BUDGET, RetryBudget
from pyproxy.process.service import Service
from pyproxy.proxy.admission import Admission
from pyproxy.proxy.attempt import AttemptContext, try_backend
from pyproxy.proxy.request import Request
from pyproxy.runtime.snapshot import Runtime, build_runtime

TOUCHY = CircuitBreakerConfig(failure_threshold=1)  # one failure opens a circuit


def assert_uncharged(service: Service, backends: list[EchoBackend]) -> None:
    """Nothing reached the backends, and nothing was held against them."""
    assert all(backend.requests() == [] for backend in backends)
    for name, facts in admin_backends(service).items():
        assert (facts["circuit"], facts["failures_total"], facts["in_flight"]) == (
            "closed", 0, 0,
        ), name  # fmt: skip
        assert metric(service, "proxy_retries_total", backend=name) == 0


# -- requests http.client refuses to write ----------------------------------------------


def test_a_target_http_client_refuses_is_a_400_that_opens_no_circuit(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend]
) -> None:
    """A DEL in the target passed the edge, http.client refused it in putrequest
    (InvalidURL), and pyproxy took that for a backend failure and retried it on every
    backend: with failure_threshold 1, one request opened every circuit. (The edge
    may refuse such a target itself; either way it is a 400 and no backend is hurt.)"""
    service = make_proxy(three_backends, circuit_breaker=TOUCHY, retries=RetryConfig())
    for _ in range(5):
        reply = exchange(service.proxy_url, b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.status == 400
        assert reply.body.startswith(b"400 Bad Request: ")
    assert_uncharged(service, three_backends)
    assert requests.get(service.proxy_url + "/", timeout=WAIT).status_code == 200


@dataclass
class Lone:
    """One attempt's context on a real Backend object before a real echo server (no proxy)."""

    runtime: Runtime
    budget: RetryBudget
    context: AttemptContext
    admission: Admission


@pytest.fixture
def lone(echo_backend: EchoBackend) -> Iterator[Lone]:
    runtime, _ = build_runtime(base_config([echo_backend], circuit_breaker=TOUCHY))
    budget, metrics = RetryBudget(), Metrics()
    context = AttemptContext(clock=lambda: 0.0, rng=random.Random(1), sleep=lambda _: None)
    setup = Lone(runtime, budget, context, Admission(budget, metrics))
    try:
        yield setup
    finally:
        setup.admission.close()
        for backend in runtime.backends:
            backend.close()


def request_for(target: str) -> Request:
    return Request(
        method="GET", target=target, host="x", peer="127.0.0.1", client="127.0.0.1",
        scheme="http", headers=[], body=None, body_length=None, replayable=True,
        request_id="r", via=None, started=0.0,
    )  # fmt: skip


UNWRITABLE = [
    # (target, a header, status): what http.client refuses while building a request
    ("/a\x7fb", None, 400),  # putrequest: InvalidURL (a DEL)
    ("/a\x01b", None, 400),  # putrequest: InvalidURL (a control byte)
    ("/caf\xe9", None, 400),  # putrequest: the request line is ASCII
    ("/", ("X-Odd", "a\rb"), 400),  # putheader: a bare CR in a value
    ("/", ("X:Odd", "a"), 400),  # putheader: a colon in a name
    ("/", ("X-Euro", "\u20ac"), 400),  # putheader: values are latin-1
    ("/", ("X-None", None), 500),  # putheader: pyproxy's own bug, not the request's
]


@pytest.mark.parametrize(("target", "header", "status"), UNWRITABLE)
def test_a_request_the_connection_cannot_build_is_not_the_backends_failure(
    lone: Lone,
    echo_backend: EchoBackend,
    target: str,
    header: tuple[str, str | None] | None,
    status: int,
) -> None:
    """try_backend itself, for requests the edge may one day refuse before the app."""
    admission, budget, context, runtime = lone.admission, lone.budget, lone.context, lone.runtime
    backend = runtime.backends[0]
    lease = admission.admit(backend, None)
    assert lease is not None
    headers: dict[str, str] = {"Host": "x"}
    if header is not None:
        headers[header[0]] = header[1]  # type: ignore[assignment]
    response, failure = try_backend(context, runtime, lease, request_for(target), headers, None)
    assert response is None and failure is not None
    assert (failure.status, failure.backend_at_fault, failure.request_sent) == (
        status,
        False,
        False,
    )
    admission.end_attempt()
    assert (backend.in_flight, backend.failures_total) == (0, 0)
    assert backend.breaker.consecutive_failures == 0
    assert echo_backend.requests() == []
    # The half-built connection was thrown away, not left in the pool for the next one.
    lease = admission.admit(backend, None)
    assert lease is not None
    ok = request_for("/ok")
    response, failure = try_backend(context, runtime, lease, ok, {"Host": "x"}, None)
    assert failure is None and response is not None and response.status == 200
    admission.close()
    assert [r.target for r in echo_backend.requests()] == ["/ok"]
    assert budget.requests_in_flight == 0 and backend.in_flight == 0


# -- the deadline is nobody's failure but its own ---------------------------------------------


def test_a_deadline_that_ran_out_before_sending_is_not_held_against_the_backend(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    """Injected latency used up the total deadline before the attempt: a 504, and the
    backend was never contacted, so its failures_total stays 0."""
    service = make_proxy(
        [echo_backend],
        circuit_breaker=TOUCHY,
        chaos=ChaosConfig(latency=30.0, latency_rate=1.0),
        timeouts=Timeouts(connect=1.0, read=2.0, total=0.3),
    )
    reply = requests.get(service.proxy_url + "/", timeout=WAIT)
    assert reply.status_code == 504
    assert_uncharged(service, [echo_backend])


# -- a dead backend costs no GET ------------------------------------------------------


def test_a_retry_after_a_refused_connection_is_never_refused_by_the_budget(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    """The retry budget's floor was taken (other requests retrying at that moment)
    when a GET met a refused connection: it got 502 "retry budget spent", though its
    retry would have been the first time the request reached any backend."""
    service = make_proxy([dead(), echo_backend], retries=RetryConfig())
    budget = service.app.budget
    for _ in range(MIN_RETRY_BUDGET):  # the floor, taken by retries elsewhere
        assert budget.try_start_retry(20.0)
    try:
        replies = [requests.get(service.proxy_url + "/", timeout=WAIT) for _ in range(4)]
    finally:
        for _ in range(MIN_RETRY_BUDGET):
            budget.retry_finished()
    assert [r.status_code for r in replies] == [200] * 4
    assert metric(service, "proxy_retries_total", backend="dead") >= 1  # it was retried
    # A retry of a request that was sent still needs a token.
    assert budget.retries_in_flight == 0


BACKEND = r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class ProcessBackend:
    """An HTTP backend in its own process, so that it can die of SIGKILL."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.process.stdout.readline())}"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WAIT)


@pytest.fixture
def process_backends() -> Iterator[Callable[[str], ProcessBackend]]:
    started: list[ProcessBackend] = []

    def start(name: str) -> ProcessBackend:
        started.append(ProcessBackend(name))
        return started[-1]

    yield start
    for backend in started:
        backend.kill()


def test_killing_one_of_three_backends_under_get_load_costs_no_request(
    make_proxy: ProxyFactory, process_backends: Callable[[str], ProcessBackend]
) -> None:
    """The default settings (health checks, breaker, retries, budget), concurrent GETs,
    one backend SIGKILLed mid-run: every client gets its 200."""
    backends = [process_backends(f"app{i}") for i in (1, 2, 3)]
    service = make_proxy(
        backends,
        health_check=HealthCheckConfig(path="/"),
        circuit_breaker=CircuitBreakerConfig(),
        retries=RetryConfig(),
        timeouts=Timeouts(),
    )
    done, failures = [0], []
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            session.trust_env = False
            for _ in range(150):  # bounded in count; each request bounded in time
                try:
                    reply = session.get(service.proxy_url + "/", timeout=WAIT)
                    failure = (
                        None if reply.status_code == 200 else f"{reply.status_code} {reply.text}"
                    )
                except requests.RequestException as exc:
                    failure = repr(exc)
                with lock:
                    done[0] += 1
                    if failure:
                        failures.append(failure)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: done[0] >= 150, 60)
    backends[1].kill()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()
    assert done[0] == 900
    assert failures == []
    assert admin_backends(service)["app2"]["failures_total"] >= 1  # it was seen to die
