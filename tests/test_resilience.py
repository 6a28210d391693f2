"""Resilience through real sockets: retries, the circuit breaker, the retry budget and
sticky sessions, judged by which backend received how many requests.

Fixture backends refuse, reset, hang, answer 503 or flip while a test runs. Counts
are taken at the backends (what crossed the wire), and cross-checked with
/admin/backends and /metrics, which an operator reads. Waits are polls with a bound
(`wait_for`), never blind sleeps; timeouts are short so the file stays quick.

`ControlledBackend` and `Gate` below are also used by test_health_checks.py and
test_max_connections.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from typing import Any

import pytest
import requests
from backends import (
    CLOSE,
    HANG,
    KEEP,
    RESET,
    Blackhole,
    EchoBackend,
    ScriptedBackend,
    closed_port,
    response,
    send,
    trickle,
    wait_for,
)
from backends import sleep as sleep_step
from conftest import ProxyFactory, admin_backends, metric
from conftest import backend_config as cfg

from pyproxy.config.schema import (
    Address,
    AdminConfig,
    BackendConfig,
    CircuitBreakerConfig,
    HealthCheckConfig,
    RetryConfig,
    StickyConfig,
    Timeouts,
)
from pyproxy.process.service import Service

WAIT = 10.0  # bound on every wait for the system under test
TOKEN = "resilience-token"
ADMIN = AdminConfig(listen=Address("127.0.0.1", 0), token=TOKEN)
QUICK = Timeouts(connect=0.5, read=0.5, total=5.0)

# -- a backend the test steers --------------------------------------------------------


class Gate:
    """Holds requests at the backends that share it until the test lets them pass.

    Arrivals are numbered; arrival n passes once `allow(k)` was called with k >= n.
    A new Gate lets everything through.
    """

    def __init__(self, allowed: float = math.inf) -> None:
        self._cond = threading.Condition()
        self.arrived = 0
        self.allowed = allowed

    def pass_through(self) -> None:
        with self._cond:
            self.arrived += 1
            number = self.arrived
            self._cond.notify_all()
            self._cond.wait_for(lambda: number <= self.allowed, WAIT)

    def allow(self, count: float) -> None:
        with self._cond:
            self.allowed = count
            self._cond.notify_all()

    def wait_arrived(self, count: int, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.arrived >= count, timeout)


@dataclass
class Seen:
    """One request as a ControlledBackend read it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when it was read

    def header_names(self) -> set[str]:
        return {name.lower() for name, _ in self.headers}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ControlledServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.backend._connected()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self.respond
        raise AttributeError(name)

    def respond(self) -> None:
        backend = self.server.backend
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = Seen(self.command, self.path, list(self.headers.raw_items()), body)
        backend._record(seen)
        if self.path.split("?")[0] == backend.health_path:
            backend.health_gate.wait(WAIT)
            status = backend.health_status
        else:
            if backend.gate is not None:
                backend.gate.pass_through()
            if backend.delay:
                time.sleep(backend.delay)
            status = backend.status
        payload = f"{status} from {backend.name}\n".encode()
        try:
            self.send_response(status)
            self.send_header("X-Backend", backend.name)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the proxy gave up on this answer (a timeout)


class _ControlledServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: ControlledBackend


class ControlledBackend:
    """An origin whose behaviour a test changes while it runs.

    `status` answers every path but `health_path` (default /health), which answers
    `health_status`. `delay` is slept before answering; `gate` (a Gate) can hold
    requests; `health_gate` (an Event, set) can hold probes. Every request read is
    recorded; `traffic()` is the non-probe part.
    """

    def __init__(self, name: str, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.health_status = 200
        self.health_path = "/health"
        self.health_gate = threading.Event()
        self.health_gate.set()
        self.delay = 0.0
        self.gate: Gate | None = None
        self.connections = 0
        self._seen: list[Seen] = []
        self._lock = threading.Lock()  # guards _seen and connections
        self.server = _ControlledServer(("127.0.0.1", 0), _Handler)
        self.server.backend = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"test-controlled-{name}",
            daemon=True,
        )
        self._thread.start()

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def traffic(self) -> list[Seen]:
        return [s for s in self.seen() if s.path.split("?")[0] != self.health_path]

    def probes(self) -> list[Seen]:
        return [s for s in self.seen() if s.path.split("?")[0] == self.health_path]

    def close(self) -> None:
        self.health_gate.set()
        if self.gate is not None:
            self.gate.allow(math.inf)
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def controlled_backends() -> Iterator[Callable[..., ControlledBackend]]:
    """A factory of ControlledBackends, all closed on exit (for the fixtures)."""
    started: list[ControlledBackend] = []

    def start(name: str, status: int = 200) -> ControlledBackend:
        backend = ControlledBackend(name, status)
        started.append(backend)
        return backend

    try:
        yield start
    finally:
        for backend in started:
            backend.close()


