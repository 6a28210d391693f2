"""The edge against hostile requests: what it refuses, and what it passes on untouched.

Every test goes client -> real pyproxy -> real backend, through sockets. A refusal is
proven twice: the client gets the error, and the backend received nothing. What the
edge accepts must reach the backend byte for byte: the upstream client (http.client
under urllib3) refuses to send some bytes, and a request the edge let through but
the upstream client refused would be blamed on the backend.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest
from backends import EchoBackend, wait_for
from conftest import ProxyFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawhttp import RawClient, RawResponse, exchange, request_bytes

from pyproxy.config.schema import LimitsConfig
from pyproxy.process.service import Service
from pyproxy.wsgi import EdgeRefusal

WAIT = 5.0


def send_raw(proxy: Service, data: bytes) -> RawResponse:
    return exchange(proxy.proxy_url, data, timeout=WAIT)


def assert_refused(proxy: Service, backend: EchoBackend, data: bytes, status: int = 400) -> None:
    response = send_raw(proxy, data)
    assert response.status == status, (data, response)
    assert response.header("Connection") == "close"
    assert backend.requests() == [], "a refused request reached the backend"


# -- 1. the request line ----------------------------------------------------------


# RFC 9112 §3.2 / RFC 3986 §2: a target is ASCII graphic characters only. http.client
# refuses [\x00-\x20\x7f] in a target and encodes it as ASCII (so nothing >= 0x80).
BAD_TARGET_BYTES = [b"\x00", b"\x01", b"\x1b", b"\x7f", b"\t", b"\x0b", b"\x80", b"\xe9", b"\xff"]


@pytest.mark.parametrize("byte", BAD_TARGET_BYTES, ids=lambda b: f"0x{b[0]:02x}")
@pytest.mark.parametrize("where", ["path", "query"])
def test_target_bytes_outside_rfc_3986_are_refused_at_the_edge(
    proxy: Service, echo_backend: EchoBackend, byte: bytes, where: str
) -> None:
    target = b"/a" + byte + b"b" if where == "path" else b"/a?q=" + byte
    assert_refused(proxy, echo_backend, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"GET /a b HTTP/1.1",  # space inside the target
        b"GET  / HTTP/1.1",  # two spaces
        b"GET / HTTP/1.1 ",  # trailing space (waitress strips it)
        b"GET / HTTP/1.1\x0b",  # trailing VT (waitress strips it)
        b"GET / HTTP/1.1\r",  # bare CR before the CRLF
        b"GET\t/ HTTP/1.1",
        b"GET / http/1.1",
        b"G\x7fT / HTTP/1.1",
        b"GET http://exa\x7fmple/ HTTP/1.1",
    ],
)
def test_malformed_request_lines_are_refused(
    proxy: Service, echo_backend: EchoBackend, line: bytes
) -> None:
    assert_refused(proxy, echo_backend, line + b"\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    "header",
    [
        b"X-A: a\x00b",  # NUL
        b"X-A: a\rb",  # bare CR
        b"X-A: a\x7fb",  # DEL
        b"X-A: a\x01b",
        b"X A: b",  # a space in the name
        b"X-A : b",  # whitespace before the colon (RFC 9112 §5.1: MUST reject)
        b"X-(A): b",  # not a token
        b"no colon here",
        b"X-\xe9: b",
    ],
)
def test_invalid_header_lines_are_refused(
    proxy: Service, echo_backend: EchoBackend, header: bytes
) -> None:
    assert_refused(proxy, echo_backend, b"GET / HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")


def test_obs_text_in_a_header_value_reaches_the_backend_byte_for_byte(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    # RFC 9110 §5.5: obs-text is allowed in field values; http.client sends latin-1.
    response = send_raw(proxy, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: caf\xe9 \x80\xff\r\n\r\n")
    assert response.status == 200
    (received,) = echo_backend.requests()
    assert received.header("X-A") == "caf\xe9 \x80\xff"  # http.server decodes latin-1


@pytest.mark.parametrize(
    "target",
    [
        "http://exa mple/",
        'http://a"b/',
        "http://:80/",  # RFC 9110 §4.2.1: an http URI with an empty host is invalid
        "http://a:b/",  # a port that is not a number
    ],
)
def test_absolute_form_with_an_invalid_authority_is_refused(
    proxy: Service, echo_backend: EchoBackend, target: str
) -> None:
    assert_refused(proxy, echo_backend, request_bytes("GET", target))


# Half any bytes (mostly refused), half visible ASCII (mostly forwarded).
VISIBLE_ASCII = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tail=st.one_of(st.binary(max_size=12), VISIBLE_ASCII.map(str.encode)))
def test_a_target_is_refused_at_the_edge_or_reaches_the_backend_byte_for_byte(
    proxy: Service, echo_backend: EchoBackend, tail: bytes
) -> None:
    target = b"/" + tail
    seen = len(echo_backend.requests())
    response = send_raw(proxy, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    if response.status == 400:
        assert len(echo_backend.requests()) == seen, "refused, yet it reached the backend"
        return
    assert response.status == 200, (target, response)
    received = echo_backend.requests()[-1]
    assert received.request_line.encode("latin-1") == b"GET " + target + b" HTTP/1.1"


# -- 2. origin-form is origin-form ----------------------------------------------------


@pytest.mark.parametrize("target", ["//x/y", "//x/a://b", "/a://b", "//x/a?u=http://y/"])
def test_a_target_starting_with_a_slash_is_a_path_and_never_sets_host(
    proxy: Service, echo_backend: EchoBackend, target: str
) -> None:
    response = send_raw(proxy, request_bytes("GET", target, host="client.example"))
    assert response.status == 200
    (received,) = echo_backend.requests()
    # The request line, not the parsed target: http.server collapses a leading "//".
    assert received.request_line == f"GET {target} HTTP/1.1"
    assert received.header("Host") == "client.example"


def test_absolute_form_is_recognised_whatever_the_case_of_the_scheme(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    response = send_raw(proxy, request_bytes("GET", "HTTP://named.example/p?q", host="other"))
    assert response.status == 200
    (received,) = echo_backend.requests()
    assert received.request_line == "GET /p?q HTTP/1.1"
    assert received.header("Host") == "named.example"


# -- 3. a Host for every forwarded request --------------------------------------------


def test_http_1_0_without_host_reaches_the_backend_with_the_listeners_address(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    response = send_raw(proxy, b"GET /old HTTP/1.0\r\n\r\n")
    assert response.status == 200
    (received,) = echo_backend.requests()
    host, port = proxy.proxy_server.address
    assert received.header("Host") == f"{host}:{port}"


def test_an_empty_host_is_replaced_by_the_listeners_address(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    # RFC 9112 §3.3: without a Host value, the authority is the server's configured
    # name and its port.
    response = send_raw(proxy, b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
    assert response.status == 200
    (received,) = echo_backend.requests()
    host, port = proxy.proxy_server.address
    assert received.header("Host") == f"{host}:{port}"


# -- 4. request bodies over the limit are refused at once -----------------------------


@pytest.fixture
def small_proxy(make_proxy: ProxyFactory, echo_backend: EchoBackend) -> Service:
    limits = dataclasses.replace(LimitsConfig(), max_request_body=100_000, max_request_header=4096)
    return make_proxy([echo_backend], limits=limits)


def test_expect_100_continue_over_the_limit_gets_413_without_a_100(
    small_proxy: Service, echo_backend: EchoBackend
) -> None:
    head = request_bytes("POST", "/up", headers=[("Expect", "100-continue")])
    head = head.replace(b"\r\n\r\n", b"\r\nContent-Length: 100001\r\n\r\n")
    with RawClient.to(small_proxy.proxy_url, WAIT) as client:
        client.send(head)
        first = client.read_head()  # a 100 here would invite the client to send it all
        assert first.status == 413
        assert first.header("Connection") == "close"
    assert echo_backend.requests() == []


def test_expect_100_continue_within_the_limit_still_gets_its_100(
    small_proxy: Service, echo_backend: EchoBackend
) -> None:
    head = request_bytes("POST", "/up", headers=[("Expect", "100-continue")])
    head = head.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n")
    with RawClient.to(small_proxy.proxy_url, WAIT) as client:
        client.send(head)
        assert client.read_head().status == 100
        client.send(b"hello")
        assert client.read_response("POST").status == 200
    assert echo_backend.requests()[0].body == b"hello"


CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"ffffffffffffffffff\r\n", 413),  # one chunk larger than the limit
        (b"fffffffffffffffffffffffffff", 413),  # a size line that never ends
        (b"10000\r\n" + b"x" * 0x10000 + b"\r\n10000\r\n", 413),  # the sum goes over
        (b"0" * 5000, 400),  # a size line of leading zeros that never ends
        (b"1;" + b"e" * 5000, 400),  # a chunk extension that never ends
        (b"0\r\nX-T: " + b"t" * 5000, 431),  # a trailer section that never ends
        (b"5\n\r\nhello\r\n0\r\n\r\n", 400),  # a bare LF ends the size line
        (b"5;a=b\n\r\nhello\r\n0\r\n\r\n", 400),  # ... or the extension
        (b"5\r\nhello\n0\r\n\r\n", 400),  # data not followed by CRLF
        (b"5\r\nhello\r\n0\r\nX: a\nb\r\n\r\n", 400),  # a bare LF in the trailer
        (b"5\r\nhello\r\n0\r\nno colon\r\n\r\n", 400),  # not a field line
        (b" 5\r\nhello\r\n0\r\n\r\n", 400),  # whitespace before the size
    ],
    ids=[
        "huge-size",
        "endless-size",
        "sum-over",
        "endless-zeros",
        "endless-ext",
        "endless-trailer",
        "bare-lf-size",
        "bare-lf-ext",
        "no-crlf-after-data",
        "bare-lf-trailer",
        "bad-trailer",
        "space-before-size",
    ],
)
def test_chunked_bodies_too_large_or_malformed_are_refused_at_once(
    small_proxy: Service, echo_backend: EchoBackend, body: bytes, status: int
) -> None:
    with RawClient.to(small_proxy.proxy_url, WAIT) as client:
        client.send(CHUNKED_HEAD + body)  # and then nothing more: the answer must not wait
        response = client.read_response("POST")
        assert response.status == status, response
        assert client.closed_by_peer(WAIT)
    assert echo_backend.requests() == []


def test_a_chunked_body_within_the_limit_with_extensions_and_trailers_is_accepted(
    small_proxy: Service, echo_backend: EchoBackend
) -> None:
    body = b"3;name=value\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
    response = send_raw(small_proxy, CHUNKED_HEAD + body)
    assert response.status == 200
    assert echo_backend.requests()[0].body == b"abc"


# -- the rest of the class: header blocks -----------------------------------------------


def test_too_many_header_fields_are_refused(proxy: Service, echo_backend: EchoBackend) -> None:
    # Apache (LimitRequestFields) and HAProxy (tune.http.maxhdr) stop at about 100.
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(100))  # + Host = 101
    assert_refused(proxy, echo_backend, b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 431)


def test_ninety_header_fields_are_fine(proxy: Service, echo_backend: EchoBackend) -> None:
    # (Not 100: pyproxy adds its own, and http.server refuses more than 100.)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(90))
    response = send_raw(proxy, b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert response.status == 200


def test_a_refusal_answers_even_when_the_client_keeps_sending(
    small_proxy: Service, echo_backend: EchoBackend
) -> None:
    with socket.create_connection(_address(small_proxy), timeout=WAIT) as sock:
        sock.sendall(b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET / HTTP/1.1\r\n" * 50)
        assert sock.recv(12) == b"HTTP/1.1 400"
    assert echo_backend.requests() == []


def _address(proxy: Service) -> tuple[str, int]:
    host, port = proxy.proxy_server.address
    return host, port


# -- 7. what a refusal record holds ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "method", "target"),
    [
        (b"GET /a\x7fb?q=\x1b[2J HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/a\x7fb?q=\x1b[2J"),
        (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/a b"),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n", "POST", "/x"),
        (b"GET /long HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", "GET", "/long"),
    ],
    ids=["control-bytes", "space", "bad-header", "header-too-large"],
)
def test_a_refusal_record_holds_the_method_and_target_as_received(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, raw: bytes, method: str, target: str
) -> None:
    limits = dataclasses.replace(LimitsConfig(), max_request_header=4096)
    proxy = make_proxy([echo_backend], limits=limits)
    seen: list[EdgeRefusal] = []
    proxy.proxy_server.on_refused = seen.append  # the access log's feed, observed directly
    response = send_raw(proxy, raw)
    assert response.status in (400, 431)
    assert wait_for(lambda: bool(seen), WAIT)  # reported after the answer was written
    assert [(r.method, r.target) for r in seen] == [(method, target)]
