"""Active health checks (docs/health-checks.md): the verdict, one probe, and the loop.

Three layers, tested apart as the code keeps them apart:

- `HealthStatus`: pass/fail results -> up/down with rise/fall streaks. Pure; the
  time of each result is passed in.
- `check_backend()`: one probe against a real backend (what it sends, what passes).
- `HealthChecker`: the `pyproxy-health` loop, end to end through a running proxy:
  a backend whose /health flips goes down, gets no traffic, and comes back.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from backends import (
    CLOSE,
    KEEP,
    RESET,
    EchoBackend,
    ScriptedBackend,
    closed_port,
    free_ports,
    response,
    send,
    wait_for,
)
from conftest import ProxyFactory, admin_backends, metric, spawn_pyproxy
from conftest import backend_config as cfg
from test_resilience import (
    ADMIN,
    TOKEN,
    WAIT,
    ControlledBackend,
    controlled_backends,
    get,
)

from pyproxy import __version__
from pyproxy.config.schema import BackendConfig, CircuitBreakerConfig, HealthCheckConfig
from pyproxy.pool.backend import Backend
from pyproxy.pool.health import HealthStatus
from pyproxy.pool.health_checker import HealthChecker, check_backend
from pyproxy.runtime.snapshot import why_unavailable

# -- the verdict: HealthStatus ---------------------------------------------------------


def feed(status: HealthStatus, results: str) -> list[bool]:
    """Record 'p' (pass) / 'f' (fail) results; which ones were transitions."""
    return [
        status.record(r == "p", "200" if r == "p" else "500", float(i))
        for i, r in enumerate(results)
    ]


def test_config_backends_start_up_and_added_ones_unknown() -> None:
    assert HealthStatus(2, 3, True).state == "up"
    unknown = HealthStatus(2, 3, None)
    assert (unknown.state, unknown.up) == ("unknown", False)
    assert (unknown.last_probe_at, unknown.last_result, unknown.changed_at) == (None, None, None)


def test_up_goes_down_after_unhealthy_threshold_consecutive_failures() -> None:
    status = HealthStatus(2, 3, True)
    assert feed(status, "fff") == [False, False, True]
    assert status.state == "down"
    assert feed(status, "fff") == [False] * 3  # already down: no transition to report


def test_a_pass_resets_the_fail_streak() -> None:
    status = HealthStatus(2, 3, True)
    assert feed(status, "ffpff") == [False] * 5
    assert status.up and status.fail_streak == 2
    assert feed(status, "f") == [True]


def test_down_comes_back_after_healthy_threshold_consecutive_passes() -> None:
    status = HealthStatus(2, 1, True)
    feed(status, "f")
    assert feed(status, "pfp") == [False] * 3  # a failure resets the pass streak
    assert status.state == "down" and status.pass_streak == 1
    assert feed(status, "p") == [True]
    assert status.up


def test_unknown_comes_up_on_its_first_pass() -> None:
    status = HealthStatus(3, 3, None)
    assert feed(status, "p") == [True]
    assert status.state == "up"


def test_unknown_goes_down_after_the_fall_streak_then_needs_the_rise_streak() -> None:
    status = HealthStatus(2, 2, None)
    assert feed(status, "ff") == [False, True]
    assert status.state == "down"
    assert feed(status, "pp") == [False, True]


@pytest.mark.parametrize("threshold", [0, -1])
def test_thresholds_below_one_act_as_one(threshold: int) -> None:
    status = HealthStatus(threshold, threshold, True)
    assert feed(status, "fp") == [True, True]


def test_the_rise_and_fall_diagram_in_the_docs() -> None:
    """docs/health-checks.md: rise 2, fall 3; transitions at probes 7 and 12 only."""
    status = HealthStatus(2, 3, True)
    changed = feed(status, "pffpffffpfpp")
    assert [i + 1 for i, c in enumerate(changed) if c] == [7, 12]
    assert status.up


def test_the_facts_behind_the_verdict_are_kept() -> None:
    status = HealthStatus(1, 1, True)
    status.record(False, "connection refused", 12.5)
    assert (status.last_result, status.last_probe_at, status.changed_at) == (
        "connection refused", 12.5, 12.5,
    )  # fmt: skip
    status.record(False, "timeout", 13.0)
    assert (status.last_result, status.changed_at) == ("timeout", 12.5)


# -- one probe: check_backend ---------------------------------------------------------------


def make_backend(
    url: str,
    source: str = "config",
    enabled: bool = True,
    health: HealthCheckConfig | None = None,
) -> Backend:
    return Backend(
        BackendConfig(url=url, name="probed"),
        pool_size=2,
        health=health or HealthCheckConfig(enabled=enabled),
        breaker=CircuitBreakerConfig(enabled=False),
        source=source,
    )


@pytest.fixture
def probed(echo_backend: EchoBackend) -> Iterator[Backend]:
    backend = make_backend(echo_backend.url)
    yield backend
    backend.close()


def settings(path: str = "/health", **kw: object) -> HealthCheckConfig:
    return HealthCheckConfig(path=path, **{"timeout": 0.5, **kw})  # type: ignore[arg-type]


def test_a_healthy_backend_passes(probed: Backend, echo_backend: EchoBackend) -> None:
    assert check_backend(probed, settings()) == (True, "200")
    (probe,) = echo_backend.requests()
    assert probe.request_line == "GET /health HTTP/1.1"


@pytest.mark.parametrize(
    ("status", "expected", "passes"),
    [
        (200, (200, 399), True),
        (399, (200, 399), True),
        (400, (200, 399), False),
        (500, (200, 399), False),
        (503, (200, 399), False),
        (204, (200, 204), True),
        (206, (200, 204), False),
        (503, (500, 599), True),  # an operator may define health any way they like
    ],
)
def test_the_status_must_be_in_expected_status(
    probed: Backend, status: int, expected: tuple[int, int], passes: bool
) -> None:
    result = check_backend(probed, settings(f"/status/{status}", expected_status=expected))
    assert result == (passes, str(status) if passes else f"{status} on /status/{status}")


@pytest.mark.parametrize(("expected", "passes"), [((200, 299), False), ((200, 399), True)])
def test_a_redirect_is_judged_by_its_own_status_not_followed(
    probed: Backend, echo_backend: EchoBackend, expected: tuple[int, int], passes: bool
) -> None:
    detail = "302" if passes else "302 on /redirect"  # a failure says where
    result = check_backend(probed, settings("/redirect", expected_status=expected))
    assert result == (passes, detail)
    assert [r.target for r in echo_backend.requests()] == ["/redirect"]  # not /elsewhere


def test_a_probe_that_gets_no_answer_in_time_fails(probed: Backend) -> None:
    started = time.monotonic()
    passed, detail = check_backend(probed, settings("/slow?delay=2", timeout=0.3))
    assert (passed, detail) == (False, "no response in time")
    assert time.monotonic() - started < 1.5


def test_a_refused_probe_fails_without_raising() -> None:
    backend = make_backend(f"http://127.0.0.1:{closed_port()}")
    try:
        assert check_backend(backend, settings()) == (False, "connection refused")
    finally:
        backend.close()


def test_a_probe_sends_only_its_own_few_headers(probed: Backend, echo_backend: EchoBackend) -> None:
    check_backend(probed, settings())
    (probe,) = echo_backend.requests()
    assert probe.header_names() == {"host", "user-agent", "connection"}
    assert probe.header("Host") == f"127.0.0.1:{echo_backend.port}"
    assert probe.header("User-Agent") == f"pyproxy-health/{__version__}"
    assert probe.header("Connection") == "close"  # one probe, one connection
    assert probe.body == b""


def test_probes_carry_nothing_from_client_traffic(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    """The probe makes its connection with the factory of the pool client traffic uses;
    nothing a client sent (or a backend set) may leak into it."""
    proxy = make_proxy([echo_backend])
    secret = {
        "Cookie": "session=client-secret",
        "Authorization": "Bearer client-token",
        "X-Forwarded-For": "203.0.113.9",
    }
    assert get(proxy, "/cookies", headers=secret).status_code == 200  # backend sets cookies too
    backend = proxy.holder.runtime.backends[0]
    assert check_backend(backend, settings()) == (True, "200")
    probe = echo_backend.requests()[-1]
    assert probe.target == "/health"
    assert probe.header_names() == {"host", "user-agent", "connection"}
    assert "client-secret" not in json.dumps(probe.as_json())


def test_config_backends_start_up_and_admin_added_ones_unknown(echo_backend: EchoBackend) -> None:
    config_backend = make_backend(echo_backend.url)
    added = make_backend(echo_backend.url, source="admin")
    added_unchecked = make_backend(echo_backend.url, source="admin", enabled=False)
    try:
        assert why_unavailable(config_backend) is None
        assert added.health.state == "unknown"
        assert why_unavailable(added) == "health unknown"
        assert why_unavailable(added_unchecked) is None  # checks off: nothing to wait for
    finally:
        for backend in (config_backend, added, added_unchecked):
            backend.close()


# -- the loop: HealthChecker ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def controlled() -> Iterator[Callable[..., ControlledBackend]]:
    with controlled_backends() as start:
        yield start


@pytest.fixture
def flip(controlled: Callable[..., ControlledBackend]) -> ControlledBackend:
    return controlled("flip")


def test_probe_once_logs_and_reports_only_real_transitions(
    flip: ControlledBackend, caplog: pytest.LogCaptureFixture
) -> None:
    check = HealthCheckConfig(timeout=0.5, healthy_threshold=2, unhealthy_threshold=2)
    backend = make_backend(flip.url, health=check)
    transitions: list[str] = []
    checker = HealthChecker(
        backends=lambda: [backend],
        settings=lambda: check,
        on_transition=lambda b: transitions.append(b.health.state),
        clock=FakeClock(),
    )
    caplog.set_level(logging.INFO, logger="pyproxy.pool.health_checker")
    try:
        flip.health_status = 500
        assert [checker.probe_once(backend, check) for _ in range(4)] == [False, True, False, False]
        flip.health_status = 200
        assert [checker.probe_once(backend, check) for _ in range(3)] == [False, True, False]
    finally:
        backend.close()
    assert transitions == ["down", "up"]
    lines = [r.getMessage() for r in caplog.records if r.name == "pyproxy.pool.health_checker"]
    url = f"{flip.url}/health"
    assert lines == [
        f"backend probed down: GET {url} -> 500 (2 failures in a row); the status is outside "
        "health_check.expected_status (200-399); fix the page or widen expected_status",
        f"backend probed up: GET {url} -> 200",
    ]
    assert [r.levelno for r in caplog.records if r.name == "pyproxy.pool.health_checker"] == [
        logging.WARNING,
        logging.INFO,
    ]


def test_the_loop_probes_at_once_then_every_interval_with_jitter(flip: ControlledBackend) -> None:
    backend = make_backend(flip.url)
    interval = 0.25
    check = HealthCheckConfig(interval=interval, timeout=0.5)
    checker = HealthChecker(lambda: [backend], lambda: check, lambda b: None)
    started = time.monotonic()
    checker.start()
    try:
        assert wait_for(lambda: len(flip.probes()) >= 7, WAIT)
    finally:
        checker.stop()
        backend.close()
    times = [p.at for p in flip.probes()]
    assert times[0] - started < 0.2  # the first probe runs at start, not after an interval
    gaps = [b - a for a, b in itertools.pairwise(times)][:6]
    assert all(0.85 * interval <= g <= 1.1 * interval + 0.15 for g in gaps), gaps
    assert statistics.pstdev(gaps) > 0.002  # jittered: probes do not fall into lockstep
    stopped_with = len(flip.probes())
    time.sleep(interval * 2)
    assert len(flip.probes()) == stopped_with  # stop() stops it


def test_a_failing_backend_goes_down_gets_no_traffic_and_comes_back(
    make_proxy: ProxyFactory,
    flip: ControlledBackend,
    make_echo_backend: Callable[[str], EchoBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = make_echo_backend("good")
    health = HealthCheckConfig(
        interval=0.1, timeout=0.5, healthy_threshold=2, unhealthy_threshold=3
    )
    proxy = make_proxy([cfg(flip), good], health_check=health)
    caplog.set_level(logging.INFO, logger="pyproxy.pool.health_checker")
    assert metric(proxy, "proxy_backend_up", backend="flip") == 1

    flip.health_status = 500
    switched = time.monotonic()
    assert wait_for(lambda: admin_backends(proxy)["flip"]["healthy"] is False, WAIT, 0.02)
    failed_probes = [p for p in flip.probes() if p.at >= switched]
    assert len(failed_probes) >= 3  # not before unhealthy_threshold failures
    facts = admin_backends(proxy)["flip"]
    assert (facts["available"], facts["circuit"]) == (False, "closed")
    assert "health" in facts["why_unavailable"]
    assert metric(proxy, "proxy_backend_up", backend="flip") == 0
    before = len(flip.traffic())
    for _ in range(8):
        assert get(proxy).headers["X-Backend"] == "good"
    assert len(flip.traffic()) == before

    flip.health_status = 200
    recovered = time.monotonic()
    assert wait_for(lambda: admin_backends(proxy)["flip"]["healthy"] is True, WAIT, 0.02)
    assert len([p for p in flip.probes() if p.at >= recovered]) >= 2
    assert metric(proxy, "proxy_backend_up", backend="flip") == 1
    assert {get(proxy).headers["X-Backend"] for _ in range(4)} == {"flip", "good"}

    messages = [r.getMessage() for r in caplog.records if r.name == "pyproxy.pool.health_checker"]
    assert [m.split(": ")[0] for m in messages] == ["backend flip down", "backend flip up"]


def test_the_first_probe_runs_at_start(
    make_proxy: ProxyFactory, flip: ControlledBackend, echo_backend: EchoBackend
) -> None:
    flip.health_status = 503
    health = HealthCheckConfig(interval=30.0, timeout=0.5, unhealthy_threshold=1)
    proxy = make_proxy([cfg(flip), echo_backend], health_check=health)
    assert wait_for(lambda: admin_backends(proxy)["flip"]["healthy"] is False, 3.0, 0.02)


def add_backend(proxy_admin: str, backend: ControlledBackend) -> requests.Response:
    return requests.post(
        proxy_admin + "/admin/add-backend",
        data=json.dumps({"url": backend.url, "name": backend.name}),
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=WAIT,
    )


def test_an_added_backend_takes_traffic_only_after_its_first_passing_probe(
    make_proxy: ProxyFactory,
    controlled: Callable[..., ControlledBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    good, new = make_echo_backend("good"), controlled("new")
    new.health_gate.clear()  # its first probe waits until the test says so
    health = HealthCheckConfig(interval=0.1, timeout=5.0)
    proxy = make_proxy([good], health_check=health, admin=ADMIN)
    added = add_backend(proxy.admin_url, new)
    assert added.status_code == 201
    assert (added.json()["health"], added.json()["available"]) == ("unknown", False)
    assert wait_for(lambda: len(new.probes()) == 1, WAIT)  # probed at once, not after a wait
    facts = admin_backends(proxy)["new"]
    assert (facts["source"], facts["health"], facts["healthy"], facts["available"]) == (
        "admin", "unknown", False, False,
    )  # fmt: skip
    for _ in range(6):
        assert get(proxy).headers["X-Backend"] == "good"
    assert new.traffic() == []
    assert metric(proxy, "proxy_backend_up", backend="new") == 0
    new.health_gate.set()
    assert wait_for(lambda: admin_backends(proxy)["new"]["available"] is True, WAIT, 0.02)
    assert metric(proxy, "proxy_backend_up", backend="new") == 1
    assert "new" in {get(proxy).headers["X-Backend"] for _ in range(4)}


def test_an_added_backend_takes_traffic_at_once_when_checks_are_off(
    make_proxy: ProxyFactory,
    controlled: Callable[..., ControlledBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    good, new = make_echo_backend("good"), controlled("new")
    proxy = make_proxy([good], admin=ADMIN)  # base_config: health checks off
    assert add_backend(proxy.admin_url, new).json()["available"] is True
    assert "new" in {get(proxy).headers["X-Backend"] for _ in range(4)}
    assert new.probes() == []


def test_a_checker_that_never_started_stops_cleanly() -> None:
    checker = HealthChecker(lambda: [], HealthCheckConfig, lambda b: None)
    checker.stop()


# -- bounds: one probe takes at most `timeout`, reads a bounded body -------------------------


class EndlessBackend:
    """Answers every request with `head`, then `chunk` again and again, `pause` apart,
    until the prober goes away or the test ends: a trickle, or an endless body.
    `chunk=b""` says nothing more after `head` (a backend that never finishes).

    It records what a test asserts on: `asked` (a request arrived), `peer_gone` (the
    prober closed its connection), `sent` (body bytes written), `most_open` (the most
    connections open at once).
    """

    def __init__(self, head: bytes, chunk: bytes = b"", pause: float = 0.0) -> None:
        self.name = "endless"
        self.head, self.chunk, self.pause = head, chunk, pause
        self.asked = threading.Event()
        self.peer_gone = threading.Event()
        self.sent = 0
        self.open = self.most_open = self.requests = 0
        self._lock = threading.Lock()  # guards the counters and _sockets
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._spawn(self._accept_loop)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name="test-endless", daemon=True)
        thread.start()
        with self._lock:
            self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._sockets.append(conn)
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._read_request(conn):
                self._answer(conn)
        finally:
            with self._lock:
                self.open -= 1
            conn.close()

    def _read_request(self, conn: socket.socket) -> bool:
        conn.settimeout(WAIT)
        received = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in received:
                data = conn.recv(65_536)
                if not data:
                    return False
                received += data
            with self._lock:
                self.requests += 1
            self.asked.set()
            return True
        return False

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(None)  # blocking writes: close() shuts the socket down to end one
        deadline = time.monotonic() + 120  # a bound on every loop, far past any test
        try:
            conn.sendall(self.head)
            while time.monotonic() < deadline and not self._stop.is_set():
                if not self.chunk:
                    if not conn.recv(1):  # says nothing; notices the prober leave
                        break
                    continue
                conn.sendall(self.chunk)
                with self._lock:
                    self.sent += len(self.chunk)
                if self.pause and self._stop.wait(self.pause):
                    return
        except OSError:
            pass
        if not self._stop.is_set():
            self.peer_gone.set()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)


@pytest.fixture
def endless() -> Iterator[Callable[..., EndlessBackend]]:
    started: list[EndlessBackend] = []

    def start(head: bytes, chunk: bytes = b"", pause: float = 0.0) -> EndlessBackend:
        backend = EndlessBackend(head, chunk, pause)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


def probe_within(backend: Backend, check: HealthCheckConfig, bound: float) -> tuple[bool, str]:
    """Run one probe in a thread; fail the test if it is still running after `bound`."""
    outcome: list[tuple[bool, str]] = []
    thread = threading.Thread(target=lambda: outcome.append(check_backend(backend, check)))
    thread.daemon = True
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"the probe still runs after {bound}s"
    return outcome[0]


TRICKLE = 0.05  # seconds between two bytes: far below any read timeout here
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "cut_at"),
    [
        (b"HTTP/1.1 200 ", "status line"),
        (b"HTTP/1.1 200 OK\r\nX-Padding: ", "headers"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", "body"),
        (CHUNKED + b"100000\r\n", "chunked body"),
    ],
    ids=["status line", "headers", "body", "chunked body"],
)
def test_a_probe_takes_at_most_timeout_in_total_however_the_answer_trickles(
    endless: Callable[..., EndlessBackend], head: bytes, cut_at: str
) -> None:
    """The read timeout bounds each read; a byte every 50 ms never trips it. Only a
    deadline over the whole probe ends it."""
    slow = endless(head, b"a", TRICKLE)
    backend = make_backend(slow.url)
    try:
        started = time.monotonic()
        passed, detail = probe_within(backend, settings(timeout=0.5), bound=8)
    finally:
        backend.close()
    assert not passed and "no response in time" in detail, (cut_at, detail)
    assert time.monotonic() - started < 4  # generous: the deadline is 0.5 s
    assert slow.peer_gone.wait(WAIT)  # and the probe's connection is closed, not left open


def test_a_backend_that_accepts_and_never_answers_fails_in_time(
    endless: Callable[..., EndlessBackend],
) -> None:
    silent = endless(b"")
    backend = make_backend(silent.url)
    try:
        assert probe_within(backend, settings(timeout=0.3), bound=8) == (
            False, "no response in time",
        )  # fmt: skip
    finally:
        backend.close()
    assert silent.peer_gone.wait(WAIT)


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\n\r\n"],
    ids=["100 (http.client skips these itself)", "103"],
)
def test_endless_interim_answers_end_at_the_deadline(
    endless: Callable[..., EndlessBackend], interim: bytes
) -> None:
    chatty = endless(b"", interim)
    backend = make_backend(chatty.url)
    try:
        passed, _ = probe_within(backend, settings(timeout=0.5), bound=8)
    finally:
        backend.close()
    assert not passed
    assert chatty.peer_gone.wait(WAIT)


@pytest.mark.parametrize(
    ("head", "chunk"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30), b"\0" * 65_536),
        (CHUNKED, b"10000\r\n" + b"\0" * 65_536 + b"\r\n"),  # chunks without end
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"\0" * 65_536),  # until close
    ],
    ids=["1 GiB content-length", "endless chunked", "endless close-delimited"],
)
def test_a_huge_health_body_is_not_downloaded(
    endless: Callable[..., EndlessBackend], head: bytes, chunk: bytes
) -> None:
    big = endless(head, chunk)
    backend = make_backend(big.url)
    try:
        assert probe_within(backend, settings(timeout=2.0), bound=10) == (True, "200")
    finally:
        backend.close()
    assert big.peer_gone.wait(WAIT)
    # What left the backend: the probe's small read plus what the kernel buffers of a
    # loopback connection hold (a few MiB), not the gigabyte on offer.
    assert big.sent < 64 * 1024 * 1024, big.sent


def test_a_reset_fails_the_probe_with_a_reason(
    make_scripted_backend: Callable[..., ScriptedBackend],
) -> None:
    scripted = make_scripted_backend({"/health": [RESET]})
    backend = make_backend(scripted.url)
    try:
        passed, detail = probe_within(backend, settings(), bound=8)
    finally:
        backend.close()
    assert not passed and detail in ("connection closed before the response", "connection error")


def test_a_body_cut_short_fails_the_probe(
    make_scripted_backend: Callable[..., ScriptedBackend],
) -> None:
    cut = response(200, b"ok\n", [("Content-Length", "100")], content_length=False)
    scripted = make_scripted_backend({"/health": [send(cut), CLOSE]})
    backend = make_backend(scripted.url)
    try:
        assert probe_within(backend, settings(), bound=8) == (
            False, "200, body failed: response body cut short",
        )  # fmt: skip
    finally:
        backend.close()


def test_interim_responses_are_skipped_and_the_final_status_judged(
    make_scripted_backend: Callable[..., ScriptedBackend],
) -> None:
    """RFC 9110 §15.2: any number of 1xx may come before the final answer."""
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    scripted = make_scripted_backend({"/health": [send(early * 2 + response(200, b"ok\n")), KEEP]})
    backend = make_backend(scripted.url)
    try:
        assert probe_within(backend, settings(), bound=8) == (True, "200")
    finally:
        backend.close()


# -- the loop: slow backends are isolated, the shutdown never waits ---------------------------


def test_a_slow_backend_never_delays_another_backends_probes(
    make_proxy: ProxyFactory,
    endless: Callable[..., EndlessBackend],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    """One backend trickles its health answer; another is killed. The killed one must go
    down in about unhealthy_threshold x interval + timeout, as if the slow one did not exist."""
    slow = endless(b"HTTP/1.1 200 OK\r\nX-Padding: ", b"a", TRICKLE)
    killed = make_echo_backend("killed")
    health = HealthCheckConfig(interval=0.1, timeout=1.0, unhealthy_threshold=2)
    proxy = make_proxy([cfg(slow), cfg(killed)], health_check=health)
    assert slow.asked.wait(WAIT)  # the slow probe is under way
    killed.close()
    # Expected within 2 x 0.1 + 1.0 s; the bound is generous for a loaded machine.
    assert wait_for(lambda: admin_backends(proxy)["killed"]["healthy"] is False, WAIT, 0.05)


def test_a_hung_backend_holds_one_worker_and_is_not_probed_again_meanwhile(
    endless: Callable[..., EndlessBackend], flip: ControlledBackend
) -> None:
    """Each backend keeps its own schedule: while one probe hangs (up to its timeout),
    the other backend is probed every interval, and the hung one is not probed twice."""
    silent = endless(b"")
    hung, good = make_backend(silent.url), make_backend(flip.url)
    check = HealthCheckConfig(interval=0.02, timeout=3.0)
    checker = HealthChecker(lambda: [hung, good], lambda: check, lambda b: None)
    checker.start()
    try:
        assert silent.asked.wait(WAIT)
        # 10 probes of the good one take ~0.2 s: well inside the hung probe's 3 s.
        assert wait_for(lambda: len(flip.probes()) >= 10, WAIT)
        assert silent.requests == 1
    finally:
        checker.stop()
        for backend in (hung, good):
            backend.close()


def test_many_hung_backends_use_a_bounded_number_of_workers_and_delay_no_one(
    endless: Callable[..., EndlessBackend], flip: ControlledBackend
) -> None:
    """20 backends that never answer, 4 workers: never more than 4 probes (threads,
    connections) at once, and the healthy backend keeps being probed, because backends
    whose last probe timed out hold at most half the workers."""
    silent = endless(b"")
    hung = [make_backend(silent.url) for _ in range(20)]
    good = make_backend(flip.url)
    check = HealthCheckConfig(interval=0.05, timeout=0.5)
    checker = HealthChecker(lambda: [*hung, good], lambda: check, lambda b: None, max_workers=4)
    most_threads = 0

    def good_probed_often() -> bool:
        nonlocal most_threads
        most_threads = max(most_threads, len(probe_threads()))
        return len(flip.probes()) >= 20

    checker.start()
    try:
        assert wait_for(good_probed_often, WAIT * 2)
        assert silent.requests >= 4  # the hung ones are still probed, on what is left
    finally:
        checker.stop()
        for backend in (*hung, good):
            backend.close()
    # The prober's own side is the invariant: at most 4 probe threads, each holding one
    # connection. The backend's count of open connections is not: it sees a closed probe
    # connection only when its serving thread next runs, which on a loaded machine can be
    # after the next probe connected (a 5th "open" connection that is already closed).
    assert most_threads <= 4


def test_backends_removed_at_runtime_are_no_longer_probed(
    make_proxy: ProxyFactory, controlled: Callable[..., ControlledBackend]
) -> None:
    kept, removed = controlled("kept"), controlled("removed")
    health = HealthCheckConfig(interval=0.05, timeout=1.0)
    proxy = make_proxy([cfg(kept), cfg(removed)], health_check=health, admin=ADMIN)
    assert wait_for(lambda: len(removed.probes()) >= 2, WAIT)
    answer = requests.post(
        proxy.admin_url + "/admin/remove-backend",
        data=json.dumps({"name": "removed"}),
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=WAIT,
    )
    assert answer.status_code == 200
    after_removal = len(removed.probes())
    kept_before = len(kept.probes())
    assert wait_for(lambda: len(kept.probes()) >= kept_before + 5, WAIT)  # time passes
    assert len(removed.probes()) <= after_removal + 1  # at most the one in flight


def probe_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pyproxy-probe")]


def test_close_does_not_wait_for_a_stuck_probe(
    make_proxy: ProxyFactory, endless: Callable[..., EndlessBackend]
) -> None:
    slow = endless(b"HTTP/1.1 200 OK\r\nX-Padding: ", b"a", TRICKLE)
    health = HealthCheckConfig(interval=0.1, timeout=60.0)
    proxy = make_proxy([cfg(slow)], health_check=health)
    assert slow.asked.wait(WAIT)
    closing = threading.Thread(target=proxy.close, daemon=True)
    started = time.monotonic()
    closing.start()
    closing.join(WAIT)
    assert not closing.is_alive()
    assert time.monotonic() - started < 4, "close() waited for the probe (60 s timeout)"
    assert slow.peer_gone.wait(WAIT)  # the probe was abandoned, its connection closed
    assert wait_for(lambda: not probe_threads(), WAIT), probe_threads()


def test_sigterm_exits_promptly_while_a_probe_is_stuck(
    tmp_path: Path, endless: Callable[..., EndlessBackend]
) -> None:
    slow = endless(b"HTTP/1.1 200 OK\r\nX-Padding: ", b"a", TRICKLE)
    proxy_port, admin_port = free_ports(2)
    config = {
        "listen": f"127.0.0.1:{proxy_port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "health_check": {"interval": "100ms", "timeout": "60s"},
        "access_log": {"enabled": False},
        "shutdown": {"delay": "0s", "drain_timeout": "2s"},
        "backends": [{"url": slow.url, "name": "slow"}],
    }
    path = tmp_path / "pyproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "logs" / "pyproxy.log"
    log_path.parent.mkdir()
    with open(log_path, "wb") as log_file:
        process = spawn_pyproxy(path, log_file)
    try:
        assert slow.asked.wait(20), log_path.read_text()
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = process.wait(timeout=20)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    log = log_path.read_text()
    assert code == 0, log
    assert took < 8, f"exit took {took:.1f}s with a probe stuck for 60 s"
    assert "Traceback" not in log
