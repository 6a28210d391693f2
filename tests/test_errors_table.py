"""errors.classify: every way an upstream exchange fails, mapped to what it means.

Each row says: the `reason` label of proxy_errors_total (docs/metrics.md), the
`retry_on` condition (docs/retries.md), the status the client gets if it is the final
outcome, and whether the request may have reached the backend (only "certainly not" is
safe to retry for a POST: RFC 9110 §9.2.2). The first half constructs the exceptions;
the second half makes real sockets fail and checks that urllib3 raises what the table
expects, so the table cannot drift away from the library underneath it.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest
from backends import CLOSE, HANG, RESET, Blackhole, ScriptedBackend, closed_port, send, sleep
from urllib3 import exceptions as u3

from pyproxy.config.schema import BackendConfig, CircuitBreakerConfig, HealthCheckConfig
from pyproxy.pool import upstream
from pyproxy.pool.backend import Backend
from pyproxy.pool.errors import Failure, classify, error_body, status_failure
from pyproxy.runtime.snapshot import attempt_timeout

# (reason, condition, status, request_sent)
CONNECT_REFUSED = ("connect_error", "connect_error", 502, False)
CONNECT_TIMEOUT = ("connect_error", "connect_error", 504, False)
TLS = ("connect_error", "connect_error", 502, False)
TIMEOUT = ("timeout", "timeout", 504, True)
RESET_ROW = ("reset", "reset", 502, True)
BAD = ("bad_response", "reset", 502, True)


def row(failure: Failure) -> tuple[str, str | int, int, bool]:
    return failure.reason, failure.condition, failure.status, failure.request_sent


def _conn() -> object:
    return object()  # urllib3 only stores it


TABLE: list[tuple[str, BaseException, tuple[str, str, int, bool]]] = [
    ("refused", u3.NewConnectionError(_conn(), "Connection refused"), CONNECT_REFUSED),  # type: ignore[arg-type]
    (
        "dns",
        u3.NameResolutionError("nowhere.invalid", _conn(), socket.gaierror(-2, "no name")),  # type: ignore[arg-type]
        CONNECT_REFUSED,
    ),
    ("connect timeout", u3.ConnectTimeoutError(_conn(), "timed out"), CONNECT_TIMEOUT),
    ("tls", u3.SSLError("certificate verify failed"), TLS),
    ("read timeout", u3.ReadTimeoutError(None, "/", "Read timed out."), TIMEOUT),  # type: ignore[arg-type]
    ("socket timeout", TimeoutError("timed out"), TIMEOUT),
    (
        "reset",
        u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer")),
        RESET_ROW,
    ),
    (
        "closed",
        u3.ProtocolError(
            "Connection aborted.", http.client.RemoteDisconnected("closed without response")
        ),
        RESET_ROW,
    ),
    (
        "broken pipe",
        u3.ProtocolError("Connection aborted.", BrokenPipeError(32, "broken pipe")),
        RESET_ROW,
    ),
    (
        "cut short",
        u3.ProtocolError("Connection broken", http.client.IncompleteRead(b"abc", 97)),
        RESET_ROW,
    ),
    (
        "bad status line",
        u3.ProtocolError("Connection aborted.", http.client.BadStatusLine("HELLO")),
        BAD,
    ),
    (
        "line too long",
        u3.ProtocolError("Connection aborted.", http.client.LineTooLong("header line")),
        BAD,
    ),
    ("invalid header", u3.InvalidHeader("bad header"), BAD),
    ("header parsing", u3.HeaderParsingError([], b"junk"), BAD),
    ("http.client", http.client.UnknownProtocol("HTTP/9"), BAD),
    ("plain OSError", OSError(113, "no route to host"), RESET_ROW),
    ("connection reset", ConnectionResetError(104, "reset by peer"), RESET_ROW),
]


@pytest.mark.parametrize(
    ("exc", "expected"), [(e, x) for _, e, x in TABLE], ids=[t[0] for t in TABLE]
)
def test_classify_maps_each_exception(
    exc: BaseException, expected: tuple[str, str, int, bool]
) -> None:
    assert row(classify(exc)) == expected


def test_a_protocol_error_chained_by_context_is_judged_by_its_cause() -> None:
    """urllib3 may raise ProtocolError(msg) while handling the real error; the cause
    is then the exception's context, not its second argument."""
    try:
        try:
            raise http.client.BadStatusLine("garbage")
        except http.client.BadStatusLine:
            raise u3.ProtocolError("Connection aborted.")  # noqa: B904 (the point)
    except u3.ProtocolError as exc:
        assert row(classify(exc)) == BAD


