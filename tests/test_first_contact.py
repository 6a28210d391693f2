"""First contact with health checks: probes that reach the page the operator means,
and answers that say why.

- `health_check.host`, `.port` and `.expect_body` shape what a probe sends and what
  passes (one probe against a real backend).
- A backend going down is logged once, with the URL probed, what came back and a hint.
- A 503 for "nothing available" names each backend and why, never its address.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from backends import (
    Blackhole,
    EchoBackend,
    ScriptedBackend,
    closed_port,
    pattern_bytes,
    response,
    send,
    wait_for,
)
from conftest import ProxyFactory, admin_backends
from test_resilience import WAIT, get

from pyproxy.config.schema import BackendConfig, CircuitBreakerConfig, HealthCheckConfig
from pyproxy.pool import urlguard
from pyproxy.pool.backend import Backend
from pyproxy.pool.health_checker import HealthChecker
from pyproxy.pool.probe import MAX_PROBE_BODY, Probe, ProbeResult
from pyproxy.proxy.answers import no_backend_available_in_pool
from pyproxy.runtime.snapshot import why_unavailable

CHECKER_LOG = "pyproxy.pool.health_checker"


def make_backend(
    url: str, name: str = "web1", source: str = "config", health: HealthCheckConfig | None = None
) -> Backend:
    return Backend(
        BackendConfig(url=url, name=name),
        pool_size=2,
        health=health or HealthCheckConfig(),  # its thresholds: the verdict's
        breaker=CircuitBreakerConfig(enabled=False),
        source=source,
    )


@pytest.fixture
def probed(echo_backend: EchoBackend) -> Iterator[Backend]:
    backend = make_backend(echo_backend.url)
    yield backend
    backend.close()


def probe(backend: Backend, **settings: object) -> ProbeResult:
    return Probe(backend, HealthCheckConfig(timeout=2.0, **settings)).run()  # type: ignore[arg-type]


def answering(body: bytes, status: int = 200) -> list:  # type: ignore[type-arg]
    return [send(response(status, body, reason="X"))]


# -- what a probe sends: host and port ---------------------------------------------------------


def test_the_host_setting_is_sent_exactly_as_given(
    probed: Backend, echo_backend: EchoBackend
) -> None:
    assert probe(probed, host="Health.Example:8443").passed
    (sent,) = echo_backend.requests()
    assert sent.header_values("Host") == ["Health.Example:8443"]


def test_the_port_setting_probes_another_port_of_the_backends_host(
    make_echo_backend: object, echo_backend: EchoBackend
) -> None:
    """The backend's own port refuses; the probe goes to the management port."""
    backend = make_backend(f"http://127.0.0.1:{closed_port()}")
    try:
        result = probe(backend, port=echo_backend.port)
    finally:
        backend.close()
    assert (result.passed, result.detail) == (True, "200")
    (sent,) = echo_backend.requests()
    assert sent.target == "/health"


def test_the_port_setting_of_an_admin_added_backend_still_passes_the_address_guard(
    echo_backend: EchoBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin-added backend's connections check every address dialled (connection.py);
    the probe's port override must be dialled through that same check."""
    guarded: list[tuple[str, int]] = []
    real = urlguard.resolve_allowed

    def watched(host: str, port: int) -> list[str]:
        guarded.append((host, port))
        return real(host, port)

    monkeypatch.setattr(urlguard, "resolve_allowed", watched)
    backend = make_backend(f"http://127.0.0.1:{closed_port()}", source="admin")
    try:
        assert probe(backend, port=echo_backend.port).passed
    finally:
        backend.close()
    assert guarded == [("127.0.0.1", echo_backend.port)]
    assert len(echo_backend.requests()) == 1


# -- what passes: expect_body ------------------------------------------------------------------


@pytest.fixture
def pages() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend(
        {
            "/ok": answering(b'{"status": "ok"}\n'),
            "/starting": answering(b'{"status": "starting"}\n'),
            "/late": answering(pattern_bytes(MAX_PROBE_BODY) + b"ok"),
            "/gone": answering(b"ok", status=404),
            "/chunked": [  # the marker in the second chunk: the prefix read spans chunks
                send(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"9\r\n{\"status\"\r\n7\r\n: \"ok\"}\r\n0\r\n\r\n"
                )
            ],
        }
    )
    yield backend
    backend.close()


@pytest.fixture
def paged(pages: ScriptedBackend) -> Iterator[Backend]:
    backend = make_backend(pages.url)
    yield backend
    backend.close()


def test_expect_body_passes_when_the_body_contains_it(paged: Backend) -> None:
    result = probe(paged, path="/ok", expect_body='"ok"')
    assert (result.passed, result.detail) == (True, "200")


def test_expect_body_is_found_across_chunks(paged: Backend) -> None:
    result = probe(paged, path="/chunked", expect_body='"status": "ok"')
    assert (result.passed, result.detail) == (True, "200")


def test_expect_body_fails_a_body_without_it(paged: Backend) -> None:
    result = probe(paged, path="/starting", expect_body="ok")
    assert (result.passed, result.detail, result.status) == (False, "body lacks 'ok'", 200)


def test_expect_body_is_searched_in_the_first_16_kib_only(paged: Backend) -> None:
    result = probe(paged, path="/late", expect_body="ok")
    assert (result.passed, result.detail) == (False, "body lacks 'ok'")


def test_the_status_is_judged_before_the_body(paged: Backend) -> None:
    result = probe(paged, path="/gone", expect_body="ok")
    assert (result.passed, result.detail) == (False, "404 on /gone")


# -- the log: once per transition, with a hint -------------------------------------------------


def checker_for(backend: Backend, check: HealthCheckConfig) -> HealthChecker:
    return HealthChecker(backends=lambda: [backend], settings=lambda: check, on_transition=print)


def checker_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == CHECKER_LOG]