@pytest.fixture
def controlled() -> Iterator[Callable[..., ControlledBackend]]:
    with controlled_backends() as start:
        yield start


@pytest.fixture
def scripted(
    make_scripted_backend: Callable[..., ScriptedBackend],
) -> Callable[..., ScriptedBackend]:
    """A ScriptedBackend that does `steps` for every request."""

    def start(name: str, steps: list[Any]) -> ScriptedBackend:
        return make_scripted_backend({}, default=steps, name=name)

    return start


def answer_503(name: str) -> list[Any]:
    return [send(response(503, f"busy from {name}\n".encode(), [("X-Backend", name)])), KEEP]


def dead(name: str = "dead") -> BackendConfig:
    """A backend nothing listens on: every connect is refused."""
    return BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name=name)


# -- what an operator sees --------------------------------------------------------------


def get(service: Service, path: str = "/", **kw: Any) -> requests.Response:
    return requests.get(service.proxy_url + path, timeout=WAIT, **kw)


def post(service: Service, body: bytes, path: str = "/submit") -> requests.Response:
    return requests.post(service.proxy_url + path, data=body, timeout=WAIT)


# -- retries ------------------------------------------------------------------------------


def test_with_retries_every_get_survives_a_refusing_backend(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    good = make_echo_backend("good")
    proxy = make_proxy([dead(), good], retries=RetryConfig(max_retries=2))
    for _ in range(10):
        reply = get(proxy, "/x")
        assert reply.status_code == 200
        assert reply.headers["X-Backend"] == "good"
    assert len(good.requests()) == 10  # each request reached the good backend exactly once
    refused = metric(proxy, "proxy_errors_total", backend="dead", reason="connect_error")
    assert 1 <= refused <= 10
    assert metric(proxy, "proxy_retries_total", backend="dead") == refused
    assert metric(proxy, "proxy_retries_total", backend="good") == 0


def test_round_robin_takes_turns_even_when_one_backend_is_dead(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    """In turn means the dead backend is the first pick of every other request, not of
    every request: the retry to the good one must not use up the good one's turn."""
    good = make_echo_backend("good")
    proxy = make_proxy([dead(), good], retries=RetryConfig(max_retries=2))
    for _ in range(10):
        assert get(proxy).status_code == 200
    assert metric(proxy, "proxy_errors_total", backend="dead", reason="connect_error") <= 6


def test_a_hanging_backend_answers_504_after_the_read_timeout(
    make_proxy: ProxyFactory, scripted: Callable[..., ScriptedBackend]
) -> None:
    hang = scripted("hang", [HANG])
    proxy = make_proxy([cfg(hang)], timeouts=QUICK)
    started = time.monotonic()
    reply = get(proxy)
    elapsed = time.monotonic() - started
    assert reply.status_code == 504
    assert reply.text.startswith("504 Gateway Timeout: ")
    assert 0.45 <= elapsed < 2.0
    assert metric(proxy, "proxy_errors_total", backend="hang", reason="timeout") == 1


def test_a_get_to_a_hanging_backend_is_retried_on_another(
    make_proxy: ProxyFactory,
    scripted: Callable[..., ScriptedBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    hang, good = scripted("hang", [HANG]), make_echo_backend("good")
    proxy = make_proxy([cfg(hang), good], timeouts=QUICK, retries=RetryConfig())
    reply = get(proxy)  # round robin's first pick is the first backend: the hanging one
    assert reply.status_code == 200 and reply.headers["X-Backend"] == "good"
    assert len(hang.requests()) == 1 and len(good.requests()) == 1
    assert metric(proxy, "proxy_retries_total", backend="hang") == 1


FAILURES_AFTER_SENDING = {
    "reset": ([RESET], 502),
    "timeout": ([HANG], 504),
    "503": (answer_503("bad"), 503),
}


@pytest.mark.parametrize("kind", FAILURES_AFTER_SENDING)
def test_a_post_that_reached_a_backend_is_never_sent_twice(
    make_proxy: ProxyFactory,
    scripted: Callable[..., ScriptedBackend],
    make_echo_backend: Callable[[str], EchoBackend],
    kind: str,
) -> None:
    steps, status = FAILURES_AFTER_SENDING[kind]
    bad, good = scripted("bad", steps), make_echo_backend("good")
    proxy = make_proxy([cfg(bad), good], timeouts=QUICK, retries=RetryConfig(max_retries=3))
    reply = post(proxy, b"order=42")  # first pick: the failing backend
    assert reply.status_code == status
    assert [r.request_line for r in bad.requests()] == ["POST /submit HTTP/1.1"]
    assert good.requests() == []  # never sent a second time, anywhere
    assert metric(proxy, "proxy_retries_total", backend="bad") == 0


@pytest.mark.parametrize("kind", FAILURES_AFTER_SENDING)
def test_the_same_failures_are_retried_for_a_get(
    make_proxy: ProxyFactory,
    scripted: Callable[..., ScriptedBackend],
    make_echo_backend: Callable[[str], EchoBackend],
    kind: str,
) -> None:
    """The control for the test above: its setup does retry when the method allows."""
    steps, _ = FAILURES_AFTER_SENDING[kind]
    bad, good = scripted("bad", steps), make_echo_backend("good")
    proxy = make_proxy([cfg(bad), good], timeouts=QUICK, retries=RetryConfig(max_retries=3))
    reply = get(proxy, "/submit")
    assert reply.status_code == 200 and reply.headers["X-Backend"] == "good"
    assert len(bad.requests()) == 1 and len(good.requests()) == 1


def test_idempotent_only_false_lets_a_post_be_retried(
    make_proxy: ProxyFactory,
    scripted: Callable[..., ScriptedBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    bad, good = scripted("bad", [RESET]), make_echo_backend("good")
    retries = RetryConfig(idempotent_only=False)
    proxy = make_proxy([cfg(bad), good], timeouts=QUICK, retries=retries)
    reply = post(proxy, b"order=42")
    assert reply.status_code == 200
    assert len(bad.requests()) == 1
    assert [r.body for r in good.requests()] == [b"order=42"]


@pytest.mark.parametrize("kind", ["refused", "connect-timeout"])
def test_a_post_that_never_left_is_retried(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    blackhole: Blackhole,
    kind: str,
) -> None:
    """Nothing reached the first backend, so sending the POST elsewhere is safe."""
    good = make_echo_backend("good")
    first = dead("unreachable") if kind == "refused" else cfg(blackhole)
    proxy = make_proxy([first, good], timeouts=QUICK, retries=RetryConfig())
    reply = post(proxy, b"order=42")
    assert reply.status_code == 200 and reply.headers["X-Backend"] == "good"
    assert [r.body for r in good.requests()] == [b"order=42"]
    assert metric(proxy, "proxy_retries_total", backend="unreachable") == 1


def test_a_connect_timeout_that_is_the_final_outcome_answers_504(
    make_proxy: ProxyFactory, blackhole: Blackhole
) -> None:
    proxy = make_proxy([cfg(blackhole)], timeouts=QUICK)
    reply = post(proxy, b"x")
    assert reply.status_code == 504
    assert metric(proxy, "proxy_errors_total", backend="unreachable", reason="connect_error") == 1


def test_a_body_too_large_to_replay_is_not_retried(
    make_proxy: ProxyFactory,
    scripted: Callable[..., ScriptedBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    bad, good = scripted("bad", answer_503("bad")), make_echo_backend("good")
    proxy = make_proxy([cfg(bad), good], retries=RetryConfig(max_body=1024))
    reply = requests.put(proxy.proxy_url + "/doc", data=b"x" * 2048, timeout=WAIT)
    assert reply.status_code == 503 and reply.text == "busy from bad\n"
    assert good.requests() == []
    small = requests.put(proxy.proxy_url + "/doc", data=b"x" * 1024, timeout=WAIT)
    assert small.status_code == 200  # at max_body it is buffered, so it can be replayed


def test_when_retries_run_out_the_client_gets_the_backends_own_answer(
    make_proxy: ProxyFactory, scripted: Callable[..., ScriptedBackend]
) -> None:
    """The last attempt's HTTP response goes to the client as it is (its body and
    headers), not a pyproxy error page and not a Retry-After pyproxy invented, as nginx
    does when proxy_next_upstream runs out of tries (see docs/retries.md)."""
    backends = [scripted(f"b{i}", answer_503(f"b{i}")) for i in (1, 2, 3)]
    proxy = make_proxy([cfg(b) for b in backends], retries=RetryConfig(max_retries=2))
    reply = get(proxy)
    assert reply.status_code == 503
    assert re.fullmatch(r"busy from b[123]\n", reply.text)
    assert reply.headers["X-Backend"] == reply.text.split()[-1]
    assert "Retry-After" not in reply.headers
    assert [len(b.requests()) for b in backends] == [1, 1, 1]  # each once: 1 + 2 retries
    assert metric(proxy, "proxy_errors_total", backend="b1", reason="upstream_status") == 1


def test_retries_outnumbering_the_backends_still_relay_the_backends_answer(
    make_proxy: ProxyFactory, scripted: Callable[..., ScriptedBackend]
) -> None:
    backends = [scripted(f"b{i}", answer_503(f"b{i}")) for i in (1, 2)]
    proxy = make_proxy([cfg(b) for b in backends], retries=RetryConfig(max_retries=2))
    reply = get(proxy)
    assert reply.status_code == 503 and re.fullmatch(r"busy from b[12]\n", reply.text)
    attempts = sorted(len(b.requests()) for b in backends)
    assert sum(attempts) <= 3 and attempts[0] >= 1  # both tried before one is tried again


def test_the_total_deadline_caps_retries(
    make_proxy: ProxyFactory, scripted: Callable[..., ScriptedBackend]
) -> None:
    hangs = [scripted(f"h{i}", [HANG]) for i in (1, 2, 3)]
    proxy = make_proxy(
        [cfg(h) for h in hangs],
        timeouts=Timeouts(connect=0.5, read=1.0, total=1.5),
        retries=RetryConfig(max_retries=5),
    )
    started = time.monotonic()
    reply = get(proxy)
    elapsed = time.monotonic() - started
    assert reply.status_code == 504
    assert 1.4 <= elapsed < 2.5  # not 3 x 1.0 s: the second attempt got only what was left
    assert sum(len(h.requests()) for h in hangs) == 2


def test_a_backend_trickling_its_headers_is_cut_off_at_the_total_deadline(
    make_proxy: ProxyFactory, scripted: Callable[..., ScriptedBackend]
) -> None:
    """Each byte comes well within the read timeout, so only the deadline can end it
    (requests' read timeout is per socket read, not a deadline: requests docs, "Timeouts")."""
    slow = scripted("slow", [trickle(response(200, b"late"), 0.1)])  # ~4 s in all
    proxy = make_proxy([cfg(slow)], timeouts=Timeouts(connect=0.5, read=0.5, total=1.0))
    started = time.monotonic()
    reply = get(proxy)
    assert reply.status_code == 504
    assert time.monotonic() - started < 2.0
    assert metric(proxy, "proxy_errors_total", backend="slow", reason="deadline_exceeded") == 1


def test_headers_just_before_the_deadline_never_become_a_cut_short_200(
    make_proxy: ProxyFactory,
    scripted: Callable[..., ScriptedBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deadline watchdog may fire between the headers arriving and the worker
    unregistering the socket (a thread can be preempted there). The client must then
    get a clean 504, not a 200 whose body the watchdog cuts off."""
    late = scripted(
        "late",
        [sleep_step(0.3), send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"),
         sleep_step(0.3), send(b"body"), KEEP],
    )  # fmt: skip
    proxy = make_proxy([cfg(late)], timeouts=Timeouts(connect=0.5, read=1.0, total=0.4))
    watchdog = proxy.app.context.watchdog
    unwatch = watchdog.unwatch

    def preempted(token: int) -> bool:
        time.sleep(0.25)  # descheduled right after getresponse() returned, past the deadline
        return unwatch(token)

    monkeypatch.setattr(watchdog, "unwatch", preempted)
    reply = get(proxy)
    assert (reply.status_code, reply.content) in {
        (504, b"504 Gateway Timeout: total deadline reached\n"),
        (200, b"body"),
    }


def test_no_retry_once_the_response_has_started(
    make_proxy: ProxyFactory,
    scripted: Callable[..., ScriptedBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    cut = scripted("cut", [send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"), CLOSE])
    good = make_echo_backend("good")
    proxy = make_proxy([cfg(cut), good], retries=RetryConfig(max_retries=2))
    with pytest.raises(requests.exceptions.RequestException):
        get(proxy).content  # noqa: B018 (reading the body is the point)
    assert good.requests() == []
    assert metric(proxy, "proxy_retries_total", backend="cut") == 0


# -- the circuit breaker -------------------------------------------------------------------


def send_until(service: Service, done: Callable[[], bool], limit: int = 20) -> int:
    """GET until `done()` holds; how many were sent. Fails after `limit`."""
    for sent in range(1, limit + 1):
        get(service)
        if done():
            return sent
    raise AssertionError(f"condition not reached after {limit} requests")


def breaker_config(**kw: Any) -> CircuitBreakerConfig:
    return CircuitBreakerConfig(**{"failure_threshold": 3, "open_duration": 30.0, **kw})


def test_the_circuit_opens_after_failure_threshold_failures_and_stops_traffic(
    make_proxy: ProxyFactory,
    controlled: Callable[..., ControlledBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    flaky, good = controlled("flaky", status=503), make_echo_backend("good")
    proxy = make_proxy([cfg(flaky), good], circuit_breaker=breaker_config())
    assert metric(proxy, "proxy_circuit_state", backend="flaky") == 0
    send_until(proxy, lambda: len(flaky.traffic()) == 3)
    assert metric(proxy, "proxy_circuit_state", backend="flaky") == 2
    assert metric(proxy, "proxy_circuit_opens_total", backend="flaky") == 1
    facts = admin_backends(proxy)["flaky"]
    assert (facts["circuit"], facts["available"], facts["healthy"]) == ("open", False, True)
    assert admin_backends(proxy)["good"]["available"] is True
    before = len(good.requests())
    for _ in range(8):
        assert get(proxy).headers["X-Backend"] == "good"
    assert len(flaky.traffic()) == 3  # nothing reached it while open
    assert len(good.requests()) == before + 8


def test_connect_errors_open_the_circuit_too(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    good = make_echo_backend("good")
    proxy = make_proxy(
        [dead(), good], circuit_breaker=breaker_config(), retries=RetryConfig(max_retries=1)
    )
    for _ in range(12):
        assert get(proxy).status_code == 200
    assert metric(proxy, "proxy_errors_total", backend="dead", reason="connect_error") == 3
    assert admin_backends(proxy)["dead"]["circuit"] == "open"


def open_then_wait_half_open(proxy: Service, flaky: ControlledBackend, threshold: int) -> None:
    send_until(proxy, lambda: admin_backends(proxy)["flaky"]["circuit"] == "open")
    assert len(flaky.traffic()) == threshold
    assert wait_for(lambda: admin_backends(proxy)["flaky"]["circuit"] == "half_open", WAIT, 0.05)
    assert metric(proxy, "proxy_circuit_state", backend="flaky") == 1


def test_after_the_open_period_one_trial_goes_through_and_its_success_closes(
    make_proxy: ProxyFactory,
    controlled: Callable[..., ControlledBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    flaky, good = controlled("flaky", status=503), make_echo_backend("good")
    proxy = make_proxy(
        [cfg(flaky), good], circuit_breaker=breaker_config(failure_threshold=2, open_duration=0.3)
    )
    open_then_wait_half_open(proxy, flaky, 2)
    flaky.status = 200
    send_until(proxy, lambda: len(flaky.traffic()) == 3)  # the trial
    facts = admin_backends(proxy)["flaky"]
    assert (facts["circuit"], facts["available"]) == ("closed", True)
    assert metric(proxy, "proxy_circuit_state", backend="flaky") == 0
    assert metric(proxy, "proxy_circuit_opens_total", backend="flaky") == 1
    for _ in range(4):
        get(proxy)
    assert len(flaky.traffic()) == 5  # back in the rotation


def test_a_failed_trial_reopens_for_twice_as_long(
    make_proxy: ProxyFactory,
    controlled: Callable[..., ControlledBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    flaky, good = controlled("flaky", status=503), make_echo_backend("good")
    proxy = make_proxy(
        [cfg(flaky), good],
        circuit_breaker=breaker_config(failure_threshold=2, open_duration=0.3),
    )
    open_then_wait_half_open(proxy, flaky, 2)
    send_until(proxy, lambda: len(flaky.traffic()) == 3)  # the trial fails
    reopened_at = time.monotonic()
    assert admin_backends(proxy)["flaky"]["circuit"] == "open"
    assert metric(proxy, "proxy_circuit_opens_total", backend="flaky") == 2
    assert wait_for(lambda: admin_backends(proxy)["flaky"]["circuit"] == "half_open", WAIT, 0.02)
    assert time.monotonic() - reopened_at >= 0.55  # 0.6 s, not 0.3 s


def test_half_open_lets_through_only_half_open_requests_trials(
    make_proxy: ProxyFactory,
    controlled: Callable[..., ControlledBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    flaky, good = controlled("flaky", status=503), make_echo_backend("good")
    breaker = breaker_config(failure_threshold=2, open_duration=0.3, half_open_requests=2)
    proxy = make_proxy([cfg(flaky), good], circuit_breaker=breaker)
    open_then_wait_half_open(proxy, flaky, 2)
    flaky.status, flaky.gate = 200, Gate(allowed=0)  # trials are held at the backend
    with ThreadPoolExecutor(8) as pool:
        replies = [pool.submit(get, proxy) for _ in range(8)]
        assert flaky.gate.wait_arrived(2)
        assert wait_for(lambda: sum(r.done() for r in replies) == 6, WAIT)
        assert len(flaky.traffic()) == 4  # 2 before opening + exactly 2 trials
        flaky.gate.allow(math.inf)
        backends = sorted(r.result(timeout=WAIT).headers["X-Backend"] for r in replies)
    assert backends == ["flaky"] * 2 + ["good"] * 6
    assert admin_backends(proxy)["flaky"]["circuit"] == "closed"


def test_with_every_circuit_open_the_client_gets_503_without_an_attempt(
    make_proxy: ProxyFactory, controlled: Callable[..., ControlledBackend]
) -> None:
    flaky = controlled("flaky", status=503)
    proxy = make_proxy([cfg(flaky)], circuit_breaker=breaker_config(failure_threshold=2))
    send_until(proxy, lambda: admin_backends(proxy)["flaky"]["circuit"] == "open")
    connections = flaky.connections
    reply = get(proxy)
    assert reply.status_code == 503
    assert reply.text == (
        "503 Service Unavailable: no backend available in pool default: flaky circuit open\n"
    )
    assert int(reply.headers["Retry-After"]) >= 1
    assert len(flaky.traffic()) == 2 and flaky.connections == connections
    assert requests.get(proxy.admin_url + "/readyz", timeout=WAIT).status_code == 503


def test_backoff_pauses_before_a_retry_but_not_past_the_deadline(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    good = make_echo_backend("good")
    proxy = make_proxy([dead(), good], retries=RetryConfig(backoff=0.4))
    started = time.monotonic()
    assert get(proxy).status_code == 200  # dead first, then good after the pause
    assert 0.19 <= time.monotonic() - started < 1.5  # 0.4 s jittered by 0.5x..1.5x
    slow = make_proxy(
        [dead(), good],
        retries=RetryConfig(backoff=30.0),
        timeouts=Timeouts(connect=0.5, read=0.5, total=0.6),
    )
    started = time.monotonic()
    assert get(slow).status_code == 504  # the pause used up the deadline
    assert time.monotonic() - started < 1.5


# -- the retry budget ------------------------------------------------------------------------


def test_the_retry_budget_stops_a_retry_storm(
    make_proxy: ProxyFactory, controlled: Callable[..., ControlledBackend]
) -> None:
    """8 requests at once against 3 failing backends, 2 retries each: without a budget
    that is 24 attempts. 20% of 8 in flight is below the floor of 3, so 3 requests may
    retry (twice each) and 5 may not: 8 + 3 x 2 = 14 attempts."""
    gate = Gate(allowed=0)
    backends = [controlled(f"b{i}", status=503) for i in (1, 2, 3)]
    for backend in backends:
        backend.gate = gate
    proxy = make_proxy([cfg(b) for b in backends], retries=RetryConfig(max_retries=2))
    with ThreadPoolExecutor(8) as pool:
        replies = [pool.submit(get, proxy) for _ in range(8)]
        assert gate.wait_arrived(8)  # every first attempt is at a backend, held
        gate.allow(8)  # they fail; 3 requests get a retry token, 5 give up
        assert gate.wait_arrived(11)
        assert wait_for(lambda: sum(r.done() for r in replies) == 5, WAIT)
        assert gate.arrived == 11  # the 5 without a token did not retry
        gate.allow(math.inf)
        statuses = [r.result(timeout=WAIT).status_code for r in replies]
    assert statuses == [503] * 8
    assert sum(len(b.traffic()) for b in backends) == 14
    assert sum(metric(proxy, "proxy_retries_total", backend=b.name) for b in backends) == 6


def test_long_responses_that_were_retried_do_not_use_up_the_budget(
    make_proxy: ProxyFactory,
    controlled: Callable[..., ControlledBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    """The budget limits retries *in flight*, i.e. attempts. A request whose retry got
    its answer and is now streaming a long body (server-sent events, a download) puts
    no more load on a failing pool and must not hold a budget place for hours."""
    flaky, good = controlled("flaky", status=503), make_echo_backend("good")
    proxy = make_proxy([cfg(flaky), good], retries=RetryConfig(max_retries=1))
    streams = []
    try:
        for _ in range(6):  # round robin: every other first pick is flaky, then a retry
            stream = requests.get(proxy.proxy_url + "/sse", stream=True, timeout=WAIT)
            assert stream.status_code == 200 and stream.headers.get("X-Backend") is None
            streams.append(stream)
        assert len(flaky.traffic()) == 3  # three of the six streams were retried
        reply = get(proxy, "/sse-less")  # first pick flaky again: a retry is needed
        assert reply.status_code == 200 and reply.headers["X-Backend"] == "good"
    finally:
        good.sse_continue.set()
        for stream in streams:
            stream.close()


# -- sticky sessions ---------------------------------------------------------------------------

COOKIE = re.compile(r"pyproxy_backend=([^;]+); Path=/; HttpOnly; SameSite=Lax")


def sticky_token(reply: requests.Response) -> str | None:
    """The sticky cookie's token if the response sets one (and checks its attributes)."""
    for value in reply.raw.headers.getlist("Set-Cookie"):
        if value.startswith("pyproxy_backend="):
            match = COOKIE.fullmatch(value)
            assert match, value
            return match.group(1)
    return None


def cookie_proxy(make_proxy: ProxyFactory, backends: list[Any], **kw: Any) -> Service:
    return make_proxy(backends, sticky=StickyConfig(mode="cookie"), admin=ADMIN, **kw)


def test_the_first_response_pins_the_client_with_an_opaque_cookie(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend]
) -> None:
    proxy = cookie_proxy(make_proxy, three_backends)
    first = get(proxy)
    token = sticky_token(first)
    assert token is not None
    for backend in three_backends:  # the cookie says nothing about where it points
        assert str(backend.port) not in token and "127.0.0.1" not in token
    pinned = first.headers["X-Backend"]
    for _ in range(6):
        again = get(proxy, headers={"Cookie": f"pyproxy_backend={token}"})
        assert again.headers["X-Backend"] == pinned
        assert sticky_token(again) is None  # a valid cookie is not set again
    unpinned = {get(proxy).headers["X-Backend"] for _ in range(6)}
    assert len(unpinned) == 3  # without the cookie, round robin as usual


def test_the_sticky_cookie_comes_alongside_the_backends_own(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = cookie_proxy(make_proxy, [echo_backend])
    reply = get(proxy, "/cookies")
    cookies = reply.raw.headers.getlist("Set-Cookie")
    assert len(cookies) == 4
    assert sticky_token(reply) is not None


@pytest.mark.parametrize(
    "value", ["deadbeef", "", "0" * 18, "../../etc/passwd", "x" * 500, "http://127.0.0.1:1"]
)
def test_a_tampered_cookie_is_ignored(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], value: str
) -> None:
    proxy = cookie_proxy(make_proxy, three_backends)
    reply = get(proxy, headers={"Cookie": f"pyproxy_backend={value}"})
    assert reply.status_code == 200
    token = sticky_token(reply)
    assert token is not None and token != value  # pinned afresh, with a genuine token
    again = get(proxy, headers={"Cookie": f"pyproxy_backend={token}"})
    assert again.headers["X-Backend"] == reply.headers["X-Backend"]


def test_a_client_is_re_pinned_when_its_backend_is_removed(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend]
) -> None:
    proxy = cookie_proxy(make_proxy, three_backends)
    first = get(proxy)
    token, pinned = sticky_token(first), first.headers["X-Backend"]
    removed = requests.post(
        proxy.admin_url + "/admin/remove-backend",
        data=json.dumps({"name": pinned}),
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=WAIT,
    )
    assert removed.status_code == 200
    moved = get(proxy, headers={"Cookie": f"pyproxy_backend={token}"})
    assert moved.status_code == 200 and moved.headers["X-Backend"] != pinned
    new_token = sticky_token(moved)
    assert new_token is not None and new_token != token
    for _ in range(4):
        again = get(proxy, headers={"Cookie": f"pyproxy_backend={new_token}"})
        assert again.headers["X-Backend"] == moved.headers["X-Backend"]
    by_name = {b.name: b for b in three_backends}
    assert len(by_name[pinned].requests()) == 1  # nothing more reached the removed one


def test_a_client_is_re_pinned_when_its_backend_is_down(
    make_proxy: ProxyFactory, controlled: Callable[..., ControlledBackend]
) -> None:
    backends = [controlled(f"c{i}") for i in (1, 2, 3)]
    health = HealthCheckConfig(interval=0.1, timeout=0.5, unhealthy_threshold=1)
    proxy = cookie_proxy(make_proxy, [cfg(b) for b in backends], health_check=health)
    first = get(proxy)
    token, pinned = sticky_token(first), first.headers["X-Backend"]
    by_name = {b.name: b for b in backends}
    by_name[pinned].health_status = 500
    assert wait_for(lambda: admin_backends(proxy)[pinned]["healthy"] is False, WAIT, 0.05)
    assert metric(proxy, "proxy_backend_up", backend=pinned) == 0
    moved = get(proxy, headers={"Cookie": f"pyproxy_backend={token}"})
    assert moved.headers["X-Backend"] != pinned
    assert sticky_token(moved) not in (None, token)
    assert len(by_name[pinned].traffic()) == 1


def test_the_cookie_carries_max_age_and_name_when_configured(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    sticky = StickyConfig(mode="cookie", cookie_name="lb", cookie_max_age=3600)
    proxy = make_proxy([echo_backend], sticky=sticky)
    (value,) = get(proxy).raw.headers.getlist("Set-Cookie")
    assert re.fullmatch(r"lb=[0-9a-f]{18}; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600", value)


def test_a_client_whose_backend_fails_is_re_pinned_where_the_retry_landed(
    make_proxy: ProxyFactory, controlled: Callable[..., ControlledBackend]
) -> None:
    backends = [controlled(f"c{i}") for i in (1, 2, 3)]
    proxy = cookie_proxy(make_proxy, [cfg(b) for b in backends], retries=RetryConfig())
    first = get(proxy)
    token, pinned = sticky_token(first), first.headers["X-Backend"]
    {b.name: b for b in backends}[pinned].status = 503  # now it fails; GETs are retried
    moved = get(proxy, headers={"Cookie": f"pyproxy_backend={token}"})
    assert moved.status_code == 200 and moved.headers["X-Backend"] != pinned
    new_token = sticky_token(moved)
    assert new_token not in (None, token)
    again = get(proxy, headers={"Cookie": f"pyproxy_backend={new_token}"})
    assert again.headers["X-Backend"] == moved.headers["X-Backend"]


def test_a_cookie_from_one_instance_works_on_another(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend]
) -> None:
    """The token is a keyed hash of the backend's URL: two pyproxies with the same
    config (or one restarted) agree on it."""
    one = cookie_proxy(make_proxy, three_backends)
    two = cookie_proxy(make_proxy, list(reversed(three_backends)))
    first = get(one)
    token = sticky_token(first)
    for _ in range(3):
        reply = get(two, headers={"Cookie": f"pyproxy_backend={token}"})
        assert reply.headers["X-Backend"] == first.headers["X-Backend"]


def test_ip_stickiness_ignores_a_spoofed_forwarded_for_from_an_untrusted_peer(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend]
) -> None:
    proxy = make_proxy(
        three_backends,
        sticky=StickyConfig(mode="ip"),
        trusted_proxies=(ip_network("10.0.0.0/8"),),
    )
    seen = {
        get(proxy, headers={"X-Forwarded-For": f"203.0.113.{i}"}).headers["X-Backend"]
        for i in range(1, 16)
    }
    assert len(seen) == 1  # the peer (127.0.0.1) is the client, whatever it claims


def test_ip_stickiness_follows_the_client_a_trusted_proxy_names(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend]
) -> None:
    proxy = make_proxy(
        three_backends,
        sticky=StickyConfig(mode="ip"),
        trusted_proxies=(ip_network("127.0.0.0/8"),),
    )

    def backend_for(client: str) -> str:
        return get(proxy, headers={"X-Forwarded-For": client}).headers["X-Backend"]

    placement = {f"203.0.113.{i}": backend_for(f"203.0.113.{i}") for i in range(1, 16)}
    assert len(set(placement.values())) >= 2  # 15 clients do not all hash to one of 3
    for client, backend in list(placement.items())[:5]:
        assert backend_for(client) == backend  # and each stays where it was


def test_ip_stickiness_moves_only_the_clients_of_a_removed_backend(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend]
) -> None:
    proxy = make_proxy(
        three_backends,
        sticky=StickyConfig(mode="ip"),
        trusted_proxies=(ip_network("127.0.0.0/8"),),
        admin=ADMIN,
    )

    def placement() -> dict[str, str]:
        return {
            c: get(proxy, headers={"X-Forwarded-For": c}).headers["X-Backend"]
            for c in (f"198.51.100.{i}" for i in range(1, 25))
        }

    before = placement()
    gone = max(set(before.values()), key=list(before.values()).count)
    requests.post(
        proxy.admin_url + "/admin/remove-backend",
        data=json.dumps({"name": gone}),
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=WAIT,
    ).raise_for_status()
    after = placement()
    for client, backend in before.items():
        if backend != gone:
            assert after[client] == backend  # rendezvous hashing: nobody else moves
        else:
            assert after[client] != gone


# -- the worked examples in docs/ -------------------------------------------------------------


def test_weighted_5_1_1_goes_a_a_b_a_c_a_a_through_the_proxy(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    """docs/balancing.md: nginx's smooth weighted round robin, as a client sees it."""
    a, b, c = (make_echo_backend(n) for n in "abc")
    proxy = make_proxy([cfg(a, weight=5), cfg(b, weight=1), cfg(c, weight=1)], strategy="weighted")
    picks = "".join(get(proxy).headers["X-Backend"] for _ in range(14))
    assert picks == "aabacaa" * 2


def test_the_rendezvous_example_in_the_docs() -> None:
    """docs/stickiness.md's table: scores, winners, and who moves when app3 goes."""
    from pyproxy.policy.sticky import rendezvous_score

    @dataclass
    class Pool:
        name: str
        url: str
        weight: int = 1
        in_flight: int = 0

    apps = [Pool(f"app{i}", f"http://10.0.0.{i}:80") for i in (1, 2, 3)]

    def winner(client: str, pool: list[Pool]) -> str:
        return max(pool, key=lambda b: rendezvous_score(client, b)).name

    assert round(rendezvous_score("10.1.1.1", apps[2]), 3) == 4.247
    clients = [f"10.1.1.{i}" for i in range(1, 7)]
    assert [winner(c, apps) for c in clients] == ["app3"] * 3 + ["app1"] * 3
    assert [winner(c, apps[:2]) for c in clients] == ["app1", "app2", "app2"] + ["app1"] * 3
