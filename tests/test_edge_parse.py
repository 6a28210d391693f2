"""The request head is parsed in one pass, into what waitress's parser would make of it.

StrictRequestParser checks a head, then fills waitress's fields (`headers`, `path`,
`content_length`, ...) itself when every line is valid, instead of handing the head to
waitress to split and match again. waitress stays the reference: for any head the
strict parser accepts, the fields are waitress's own. A head with a fault takes the
line-by-line path, so refusals name the same fault as before (tests/test_edge_requests.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import waitress.parser
from rawhttp import RawClient
from waitress.adjustments import Adjustments
from waitress.parser import HTTPRequestParser

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge import parser
from pyproxy.edge.parser import StrictRequestParser
from pyproxy.edge.server import EdgeServer

WAIT = 10.0
ADJ = Adjustments(max_request_body_size=1001, max_request_header_size=8193)
FIELDS = (
    "command", "request_uri", "path", "query", "version", "url_scheme", "proxy_scheme",
    "proxy_netloc", "fragment", "chunked", "content_length", "expect_continue",
    "connection_close", "completed", "headers",
)  # fmt: skip

ACCEPTED = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a%20b?x=1&y=%2F HTTP/1.1\r\nHost: example.test:8080\r\nAccept: */*\r\n\r\n",
    b"GET //double/slash?q HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://Example.test:80/p?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: h\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nhOsT: h\r\nConnection: close\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nabcde",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 005\r\n\r\nabcde",
    b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:  Chunked \r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\nx-a: b\r\nX-A:\r\nX-B: \t v \t w \t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX_Hidden: dropped\r\nX-Shown: kept\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Latin: caf\xe9 \xff\r\nUser-Agent: a/1 (b; c)\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-N%d: v\r\n" % i for i in range(99)) + b"\r\n",
]


def parsed(parser_class: type[HTTPRequestParser], data: bytes) -> dict[str, Any]:
    request = parser_class(ADJ)
    request.received(data)
    assert request.error is None, request.error
    result = {name: getattr(request, name) for name in FIELDS}
    result["body"] = request.get_body_stream().read()
    return result


@pytest.mark.parametrize("data", ACCEPTED)
def test_an_accepted_head_parses_as_waitress_parses_it(data: bytes) -> None:
    assert parsed(StrictRequestParser, data) == parsed(HTTPRequestParser, data)


def test_repeated_cookies_are_joined_as_a_cookie_list_not_as_other_fields() -> None:
    data = b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"
    strict, lenient = parsed(StrictRequestParser, data), parsed(HTTPRequestParser, data)
    assert strict["headers"].pop("COOKIE") == "a=1; b=2"
    assert lenient["headers"].pop("COOKIE") == "a=1, b=2"
    assert strict == lenient


def test_a_refusal_before_the_fields_were_taken_echoes_no_request_id() -> None:
    request = StrictRequestParser(ADJ)
    request.received(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Request-ID: r1\r\n\r\n")
    assert request.error is not None and "repeated Host" in request.error.body
    assert request.headers == {}


def test_the_field_name_cache_is_bounded() -> None:
    for n in range(parser._FIELD_KEYS_MAX + 50):
        assert parser._field_keys(b"X-Name-%d" % n) == (b"x-name-%d" % n, f"X_NAME_{n}")
    assert len(parser._FIELD_KEYS) <= parser._FIELD_KEYS_MAX


# -- through a socket: split once, refusals unchanged -------------------------------


def echo_path(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = f"{environ['PATH_INFO']} {environ.get('HTTP_X_A', '-')}".encode("latin-1")
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture
def server() -> Iterator[EdgeServer]:
    limits = LimitsConfig(client_idle_timeout=30.0, header_timeout=30.0, send_timeout=30.0)
    edge = EdgeServer(echo_path, "127.0.0.1", 0, threads=2, limits=limits)
    loop = threading.Thread(target=edge.serve_forever, name="test-parse-loop")
    loop.start()
    yield edge
    edge.close()
    loop.join(WAIT)


@pytest.fixture
def splits(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Heads that waitress split into lines itself."""
    seen: list[bytes] = []
    original = waitress.parser.get_header_lines

    def counted(header: bytes) -> list[bytes]:
        seen.append(header)
        return original(header)  # type: ignore[no-any-return]

    monkeypatch.setattr(waitress.parser, "get_header_lines", counted)
    return seen


def test_a_valid_head_is_split_once_by_the_edge_alone(
    server: EdgeServer, splits: list[bytes]
) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(b"GET /caf%C3%A9 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
        response = client.read_response()
    assert (response.status, response.body) == (200, "/caf\xc3\xa9 1, 2".encode("latin-1"))
    assert splits == []


def test_a_faulty_head_is_still_refused_with_its_reason(
    server: EdgeServer, splits: list[bytes]
) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n")
        response = client.read_response()
    assert response.status == 400
    assert b"Bare CR or LF found in header line" in response.body
    assert len(splits) == 1  # waitress's line-by-line parse named it