@pytest.mark.parametrize(
    ("path", "settings", "seen", "hint"),
    [
        (
            "/status/405",
            {},
            "405",
            "set health_check.path to a page that answers 200-399, or health_check.enabled: false",
        ),
        (
            "/status/500",
            {},
            "500",
            "the status is outside health_check.expected_status (200-399); "
            "fix the page or widen expected_status",
        ),
        (
            "/health",
            {"expect_body": "READY"},
            "200, body lacks 'READY'",
            "health_check.expect_body is not in the first 16 KiB of the answer; "
            "check the page or expect_body",
        ),
        (
            "/slow?delay=2",
            {"timeout": 0.3},
            "no response in time",
            "no answer within health_check.timeout (0.3s); "
            "raise the timeout or check why the backend is slow",
        ),
    ],
)
def test_going_down_logs_the_url_what_came_back_and_a_hint(
    echo_backend: EchoBackend,
    caplog: pytest.LogCaptureFixture,
    path: str,
    settings: dict[str, object],
    seen: str,
    hint: str,
) -> None:
    check = HealthCheckConfig(path=path, unhealthy_threshold=2, **settings)  # type: ignore[arg-type]
    backend = make_backend(echo_backend.url, health=check)
    caplog.set_level(logging.INFO, logger=CHECKER_LOG)
    try:
        for _ in range(2):
            checker_for(backend, check).probe_once(backend, check)
    finally:
        backend.close()
    url = f"http://127.0.0.1:{echo_backend.port}{path}"
    message = f"backend web1 down: GET {url} -> {seen} (2 failures in a row); {hint}"
    assert checker_lines(caplog) == [(logging.WARNING, message)]


