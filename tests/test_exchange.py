"""The upstream exchange (pool/exchange.py): what it writes, and when a backend
connection goes back to the pool.

A connection is reused only after its response was read to the end by its framing;
every other ending closes it. A connection kept that should not be would hand the
rest of one response to the next request; one closed that could be kept costs a
handshake per request. Each test counts the backend's connections to tell which.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests
from backends import CLOSE, KEEP, ScriptedBackend, response, send
from conftest import ProxyFactory

from pyproxy.pool.errors import UnsendableRequest
from pyproxy.pool.exchange import request_head

ScriptedFactory = Callable[..., ScriptedBackend]
WAIT = 10


def chunked(body: bytes) -> bytes:
    return response(
        200,
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        [("Transfer-Encoding", "chunked")],
        content_length=False,
    )


KEPT = {
    "/length": response(200, b"hello"),
    "/empty": response(200, b""),
    "/chunked": chunked(b"hello"),
    "/no-content": response(204, b"", content_length=False),
    "/not-modified": response(304, b"", [("ETag", '"x"')], content_length=False),
}


@pytest.mark.parametrize("path", sorted(KEPT))
def test_a_response_read_to_its_end_gives_its_connection_back(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory, path: str
) -> None:
    backend = make_scripted_backend({path: [send(KEPT[path]), KEEP]})
    proxy = make_proxy([backend], threads=1)  # one worker: one request at a time
    for _ in range(3):
        assert requests.get(proxy.proxy_url + path, timeout=WAIT).status_code in (200, 204, 304)
    assert [r.connection for r in backend.received] == [1, 1, 1]


def test_a_head_answer_gives_its_connection_back(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    # A HEAD answer carries Content-Length but no body (RFC 9110 §9.3.2): http.client's
    # read1 never closes such a response by itself; the exchange must.
    head_answer = response(200, b"", [("Content-Length", "42")], content_length=False)
    backend = make_scripted_backend({"/": [send(head_answer), KEEP]})
    proxy = make_proxy([backend], threads=1)
    for _ in range(3):
        assert requests.head(proxy.proxy_url + "/", timeout=WAIT).status_code == 200
    assert [r.connection for r in backend.received] == [1, 1, 1]


def test_a_connection_the_backend_closes_is_not_reused(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    closing = response(200, b"bye", [("Connection", "close")])
    backend = make_scripted_backend({"/": [send(closing), CLOSE]})
    proxy = make_proxy([backend], threads=1)
    for _ in range(2):
        assert requests.get(proxy.proxy_url + "/", timeout=WAIT).text == "bye"
    assert [r.connection for r in backend.received] == [1, 2]


def test_a_body_cut_short_closes_its_connection_and_the_next_request_gets_a_new_one(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"
    backend = make_scripted_backend({"/cut": [send(cut), CLOSE]})
    proxy = make_proxy([backend], threads=1)
    with pytest.raises(requests.RequestException):
        requests.get(proxy.proxy_url + "/cut", timeout=WAIT).content  # noqa: B018
    assert requests.get(proxy.proxy_url + "/next", timeout=WAIT).text == "default\n"
    assert [r.connection for r in backend.received] == [1, 2]


def test_a_small_body_goes_out_with_the_head_and_arrives_whole(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    backend = make_scripted_backend({})
    proxy = make_proxy([backend])
    for body in (b"x" * 10, b"y" * 200_000):  # one sendall, then head and body apart
        answer = requests.post(proxy.proxy_url + "/upload", data=body, timeout=WAIT)
        assert answer.status_code == 200
        raw = backend.received[-1].raw
        assert raw.endswith(b"\r\n\r\n" + body)
        assert f"Content-Length: {len(body)}\r\n".encode() in raw


def test_a_bodiless_post_says_content_length_0() -> None:
    # RFC 9110 §8.6: a request whose method defines a body, sent without one.
    head = request_head("POST", "/", {"Host": "b"}, None)
    assert head == b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n"
    assert b"Content-Length" not in request_head("GET", "/", {"Host": "b"}, None)


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/a b", {}),  # a space would end the target early
        ("GET", "/a\r\nX: y", {}),  # a line break would add a header
        ("G\x00T", "/", {}),  # the method is a token
        ("GET", "/", {"X\r\nY": "z"}),  # a name with a line break
        ("GET", "/", {"X Y": "z"}),  # a name that is not a token
        ("GET", "/", {"X": "a\nb"}),  # a bare LF in a value
        ("GET", "/", {"X": "a\x00b"}),  # a NUL in a value
    ],
)
def test_a_head_that_would_change_meaning_on_the_wire_is_never_written(
    method: str, target: str, headers: dict[str, str]
) -> None:
    with pytest.raises(UnsendableRequest):
        request_head(method, target, {"Host": "b", **headers}, None)
