"""Forwarding: what the backend receives and what the client gets back.

Every test goes through real sockets (fixture backend <- real pyproxy <- real client)
and asserts on what crossed the wire: the echo backend's record of the bytes it read,
or the raw client's view of the response. Malformed or unusual requests go through
`rawhttp`, because `requests` normalises targets and adds headers of its own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import time
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path

import pytest
import requests
from backends import (
    COOKIES,
    GZIP_BODY,
    GZIP_PLAIN,
    SSE_EVENTS,
    EchoBackend,
    Received,
    ScriptedBackend,
    pattern_bytes,
    wait_for,
)
from conftest import ProxyFactory, access_log_text
from rawhttp import RawClient, exchange, request_bytes

from pyproxy.config.schema import BackendConfig
from pyproxy.process.service import Service

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
}
# What pyproxy itself adds to a request: Host (RFC 9112 §3.2), X-Forwarded-* (the de-facto
# headers nginx and HAProxy set), X-Request-ID and Via (RFC 9110 §7.6.3). Anything else
# must come from the client.
ADDED_BY_PROXY = {
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "via",
}
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def only(backend: EchoBackend) -> Received:
    """The one request the backend received."""
    received = backend.requests()
    assert len(received) == 1, [r.request_line for r in received]
    return received[0]


# -- the request line -----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/a/../b",
        "/a/./b//c/",
        "/files/a%2Fb",
        "/bad%zz",
        "/mixed%2F%zz/%41?x=%2F",
        "/q?x=%20a+b&&y=&z=%zz&w=a%26b",
        "/semi;jsessionid=1?q",
        "/~user/%7Euser/",
    ],
)
def test_raw_target_is_forwarded_byte_for_byte(
    proxy: Service, echo_backend: EchoBackend, target: str
) -> None:
    response = exchange(proxy.proxy_url, request_bytes("GET", target))

    assert response.status == 200
    assert only(echo_backend).target == target


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])
def test_method_is_forwarded_unchanged(
    proxy: Service, echo_backend: EchoBackend, method: str
) -> None:
    body = b"x" if method in ("POST", "PUT", "PATCH") else None
    response = exchange(proxy.proxy_url, request_bytes(method, "/m?k=v", body=body))

    assert response.status == 200
    assert only(echo_backend).request_line == f"{method} /m?k=v HTTP/1.1"


def test_options_asterisk_is_forwarded_as_asterisk(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    response = exchange(proxy.proxy_url, request_bytes("OPTIONS", "*"))

    assert response.status == 200
    assert only(echo_backend).request_line == "OPTIONS * HTTP/1.1"


def test_absolute_form_target_goes_to_the_configured_backend_with_its_authority_as_host(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    configured = make_echo_backend("configured")
    elsewhere = make_echo_backend("elsewhere")  # the target names it; it must not be reached
    proxy = make_proxy([configured])
    authority = f"127.0.0.1:{elsewhere.port}"

    response = exchange(
        proxy.proxy_url,
        request_bytes("GET", f"http://{authority}/p/../q?x=%2F", host="client.example"),
    )

    assert response.status == 200
    received = only(configured)
    assert received.target == "/p/../q?x=%2F"  # origin-form, raw
    assert received.header("Host") == authority
    assert elsewhere.requests() == []
    assert elsewhere.connections == 0


# -- hop-by-hop ---------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_stripped_including_those_named_in_connection(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    headers = [
        ("Connection", "keep-alive, X-Hop-Secret, x-other-hop"),
        ("X-Hop-Secret", "must not pass"),
        ("X-Other-Hop", "must not pass either"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic c2VjcmV0OnNlY3JldA=="),
        ("X-End-To-End", "passes"),
    ]
    response = exchange(proxy.proxy_url, request_bytes("GET", "/hop", headers=headers))

    assert response.status == 200
    received = only(echo_backend)
    names = received.header_names()
    leaked = names & (HOP_BY_HOP | {"x-hop-secret", "x-other-hop"})
    assert not leaked, received.headers
    assert received.header("X-End-To-End") == "passes"
    assert "c2VjcmV0" not in json.dumps(received.headers)


def test_hop_by_hop_response_headers_are_stripped_including_those_named_in_connection(
    proxy: Service,
) -> None:
    response = exchange(proxy.proxy_url, request_bytes("GET", "/hop"))

    assert response.status == 200
    assert response.body == b"hop\n"
    names = response.names()
    for name in (
        "x-private",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
        "trailer",
        "proxy-connection",
    ):
        assert name not in names, response.headers
    for value in response.values("Connection"):  # pyproxy's own, about the client connection
        assert "x-private" not in value.lower()
    assert response.header("X-Kept") == "yes"


def test_no_header_reaches_the_backend_that_the_client_did_not_send(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    # requests adds User-Agent, Accept-Encoding, Accept and Connection to every request
    # (requests.utils.default_headers()), and urllib3 its own User-Agent unless told
    # urllib3.util.SKIP_HEADER: none of them was sent by the client.
    response = exchange(proxy.proxy_url, request_bytes("GET", "/bare"))

    assert response.status == 200
    received = only(echo_backend)
    assert received.header_names() == ADDED_BY_PROXY, received.headers


def test_client_headers_pass_unchanged_and_once(proxy: Service, echo_backend: EchoBackend) -> None:
    headers = [
        ("User-Agent", "curl/8.5.0"),
        ("Accept-Encoding", "br"),
        ("Accept", "text/html"),
        ("Authorization", "Bearer abc.def"),
        ("X-Custom", "  spaced value  "),
    ]
    exchange(proxy.proxy_url, request_bytes("GET", "/h", headers=headers))

    received = only(echo_backend)
    assert received.header("User-Agent") == "curl/8.5.0"
    assert received.header("Accept-Encoding") == "br"
    assert received.header("Accept") == "text/html"
    assert received.header("Authorization") == "Bearer abc.def"
    assert received.header("X-Custom") == "spaced value"


def test_repeated_cookie_lines_reach_the_backend_as_one_cookie_list(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    # waitress joins repeated headers with ", " (waitress/parser.py), which is wrong for Cookie
    # (RFC 6265 §5.4: "; "), so "a=1, b=2" would read as one cookie a="1, b=2".
    headers = [("Cookie", "a=1"), ("Cookie", "b=2")]
    exchange(proxy.proxy_url, request_bytes("GET", "/c", headers=headers))

    values = only(echo_backend).header_values("Cookie")
    assert values in (["a=1; b=2"], ["a=1", "b=2"]), values


# -- who the client is ----------------------------------------------------------------


def test_forwarding_headers_from_an_untrusted_peer_are_replaced(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    headers = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-For", "7.7.7.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=6.6.6.6;proto=https"),
        ("X-Real-IP", "6.6.6.6"),
    ]
    exchange(proxy.proxy_url, request_bytes("GET", "/who", host="site.example", headers=headers))

    received = only(echo_backend)
    assert received.header_values("X-Forwarded-For") == ["127.0.0.1"]
    assert received.header_values("X-Forwarded-Proto") == ["http"]
    assert received.header_values("X-Forwarded-Host") == ["site.example"]
    assert "forwarded" not in received.header_names()
    assert "x-real-ip" not in received.header_names()
    wire = json.dumps(received.headers)
    assert "6.6.6.6" not in wire and "7.7.7.7" not in wire and "evil.example" not in wire


def test_an_underscore_header_cannot_pose_as_x_forwarded_for(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    # In WSGI, X_Forwarded_For and X-Forwarded-For both become HTTP_X_FORWARDED_FOR.
    headers = [("X_Forwarded_For", "6.6.6.6"), ("X_Real_IP", "6.6.6.6")]
    exchange(proxy.proxy_url, request_bytes("GET", "/who", headers=headers))

    received = only(echo_backend)
    assert received.header_values("X-Forwarded-For") == ["127.0.0.1"]
    assert "6.6.6.6" not in json.dumps(received.headers)


def test_forwarding_headers_from_a_trusted_peer_are_kept_and_the_peer_appended(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = make_proxy([echo_backend], trusted_proxies=(ip_network("127.0.0.0/8"),))
    headers = [
        ("X-Forwarded-For", "203.0.113.7, 10.0.0.2"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "public.example"),
    ]
    exchange(proxy.proxy_url, request_bytes("GET", "/who", host="lb.internal", headers=headers))

    received = only(echo_backend)
    assert received.header_values("X-Forwarded-For") == ["203.0.113.7, 10.0.0.2, 127.0.0.1"]
    assert received.header_values("X-Forwarded-Proto") == ["https"]
    assert received.header_values("X-Forwarded-Host") == ["public.example"]


def test_trusted_peer_without_forwarding_headers_gets_them_set(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = make_proxy([echo_backend], trusted_proxies=(ip_network("127.0.0.0/8"),))
    exchange(proxy.proxy_url, request_bytes("GET", "/who", host="site.example"))

    received = only(echo_backend)
    assert received.header_values("X-Forwarded-For") == ["127.0.0.1"]
    assert received.header_values("X-Forwarded-Proto") == ["http"]
    assert received.header_values("X-Forwarded-Host") == ["site.example"]


def test_client_address_is_the_first_untrusted_hop_from_the_right(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    trusted = (ip_network("127.0.0.0/8"), ip_network("10.0.0.0/8"))
    proxy = make_proxy([echo_backend], trusted_proxies=trusted)
    headers = [("X-Forwarded-For", "198.51.100.9, 203.0.113.7, 10.0.0.2")]
    response = exchange(proxy.proxy_url, request_bytes("GET", "/who", headers=headers))
    assert response.status == 200
    request_id = response.header("X-Request-ID")
    assert request_id is not None

    def logged() -> str:
        lines = access_log_text(proxy).splitlines()
        return next((line for line in lines if request_id in line), "")

    assert wait_for(lambda: bool(logged()), timeout=5), "no access log line"
    # 198.51.100.9 was written by someone we cannot vouch for; 203.0.113.7 connected
    # to the first trusted proxy, so it is the client.
    assert logged().startswith("203.0.113.7 ") or '"client": "203.0.113.7"' in logged()


# -- X-Request-ID --------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc-123", "A.b_c:d-e", "under_score", "x" * 128, "0"])
def test_a_sane_request_id_is_kept_and_returned(
    proxy: Service, echo_backend: EchoBackend, request_id: str
) -> None:
    response = exchange(
        proxy.proxy_url, request_bytes("GET", "/id", headers=[("X-Request-ID", request_id)])
    )

    assert only(echo_backend).header_values("X-Request-ID") == [request_id]
    assert response.values("X-Request-ID") == [request_id]


@pytest.mark.parametrize(
    "request_id", ["has space", 'quote"d', "x" * 129, "semi;colon", "slash/y", "ünï", ""]
)
def test_an_insane_request_id_is_replaced_and_the_new_one_returned(
    proxy: Service, echo_backend: EchoBackend, request_id: str
) -> None:
    response = exchange(
        proxy.proxy_url, request_bytes("GET", "/id", headers=[("X-Request-ID", request_id)])
    )

    sent = only(echo_backend).header_values("X-Request-ID")
    assert len(sent) == 1 and sent[0] != request_id
    assert SANE_ID.fullmatch(sent[0])
    assert response.values("X-Request-ID") == sent


def test_a_request_id_is_generated_per_request_when_missing(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    first = exchange(proxy.proxy_url, request_bytes("GET", "/1"))
    second = exchange(proxy.proxy_url, request_bytes("GET", "/2"))

    ids = [r.header_values("X-Request-ID") for r in echo_backend.requests()]
    assert [first.values("X-Request-ID"), second.values("X-Request-ID")] == ids
    assert ids[0][0] != ids[1][0]
    assert all(SANE_ID.fullmatch(i[0]) for i in ids)


def test_the_backend_cannot_override_the_request_id(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    response = exchange(proxy.proxy_url, request_bytes("GET", "/request-id"))

    assert response.values("X-Request-ID") == only(echo_backend).header_values("X-Request-ID")
    assert "set-by-backend" not in response.values("X-Request-ID")


# -- Via and loops ---------------------------------------------------------------------


def test_via_names_this_instance_and_keeps_earlier_hops(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    exchange(proxy.proxy_url, request_bytes("GET", "/v1"))
    exchange(proxy.proxy_url, request_bytes("GET", "/v2", headers=[("Via", "1.0 corp-cache")]))

    first, second = echo_backend.requests()
    assert proxy.instance_name.startswith("pyproxy")
    assert first.header_values("Via") == [f"1.1 {proxy.instance_name}"]
    assert second.header_values("Via") == [f"1.0 corp-cache, 1.1 {proxy.instance_name}"]


@pytest.mark.parametrize(
    "via_format", ["1.1 {name}", "1.0 cache, 1.1 {name}", "HTTP/1.1 {name} (pyproxy)"]
)
def test_a_request_that_already_passed_this_instance_is_a_loop(
    proxy: Service, echo_backend: EchoBackend, via_format: str
) -> None:
    via = via_format.format(name=proxy.instance_name)
    response = exchange(proxy.proxy_url, request_bytes("GET", "/loop", headers=[("Via", via)]))

    assert response.status == 508
    assert echo_backend.requests() == []


def test_another_pyproxy_in_via_is_not_a_loop(proxy: Service, echo_backend: EchoBackend) -> None:
    response = exchange(
        proxy.proxy_url, request_bytes("GET", "/x", headers=[("Via", "1.1 pyproxy-00000000")])
    )

    assert response.status == 200
    assert len(echo_backend.requests()) == 1


def test_two_pyproxies_chained_on_purpose_pass_the_request_through(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    inner = make_proxy([echo_backend])
    outer = make_proxy([BackendConfig(url=inner.proxy_url, name="inner")])

    response = exchange(outer.proxy_url, request_bytes("GET", "/chained"))

    assert response.status == 200
    assert inner.instance_name != outer.instance_name
    assert only(echo_backend).header_values("Via") == [
        f"1.1 {outer.instance_name}, 1.1 {inner.instance_name}"
    ]


# -- Host ----------------------------------------------------------------------------


def test_host_is_preserved_by_default(proxy: Service, echo_backend: EchoBackend) -> None:
    exchange(proxy.proxy_url, request_bytes("GET", "/h", host="shop.example:8443"))

    assert only(echo_backend).header_values("Host") == ["shop.example:8443"]


def test_host_is_the_backends_when_not_preserved(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    proxy = make_proxy([echo_backend], preserve_host=False)
    exchange(proxy.proxy_url, request_bytes("GET", "/h", host="shop.example:8443"))

    received = only(echo_backend)
    assert received.header_values("Host") == [f"127.0.0.1:{echo_backend.port}"]
    assert received.header_values("X-Forwarded-Host") == ["shop.example:8443"]


# -- nothing shared, nothing followed --------------------------------------------------


def test_a_backend_cookie_is_never_replayed_to_another_request(
    proxy: Service, echo_backend: EchoBackend, http: requests.Session
) -> None:
    # A requests.Session stores every Set-Cookie in its jar (Session.send calls
    # extract_cookies_to_jar) and replays it on later requests, i.e. to other clients.
    for _ in range(3):
        assert exchange(proxy.proxy_url, request_bytes("GET", "/cookies")).status == 200
    assert http.get(proxy.proxy_url + "/cookies", timeout=5).status_code == 200
    for path in ("/after-1", "/after-2"):
        exchange(proxy.proxy_url, request_bytes("GET", path))

    later = [r for r in echo_backend.requests() if r.target.startswith("/after")]
    assert len(later) == 2
    for received in later:
        assert "cookie" not in received.header_names(), received.headers


def test_every_set_cookie_reaches_the_client_separately(proxy: Service) -> None:
    response = exchange(proxy.proxy_url, request_bytes("GET", "/cookies"))

    assert response.values("Set-Cookie") == list(COOKIES)


def test_a_redirect_is_relayed_not_followed(proxy: Service, echo_backend: EchoBackend) -> None:
    response = exchange(proxy.proxy_url, request_bytes("GET", "/redirect"))

    assert response.status == 302
    assert response.header("Location") == "/elsewhere"
    assert response.body == b"moved\n"
    assert [r.target for r in echo_backend.requests()] == ["/redirect"]


def test_proxy_variables_and_netrc_in_the_environment_are_ignored(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    make_scripted_backend: Callable[..., ScriptedBackend],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    trap = make_scripted_backend({})  # would receive the request if used as a proxy
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login stolen password secret\n")
    netrc.chmod(0o600)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, trap.url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    proxy = make_proxy([echo_backend])

    response = exchange(proxy.proxy_url, request_bytes("GET", "/env"))

    assert response.status == 200
    assert trap.connections == 0
    assert "authorization" not in only(echo_backend).header_names()


# -- bodies ----------------------------------------------------------------------------


def test_a_5mb_upload_arrives_byte_identical_and_comes_back_byte_identical(
    proxy: Service, echo_backend: EchoBackend, http: requests.Session
) -> None:
    body = pattern_bytes(5 * 1024 * 1024 + 3)

    response = http.post(proxy.proxy_url + "/raw-echo", data=body, timeout=20)

    assert response.status_code == 200
    received = only(echo_backend)
    assert len(received.body) == len(body)
    assert hashlib.sha256(received.body).digest() == hashlib.sha256(body).digest()
    # Content-Length copied next to a streamed body makes requests send both it and
    # Transfer-Encoding: chunked (psf/requests#1648): request smuggling (RFC 9112 §6.1).
    framing = received.header_names() & {"content-length", "transfer-encoding"}
    assert len(framing) == 1, received.headers
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(body).digest()


def test_a_small_post_body_arrives_with_a_content_length(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    exchange(proxy.proxy_url, request_bytes("POST", "/form", body=b"a=1&b=2"))

    received = only(echo_backend)
    assert received.body == b"a=1&b=2"
    assert received.header_values("Content-Length") == ["7"]
    assert "transfer-encoding" not in received.header_names()


def test_an_empty_post_body_is_forwarded_as_empty(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    response = exchange(proxy.proxy_url, request_bytes("POST", "/empty", body=b""))

    assert response.status == 200
    received = only(echo_backend)
    assert received.body == b""
    assert received.header_values("Content-Length") == ["0"]


def test_a_chunked_request_body_arrives_whole_and_singly_framed(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    data = (
        request_bytes("POST", "/raw-echo", headers=[("Transfer-Encoding", "chunked")])
        + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    response = exchange(proxy.proxy_url, data)

    assert response.status == 200
    assert response.body == b"hello world"
    received = only(echo_backend)
    assert received.body == b"hello world"
    framing = received.header_names() & {"content-length", "transfer-encoding"}
    assert len(framing) == 1, received.headers


def test_a_large_download_arrives_byte_identical(proxy: Service) -> None:
    size = 5 * 1024 * 1024 + 11
    response = exchange(proxy.proxy_url, request_bytes("GET", f"/large?size={size}"), timeout=20)

    assert response.status == 200 and response.complete
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(pattern_bytes(size)).digest()


def test_a_gzip_body_passes_through_still_compressed(proxy: Service) -> None:
    response = exchange(
        proxy.proxy_url, request_bytes("GET", "/gzip", headers=[("Accept-Encoding", "gzip")])
    )

    assert response.status == 200
    assert response.header("Content-Encoding") == "gzip"
    assert response.body == GZIP_BODY
    assert gzip.decompress(response.body) == GZIP_PLAIN
    if response.header("Content-Length") is not None:
        assert response.header("Content-Length") == str(len(GZIP_BODY))


def test_server_sent_events_arrive_as_they_are_sent(
    proxy: Service, echo_backend: EchoBackend
) -> None:
    # iter_content(n) waits until n bytes arrived (urllib3's read(amt) fills its buffer,
    # psf/requests#844), so events would stall; pyproxy relays with read1. The backend
    # sends the first event and then waits for this test to see it.
    with RawClient.to(proxy.proxy_url, timeout=3.0) as client:
        client.send(request_bytes("GET", "/sse", headers=[("Accept", "text/event-stream")]))
        head = client.read_head()
        assert head.status == 200
        assert head.header("Content-Type") == "text/event-stream"
        chunks = client.iter_chunks(head)
        started = time.monotonic()
        first = next(chunks)  # a proxy that buffers times out here (3 s)
        assert time.monotonic() - started < 2.5
        assert first == SSE_EVENTS[0]
        assert not echo_backend.sse_finished.is_set()
        echo_backend.sse_continue.set()
        rest = b"".join(chunks)
        assert head.complete
    assert first + rest == b"".join(SSE_EVENTS)


# -- responses without a body ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("HEAD", "/large?size=1000", 200),
        ("GET", "/status/204", 204),
        ("GET", "/status/304", 304),
        ("HEAD", "/status/404", 404),
    ],
)
def test_responses_without_a_body_send_none_and_the_connection_stays_usable(
    proxy: Service, method: str, target: str, status: int
) -> None:
    with RawClient.to(proxy.proxy_url) as client:
        client.send(request_bytes(method, target, headers=[("If-None-Match", '"v1"')]))
        response = client.read_response(method)
        assert response.status == status
        assert response.body == b""
        if method == "HEAD" and status == 200:
            assert response.header("Content-Length") == "1000"
        if "close" in (response.header("Connection") or "").lower():
            # waitress closes after a 1.1 response without Content-Length; then nothing
            # may follow the header block.
            assert client.closed_by_peer()
            return
        # Any stray body byte would now be read as the next status line.
        client.send(request_bytes("GET", "/next"))
        follow = client.read_response()
        assert follow.status == 200
        assert json.loads(follow.body)["target"] == "/next"


def test_backend_status_and_body_are_relayed(proxy: Service) -> None:
    response = exchange(proxy.proxy_url, request_bytes("GET", "/status/418"))

    assert response.status == 418
    assert response.body == b"status 418 from echo\n"
