"""When things go wrong: broken backends, timeouts, refusals, pyproxy's own errors.

The misbehaving backend is a raw socket whose bytes each test scripts; it counts the
connections it accepted, which is how a test proves that a broken upstream connection
was discarded rather than pooled (the next request must arrive on a new one).
Retries and the circuit breaker are off (see conftest), so one request is one attempt.
"""

from __future__ import annotations

import dataclasses
import http
import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from backends import (
    CLOSE,
    HANG,
    KEEP,
    RESET,
    EchoBackend,
    ScriptedBackend,
    closed_port,
    response,
    send,
    trickle,
)
from conftest import ProxyFactory
from rawhttp import RawClient, RawResponse, exchange, request_bytes

from pyproxy.config.schema import BackendConfig, LimitsConfig, RetryConfig, Timeouts
from pyproxy.process.service import Service

OK = [send(response(200, b"fine\n")), KEEP]

# Responses that must never be relayed: a 101 nobody asked for (RFC 9110 §15.2.2), a status
# outside 100-599 (RFC 9112 §4, RFC 9110 §15), framing that cannot be trusted (RFC 9112
# §6.3). After one the connection's state is unknown, so each is followed by a request
# that must get its own, new connection.
BROKEN = {
    "/switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"
    + response(200, b"leftover\n"),
    "/bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "/status-999": b"HTTP/1.1 999 Nine\r\nContent-Length: 2\r\n\r\nok",
    "/not-http": b"hello, this is not HTTP\r\n\r\n",
    "/cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "/two-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
    "/cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 7\r\n\r\nhello!!",
    "/bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello",
    "/negative-cl": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "/te-unknown": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
}


@pytest.fixture
def scripted(make_scripted_backend: Callable[..., ScriptedBackend]) -> ScriptedBackend:
    scripts = {path: [send(data), KEEP] for path, data in BROKEN.items()}
    scripts.update(
        {
            "/ok": OK,
            "/reset": [RESET],
            "/close": [CLOSE],
            "/hang": [HANG],
            "/half-cl": [
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50),
                CLOSE,
            ],
            "/half-cl-reset": [
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50),
                RESET,
            ],
            "/headers-then-close": [send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"), CLOSE],
            "/half-chunked": [
                send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
                CLOSE,
            ],
            "/trickle": [trickle(response(200, b"too late\n"), 0.05)],
        }
    )
    return make_scripted_backend(scripts, name="scripted")


@pytest.fixture
def proxy(make_proxy: ProxyFactory, scripted: ScriptedBackend) -> Service:
    return make_proxy([scripted])


def backend_state(service: Service, name: str) -> tuple[int, int]:
    """(requests_total, failures_total) as pyproxy counts them."""
    backend = next(b for b in service.holder.runtime.backends if b.name == name)
    snapshot = backend.snapshot()
    return snapshot.requests_total, snapshot.failures_total


def assert_error_body(answer: RawResponse, status: int) -> None:
    """pyproxy's own error answers: a text/plain `<code> <reason>: <why>` line and an
    X-Request-ID (pyproxy's own format, written by pyproxy/proxy/answers.py)."""
    assert answer.status == status, (answer.status, answer.body)
    content_type = answer.header("Content-Type") or ""
    assert content_type.split(";")[0].strip() == "text/plain", content_type
    # RFC 9110 renamed 413 "Content Too Large"; Python 3.11 still has the old phrase.
    phrases = {http.HTTPStatus(status).phrase, {413: "Content Too Large"}.get(status, "")}
    text = answer.body.decode()
    pattern = "|".join(re.escape(p) for p in phrases if p)
    assert re.fullmatch(rf"{status} ({pattern}): \S.*\n?", text), text
    request_id = answer.header("X-Request-ID")
    assert request_id and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", request_id)


# -- broken responses -------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(BROKEN))
def test_a_broken_response_is_a_502_and_its_connection_is_not_reused(
    proxy: Service, scripted: ScriptedBackend, path: str
) -> None:
    with RawClient.to(proxy.proxy_url) as client:
        client.send(request_bytes("GET", path))
        first = client.read_response()
        if "close" not in (first.header("Connection") or "").lower():
            client.send(request_bytes("GET", "/ok"))
            second = client.read_response()
        else:
            second = exchange(proxy.proxy_url, request_bytes("GET", "/ok"))

    assert_error_body(first, 502)
    assert b"leftover" not in first.body
    # The next request gets its own answer, on a new upstream connection: the bytes
    # left on the broken one (e.g. what followed a 101) belong to nobody.
    assert second.status == 200 and second.body == b"fine\n"
    received = scripted.requests()
    assert [r.request_line.split(" ")[1] for r in received] == [path, "/ok"]
    assert received[1].connection == 2
    assert scripted.connections == 2