def test_a_refused_probe_hints_at_the_port(caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    check = HealthCheckConfig(unhealthy_threshold=1, timeout=2.0)
    backend = make_backend(f"http://127.0.0.1:{port}", health=check)
    caplog.set_level(logging.INFO, logger=CHECKER_LOG)
    try:
        checker_for(backend, check).probe_once(backend, check)
    finally:
        backend.close()
    assert checker_lines(caplog) == [
        (
            logging.WARNING,
            f"backend web1 down: GET http://127.0.0.1:{port}/health -> connection refused "
            "(1 failure in a row); is the backend running, and listening on that port? "
            "(health_check.port)",
        )
    ]


def test_a_connect_timeout_hints_at_reachability(caplog: pytest.LogCaptureFixture) -> None:
    """A host that drops SYNs (a firewall) is not slow: the hint says so."""
    hole = Blackhole()
    check = HealthCheckConfig(unhealthy_threshold=1, timeout=0.3)
    backend = make_backend(hole.url, health=check)
    caplog.set_level(logging.INFO, logger=CHECKER_LOG)
    try:
        checker_for(backend, check).probe_once(backend, check)
    finally:
        backend.close()
        hole.close()
    assert checker_lines(caplog) == [
        (
            logging.WARNING,
            f"backend web1 down: GET {hole.url}/health -> connect timeout (1 failure in a row); "
            "no connection within health_check.timeout; is the host reachable (a firewall)?",
        )
    ]


def test_down_is_logged_once_for_many_failures_and_up_once_at_info(
    echo_backend: EchoBackend, caplog: pytest.LogCaptureFixture
) -> None:
    failing = HealthCheckConfig(path="/status/404", unhealthy_threshold=3, healthy_threshold=2)
    passing = HealthCheckConfig(path="/ok", unhealthy_threshold=3, healthy_threshold=2)
    backend = make_backend(echo_backend.url, health=failing)
    checker = checker_for(backend, failing)
    caplog.set_level(logging.INFO, logger=CHECKER_LOG)
    try:
        changes = [checker.probe_once(backend, failing) for _ in range(10)]
        changes += [checker.probe_once(backend, passing) for _ in range(4)]
    finally:
        backend.close()
    assert changes.count(True) == 2
    lines = checker_lines(caplog)
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert lines[0][1].startswith(
        f"backend web1 down: GET {echo_backend.url}/status/404 -> 404 (3 failures in a row); "
    )
    assert lines[1][1] == f"backend web1 up: GET {echo_backend.url}/ok -> 200"


# -- the 503 says why --------------------------------------------------------------------------


def no_health_page(name: str) -> ScriptedBackend:
    """A backend as most are at first: it serves the site, but has no /health page."""
    return ScriptedBackend(
        {"/health": answering(b"no such page\n", status=404)},
        default=[send(response(503, b"overloaded\n"))],
        name=name,
    )


@pytest.fixture
def web1() -> Iterator[ScriptedBackend]:
    backend = no_health_page("web1")
    yield backend
    backend.close()


def probes_seen(backend: ScriptedBackend) -> int:
    return sum(1 for r in backend.requests() if r.request_line.startswith("GET /health "))


def test_a_backend_without_a_health_page_is_named_in_the_503_and_logged_once(
    make_proxy: ProxyFactory, web1: ScriptedBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CHECKER_LOG)
    fast = HealthCheckConfig(interval=0.05, timeout=2.0)  # the default path and thresholds
    proxy = make_proxy([web1], health_check=fast)
    assert wait_for(lambda: admin_backends(proxy)["web1"]["health"] == "down", timeout=WAIT)
    seen = probes_seen(web1)
    assert wait_for(lambda: probes_seen(web1) >= seen + 3, timeout=WAIT)  # more failures

    reply = get(proxy, "/page")
    assert reply.status_code == 503
    assert reply.text == (
        "503 Service Unavailable: no backend available in pool default: "
        "web1 health down (404 on /health)\n"
    )
    assert reply.headers["Retry-After"] == "1"
    assert str(web1.port) not in reply.text and "127.0.0.1" not in reply.text
    assert checker_lines(caplog) == [
        (
            logging.WARNING,
            f"backend web1 down: GET {web1.url}/health -> 404 (3 failures in a row); "
            "set health_check.path to a page that answers 200-399, or "
            "health_check.enabled: false",
        )
    ]


def test_the_503_lists_every_backend_with_its_own_reason(
    make_proxy: ProxyFactory, web1: ScriptedBackend, echo_backend: EchoBackend
) -> None:
    """web2 passes its probes but fails the client's request: its circuit opens."""
    web2 = ScriptedBackend(default=[send(response(503, b"overloaded\n"))], name="web2")
    web2.scripts["/health"] = answering(b"fine\n")
    try:
        proxy = make_proxy(
            [web1, web2],
            health_check=HealthCheckConfig(interval=0.05, timeout=2.0),
            circuit_breaker=CircuitBreakerConfig(failure_threshold=1, open_duration=60.0),
        )
        assert wait_for(lambda: admin_backends(proxy)["web1"]["health"] == "down", timeout=WAIT)
        assert get(proxy, "/first").text == "overloaded\n"  # web2's own 503 opens its circuit
        reply = get(proxy, "/second")
    finally:
        web2.close()
    assert reply.text == (
        "503 Service Unavailable: no backend available in pool default: "
        "web1 health down (404 on /health), web2 circuit open\n"
    )


def test_the_503_body_stays_short_however_many_backends_there_are() -> None:
    backends = [make_backend(f"http://127.0.0.1:{9000 + i}", name=f"b{i:02}") for i in range(13)]
    try:
        for backend in backends:
            backend.health.record(False, "connection refused", at=1.0)
            backend.health.record(False, "connection refused", at=2.0)
            backend.health.record(False, "connection refused", at=3.0)
        line = no_backend_available_in_pool("web", backends, why_unavailable)
    finally:
        for backend in backends:
            backend.close()
    listed = ", ".join(f"b{i:02} health down (connection refused)" for i in range(10))
    assert line == f"no backend available in pool web: {listed}, and 3 more"