def test_an_invalid_chunk_size_is_a_bad_response_not_a_reset() -> None:
    class FakeResponse:
        tell = staticmethod(lambda: 0)
        length_remaining = None

    invalid = u3.InvalidChunkLength(FakeResponse(), b"zz")  # type: ignore[arg-type]
    assert classify(u3.ProtocolError("Connection broken", invalid)).reason == "bad_response"


def test_anything_else_is_not_swallowed() -> None:
    """A bug in pyproxy must surface as a bug, not be dressed up as a 502."""
    with pytest.raises(ValueError, match="boom"):
        classify(ValueError("boom"))
    with pytest.raises(KeyError):
        classify(KeyError("x"))


def test_a_failure_status_is_relayed_with_its_own_code() -> None:
    failure = status_failure(503)
    assert row(failure) == ("upstream_status", 503, 503, True)


def test_error_body_is_short_plain_text() -> None:
    assert error_body(502, "connection refused") == b"502 Bad Gateway: connection refused\n"
    assert error_body(504, "x").startswith(b"504 Gateway Timeout: ")
    assert error_body(599, "x") == b"599 Error: x\n"


# -- what urllib3 really raises --------------------------------------------------------


SCRIPTS = {
    "/reset": [RESET],
    "/close": [CLOSE],
    "/hang": [HANG],
    "/garbage": [send(b"HELLO THERE\r\n\r\n"), CLOSE],
    "/long-header": [send(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"), CLOSE],
    "/cut": [send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"), CLOSE],
    "/cut-reset": [
        send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"),
        sleep(0.05),
        RESET,
    ],
    "/body-hang": [send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"), HANG],
}


@pytest.fixture
def scripted() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend(SCRIPTS)
    yield backend
    backend.close()


def make_backend(url: str) -> Backend:
    return Backend(
        BackendConfig(url=url, name="under-test"),
        pool_size=2,
        health=HealthCheckConfig(enabled=False),
        breaker=CircuitBreakerConfig(enabled=False),
    )


def failure_of(url: str, path: str = "/") -> Failure:
    """Send one GET through pyproxy's upstream code; the Failure it ends in."""
    backend = make_backend(url)
    try:
        try:
            response = upstream.send(
                backend, "GET", path, {"Host": "t"}, None, attempt_timeout(0.3, 0.3)
            )
        except Exception as exc:
            return classify(exc)
        relay = upstream.BodyRelay(response)
        for _ in relay:
            pass
        relay.close()
        assert relay.failure is not None, f"{path} unexpectedly succeeded"
        return relay.failure
    finally:
        backend.close()


def test_real_refusal() -> None:
    assert row(failure_of(f"http://127.0.0.1:{closed_port()}")) == CONNECT_REFUSED


def test_real_connect_timeout(blackhole: Blackhole) -> None:
    assert row(failure_of(blackhole.url)) == CONNECT_TIMEOUT


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/reset", RESET_ROW),
        ("/close", RESET_ROW),
        ("/hang", TIMEOUT),
        ("/garbage", BAD),
        ("/long-header", BAD),
    ],
)
def test_real_failures_before_the_headers(
    scripted: ScriptedBackend, path: str, expected: tuple[str, str, int, bool]
) -> None:
    assert row(failure_of(scripted.url, path)) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/cut", RESET_ROW), ("/cut-reset", RESET_ROW), ("/body-hang", TIMEOUT)],
)
def test_real_failures_in_the_middle_of_the_body(
    scripted: ScriptedBackend, path: str, expected: tuple[str, str, int, bool]
) -> None:
    assert row(failure_of(scripted.url, path)) == expected