def test_a_reset_before_the_response_is_a_502(proxy: Service) -> None:
    assert_error_body(exchange(proxy.proxy_url, request_bytes("GET", "/reset")), 502)


def test_a_close_before_the_response_is_a_502(proxy: Service) -> None:
    assert_error_body(exchange(proxy.proxy_url, request_bytes("GET", "/close")), 502)


def test_a_refused_connection_is_a_502(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy([BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name="gone")])

    answer = exchange(
        proxy.proxy_url, request_bytes("GET", "/x", headers=[("X-Request-ID", "trace-me-1")])
    )

    assert_error_body(answer, 502)
    assert answer.values("X-Request-ID") == ["trace-me-1"]


# -- a backend dying mid-body -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/half-cl", "/half-cl-reset", "/headers-then-close"])
def test_a_backend_dying_mid_body_truncates_the_client_response(
    proxy: Service, scripted: ScriptedBackend, path: str
) -> None:
    with RawClient.to(proxy.proxy_url) as client:
        client.send(request_bytes("GET", path))
        answer = client.read_response()
        assert answer.status == 200
        # Never a "complete" short body: by its framing the client can tell it was cut.
        assert not answer.complete, (answer.framing, answer.headers, len(answer.body))
        if answer.framing == "length":
            assert answer.header("Content-Length") == "100"
            assert len(answer.body) < 100
        assert client.closed_by_peer()
    assert backend_state(proxy, "scripted")[1] == 1  # counted as a failure of the backend


def test_a_chunked_body_cut_short_never_gets_its_last_chunk(proxy: Service) -> None:
    with RawClient.to(proxy.proxy_url) as client:
        client.send(request_bytes("GET", "/half-chunked"))
        answer = client.read_response()

    assert answer.status == 200
    assert answer.framing in ("chunked", "length")
    assert not answer.complete
    assert answer.body in (b"", b"hello")


def test_the_next_request_after_a_truncation_is_served_whole(
    proxy: Service, scripted: ScriptedBackend
) -> None:
    exchange(proxy.proxy_url, request_bytes("GET", "/half-cl"))
    answer = exchange(proxy.proxy_url, request_bytes("GET", "/ok"))

    assert answer.status == 200 and answer.body == b"fine\n" and answer.complete
    assert scripted.requests()[-1].connection == 2


# -- timeouts ----------------------------------------------------------------------------


def test_a_backend_that_never_answers_is_a_504_within_the_read_timeout(
    make_proxy: ProxyFactory, scripted: ScriptedBackend
) -> None:
    proxy = make_proxy([scripted], timeouts=Timeouts(connect=1.0, read=0.5, total=10.0))

    started = time.monotonic()
    answer = exchange(proxy.proxy_url, request_bytes("GET", "/hang"))
    elapsed = time.monotonic() - started

    assert_error_body(answer, 504)
    assert 0.4 <= elapsed < 3.0


def test_the_total_deadline_cuts_a_wait_shorter_than_the_read_timeout(
    make_proxy: ProxyFactory, scripted: ScriptedBackend
) -> None:
    proxy = make_proxy([scripted], timeouts=Timeouts(connect=1.0, read=5.0, total=0.6))

    started = time.monotonic()
    answer = exchange(proxy.proxy_url, request_bytes("GET", "/hang"))
    elapsed = time.monotonic() - started

    assert_error_body(answer, 504)
    assert 0.5 <= elapsed < 2.5


def test_the_total_deadline_holds_against_a_backend_trickling_its_headers(
    make_proxy: ProxyFactory, scripted: ScriptedBackend
) -> None:
    # requests' read timeout is per socket read, not a deadline (requests docs, "Timeouts":
    # the time the client waits between bytes). One byte every 50 ms never trips
    # a 1 s read timeout; only a deadline pyproxy enforces itself stops it. The whole
    # response takes ~2.2 s to trickle out.
    proxy = make_proxy([scripted], timeouts=Timeouts(connect=1.0, read=1.0, total=0.8))

    started = time.monotonic()
    answer = exchange(proxy.proxy_url, request_bytes("GET", "/trickle"))
    elapsed = time.monotonic() - started

    assert_error_body(answer, 504)
    assert elapsed < 1.9


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: new connections get no SYN-ACK, so a
    connect attempt times out (Linux drops the SYN)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.settimeout(0.2)
        fillers.append(filler)
        try:
            filler.connect(("127.0.0.1", port))
        except TimeoutError:
            break
    else:
        # Linux drops SYNs to a full accept queue; elsewhere this test cannot make a
        # connect timeout, and must say so rather than pass without asserting.
        pytest.fail("could not fill the accept queue on this system")
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


