"""Keep-alive holds: an HTTP/1.1 client keeps its connection across every answer that
does not require closing it (RFC 9112 §9.3: persistence is the default in HTTP/1.1).

Each test sends two requests on one raw client connection and asserts that the first
answer does not announce a close and the second request is answered on the same
socket. What must close: a framing error (400), after which the server cannot know
where the next request starts (RFC 9112 §9.3, §11.2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backends import CLOSE, HANG, KEEP, EchoBackend, ScriptedBackend, closed_port, response, send
from conftest import ProxyFactory
from rawhttp import RawClient, RawResponse, request_bytes

from pyproxy.config.schema import BackendConfig, Rate, RateLimitConfig, Timeouts

ScriptedFactory = Callable[..., ScriptedBackend]


def twice(url: str, first: bytes, method: str = "GET") -> tuple[RawResponse, RawResponse]:
    """`first`, then a plain GET, on one connection; both answers."""
    with RawClient.to(url) as client:
        client.send(first)
        one = client.read_response(method)
        assert one.complete, one
        assert (one.header("Connection") or "").lower() != "close", one.headers
        client.send(request_bytes("GET", "/"))
        return one, client.read_response()


def get(path: str, **kw: Any) -> bytes:
    return request_bytes("GET", path, **kw)


def test_keep_alive_after_a_chunked_response(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    chunked = response(200, b"5\r\nhello\r\n0\r\n\r\n", [("Transfer-Encoding", "chunked")],
                       content_length=False)  # fmt: skip
    backend = make_scripted_backend({"/chunked": [send(chunked), KEEP]})
    one, two = twice(make_proxy([backend]).proxy_url, get("/chunked"))
    assert (one.status, one.framing, one.body) == (200, "chunked", b"hello")
    assert two.status == 200


def test_keep_alive_after_204_and_304(make_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    url = make_proxy([echo_backend]).proxy_url
    for status in (204, 304):
        one, two = twice(url, get(f"/status/{status}"))
        assert one.status == status and two.status == 200


def test_keep_alive_after_a_head_answer(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    one, two = twice(make_proxy([echo_backend]).proxy_url, request_bytes("HEAD", "/"), "HEAD")
    assert one.status == 200 and one.body == b""
    assert two.status == 200


def test_a_backend_closing_its_connection_does_not_close_the_clients(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    # `Connection` is hop-by-hop (RFC 9110 §7.6.1): the backend's close is about the
    # proxy's upstream connection, not the client's.
    closing = response(200, b"bye\n", [("Connection", "close")])
    backend = make_scripted_backend({"/closing": [send(closing), CLOSE]})
    one, two = twice(make_proxy([backend]).proxy_url, get("/closing"))
    assert (one.status, one.body) == (200, b"bye\n")
    assert two.status == 200


def test_a_close_delimited_backend_body_is_relayed_framed_and_keeps_the_client(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    # No Content-Length, no chunked: the body ends when the backend closes (RFC 9112
    # §6.3 item 8). The client gets it chunked, and its connection stays open.
    unframed = response(200, b"until close\n", [("Connection", "close")], content_length=False)
    backend = make_scripted_backend({"/unframed": [send(unframed), CLOSE]})
    one, two = twice(make_proxy([backend]).proxy_url, get("/unframed"))
    assert (one.status, one.framing, one.body) == (200, "chunked", b"until close\n")
    assert two.status == 200


def test_keep_alive_after_pyproxys_own_502_and_504(
    make_proxy: ProxyFactory, make_scripted_backend: ScriptedFactory
) -> None:
    hanging = make_scripted_backend({"/hang": [HANG]})
    proxy = make_proxy([hanging], timeouts=Timeouts(connect=1.0, read=0.3, total=5.0))
    one, two = twice(proxy.proxy_url, get("/hang"))
    assert one.status == 504 and two.status == 200
    refused = make_proxy([BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name="dead")])
    one, two = twice(refused.proxy_url, get("/"))
    assert one.status == 502 and two.status == 502


def test_keep_alive_after_503_no_backend(make_proxy: ProxyFactory) -> None:
    one, two = twice(make_proxy([]).proxy_url, get("/"))
    assert one.status == 503 and two.status == 503


def test_keep_alive_after_429(make_proxy: ProxyFactory, echo_backend: EchoBackend) -> None:
    proxy = make_proxy([echo_backend], rate_limit=RateLimitConfig(per_client=Rate(1, 3600.0)))
    with RawClient.to(proxy.proxy_url) as client:
        statuses = []
        for _ in range(3):
            client.send(get("/"))
            answer = client.read_response()
            assert (answer.header("Connection") or "").lower() != "close"
            statuses.append(answer.status)
    assert statuses == [200, 429, 429]


def test_keep_alive_after_a_404_from_the_admin_listener(make_proxy: ProxyFactory) -> None:
    one, two = twice(make_proxy([]).admin_url, get("/admin/nothing"))
    assert one.status == 404 and two.status in (200, 404)


def test_a_framing_error_closes_the_connection(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    smuggle = get("/", headers=[("Content-Length", "3"), ("Transfer-Encoding", "chunked")])
    with RawClient.to(make_proxy([echo_backend]).proxy_url) as client:
        client.send(smuggle + b"0\r\n\r\n")
        answer = client.read_response()
        assert answer.status == 400
        assert answer.header("Connection") == "close"
        assert client.closed_by_peer(timeout=5.0)