def test_a_connect_timeout_is_a_504(make_proxy: ProxyFactory, full_backlog: int) -> None:
    proxy = make_proxy(
        [BackendConfig(url=f"http://127.0.0.1:{full_backlog}", name="full")],
        timeouts=Timeouts(connect=0.4, read=2.0, total=10.0),
    )

    started = time.monotonic()
    answer = exchange(proxy.proxy_url, request_bytes("GET", "/x"))
    elapsed = time.monotonic() - started

    assert_error_body(answer, 504)
    assert 0.3 <= elapsed < 2.5


# -- no backend --------------------------------------------------------------------------


def test_no_backends_is_a_503_with_retry_after(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy([])

    answer = exchange(proxy.proxy_url, request_bytes("GET", "/x"))

    assert_error_body(answer, 503)
    retry_after = answer.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit()


def test_only_drained_backends_is_a_503_and_they_get_nothing(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = make_proxy([BackendConfig(url=echo_backend.url, name="drained", weight=0)])

    answer = exchange(proxy.proxy_url, request_bytes("GET", "/x"))

    assert_error_body(answer, 503)
    assert answer.header("Retry-After") is not None
    assert echo_backend.requests() == []


# -- refused methods ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("CONNECT", "127.0.0.1:{port}"),
        ("CONNECT", "/"),
        ("CONNECT", "http://127.0.0.1:{port}/"),
        ("TRACE", "/"),
        ("TRACE", "http://127.0.0.1:{port}/x"),
        ("TRACE", "*"),
    ],
)
def test_connect_and_trace_are_405_and_nothing_is_forwarded(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, method: str, target: str
) -> None:
    proxy = make_proxy([echo_backend])

    answer = exchange(proxy.proxy_url, request_bytes(method, target.format(port=echo_backend.port)))

    assert_error_body(answer, 405)
    assert echo_backend.requests() == []
    assert echo_backend.connections == 0


def test_a_loop_answer_has_the_error_format(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = make_proxy([echo_backend])
    via = f"1.1 {proxy.instance_name}"

    answer = exchange(proxy.proxy_url, request_bytes("GET", "/x", headers=[("Via", via)]))

    assert_error_body(answer, 508)
    assert echo_backend.requests() == []


# -- a backend's own error answers ----------------------------------------------------------


def test_a_backend_503_reaches_the_client_as_it_is(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    direct = make_proxy([echo_backend])

    answer = exchange(direct.proxy_url, request_bytes("GET", "/status/503"))

    assert answer.status == 503
    assert answer.body == b"status 503 from echo\n"
    assert answer.header("X-Backend") == "echo"


def test_after_retries_the_last_backend_answer_reaches_the_client_as_it_is(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    # When the last attempt got an HTTP response (a 503 after all retries), that response
    # goes to the client as it is, as nginx does once proxy_next_upstream tries run out:
    # the backend's Retry-After and error page beat one pyproxy would make up
    # (see docs/retries.md).
    first, second = make_echo_backend("app1"), make_echo_backend("app2")
    proxy = make_proxy([first, second], retries=dataclasses.replace(RetryConfig(), max_retries=2))

    answer = exchange(proxy.proxy_url, request_bytes("GET", "/status/503"))

    assert answer.status == 503
    assert re.fullmatch(rb"status 503 from app[12]\n", answer.body), answer.body
    assert answer.header("X-Backend") in ("app1", "app2")
    assert len(first.requests()) + len(second.requests()) >= 2  # it was retried


# -- requests refused before any backend ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        # The classic smuggling request: both framings (RFC 9112 §6.3).
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET x HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["cl-and-te", "chunked-twice", "te-on-1.0", "two-cl", "no-host", "two-hosts", "bad-target"],
)
def test_an_ambiguous_request_is_a_400_that_reaches_no_backend_and_closes(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, data: bytes
) -> None:
    proxy = make_proxy([echo_backend])

    with RawClient.to(proxy.proxy_url) as client:
        client.send(data)
        answer = client.read_response()
        assert client.closed_by_peer()

    assert_error_body(answer, 400)
    assert echo_backend.requests() == []
    assert echo_backend.connections == 0


def test_a_body_over_the_limit_is_a_413_that_reaches_no_backend(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    limits = dataclasses.replace(LimitsConfig(), max_request_body=1000)
    proxy = make_proxy([echo_backend], limits=limits)

    answer = exchange(proxy.proxy_url, request_bytes("POST", "/upload", body=b"x" * 2000))

    assert_error_body(answer, 413)
    assert echo_backend.requests() == []
