"""Unit tests of pyproxy/headers.py: the header rules as pure functions (hop-by-hop
stripping per RFC 9110 §7.6.1, X-Forwarded-*, Via per RFC 9110 §7.6.3)."""

from __future__ import annotations

import os
import re
import threading
from ipaddress import ip_network

import pytest

import pyproxy.headers as headers_module
from pyproxy.config.schema import Network
from pyproxy.headers import (
    HOP_BY_HOP,
    append_via,
    client_address,
    connection_tokens,
    downstream_response_headers,
    is_trusted,
    sane_request_id,
    upstream_request_headers,
    via_names,
    wsgi_request_headers,
)

LOCAL = (ip_network("127.0.0.0/8"),)
INTERNAL = (ip_network("127.0.0.0/8"), ip_network("10.0.0.0/8"), ip_network("::1/128"))


def lower_names(headers: dict[str, str] | list[tuple[str, str]]) -> list[str]:
    items = headers.items() if isinstance(headers, dict) else headers
    return [name.lower() for name, _ in items]


def get(headers: dict[str, str], name: str) -> str | None:
    found = [v for k, v in headers.items() if k.lower() == name.lower()]
    assert len(found) <= 1, (name, headers)
    return found[0] if found else None


def outbound(
    client_headers: list[tuple[str, str]],
    *,
    peer: str = "192.0.2.1",
    trusted: tuple[Network, ...] = (),
    host: str = "site.example",
    upstream_host: str | None = None,
) -> tuple[dict[str, str], str]:
    return upstream_request_headers(
        client_headers,
        peer=peer,
        scheme="http",
        host=host,
        upstream_host=upstream_host or host,
        trusted=trusted,
        request_id="rid-1",
        instance_name="pyproxy-test",
    )


# -- the hop-by-hop set -----------------------------------------------------------------


def test_hop_by_hop_is_exactly_the_spec_list() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    } == set(HOP_BY_HOP)


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (None, set()),
        ("", set()),
        ("close", {"close"}),
        ("Keep-Alive, X-Foo ,x-bar", {"keep-alive", "x-foo", "x-bar"}),
        (" , ,X-Only,", {"x-only"}),
    ],
)
def test_connection_tokens(value: str | None, tokens: set[str]) -> None:
    assert connection_tokens(value) == tokens


# -- reading the environ ---------------------------------------------------------------------


def test_wsgi_request_headers_rebuilds_names_and_leaves_out_content_length() -> None:
    environ = {
        "HTTP_X_API_KEY": "k",
        "HTTP_HOST": "h.example",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "12",
        "REQUEST_METHOD": "POST",
        "wsgi.input": object(),
    }

    headers = dict(wsgi_request_headers(environ))

    assert headers == {"X-Api-Key": "k", "Host": "h.example", "Content-Type": "application/json"}


def test_wsgi_header_names_table_stays_bounded_whatever_names_clients_send() -> None:
    """Names are cached per environ key; a client inventing names cannot grow the table."""
    environ = {f"HTTP_X_INVENTED_{n}": str(n) for n in range(headers_module.MAX_CACHED_NAMES + 50)}
    environ["HTTP_X_API_KEY"] = "k"

    for _ in range(2):  # the second time from the table, for the names it kept
        headers = wsgi_request_headers(environ)
        assert headers[0] == ("X-Invented-0", "0")
        assert headers[-1] == ("X-Api-Key", "k")
        assert len(headers) == len(environ)

    assert len(headers_module._header_names) <= headers_module.MAX_CACHED_NAMES


def test_connection_tokens_of_a_long_value_are_read_but_not_cached() -> None:
    value = ", ".join(f"X-Hop-{n}" for n in range(40))
    assert len(value) > headers_module.MAX_CACHED_CONNECTION

    assert connection_tokens(value) == {f"x-hop-{n}" for n in range(40)}
    assert connection_tokens("Close") == connection_tokens("close") == {"close"}


def test_wsgi_request_headers_without_content_type() -> None:
    assert wsgi_request_headers({"CONTENT_TYPE": "", "HTTP_A": "1"}) == [("A", "1")]


# -- who the client is -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("10.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        (" 10.0.0.1 ", True),
        ("192.0.2.1", False),
        ("unknown", False),
        ("", False),
        ("10.0.0.1:1234", False),
    ],
)
def test_is_trusted(address: str, expected: bool) -> None:
    assert is_trusted(address, INTERNAL) is expected


def test_nothing_is_trusted_without_trusted_proxies() -> None:
    assert is_trusted("127.0.0.1", ()) is False


def test_an_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    assert client_address("192.0.2.1", "6.6.6.6, 10.0.0.1", INTERNAL) == ("192.0.2.1", "192.0.2.1")


def test_a_trusted_peer_without_a_claim_is_the_client() -> None:
    assert client_address("10.0.0.5", None, INTERNAL) == ("10.0.0.5", "10.0.0.5")


def test_a_trusted_peer_is_appended_and_the_first_untrusted_hop_from_the_right_is_client() -> None:
    client, chain = client_address("10.0.0.5", "198.51.100.9, 203.0.113.7, 10.0.0.2", INTERNAL)

    assert chain == "198.51.100.9, 203.0.113.7, 10.0.0.2, 10.0.0.5"
    assert client == "203.0.113.7"  # 198.51.100.9 was written by someone we cannot vouch for


def test_an_all_trusted_chain_makes_the_leftmost_hop_the_client() -> None:
    assert client_address("127.0.0.1", "10.0.0.1, 10.0.0.2", INTERNAL) == (
        "10.0.0.1",
        "10.0.0.1, 10.0.0.2, 127.0.0.1",
    )


def test_a_garbage_hop_stops_the_walk() -> None:
    client, _ = client_address("127.0.0.1", "1.2.3.4, not-an-ip", INTERNAL)

    assert client == "not-an-ip"


# -- request ids and Via -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "abc-123", "A.b_c:d-e", "x" * 128])
def test_a_sane_request_id_is_kept(value: str) -> None:
    assert sane_request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "x" * 129, "a b", "a/b", "a\nb", "é", "a;b"])
def test_an_insane_request_id_is_replaced_by_a_fresh_sane_one(value: str | None) -> None:
    first, second = sane_request_id(value), sane_request_id(value)

    assert first != value and first != second
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", first)


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (None, []),
        ("1.1 a", ["a"]),
        ("1.0 fred, 1.1 p.example.net (Apache/1.1)", ["fred", "p.example.net"]),
        ("HTTP/1.1 pyproxy-1 (comment, with comma)", ["pyproxy-1"]),
        ("garbage", []),
    ],
)
def test_via_names(value: str | None, names: list[str]) -> None:
    assert via_names(value)[: len(names)] == names


def test_append_via() -> None:
    assert append_via(None, "pyproxy-x") == "1.1 pyproxy-x"
    assert append_via("1.0 cache", "pyproxy-x") == "1.0 cache, 1.1 pyproxy-x"


# -- the request headers sent upstream ------------------------------------------------------------


def test_outbound_strips_hop_by_hop_and_connection_named_headers_before_adding_its_own() -> None:
    headers, _ = outbound(
        [
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "300"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "5"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Accept", "*/*"),
        ]
    )

    names = set(lower_names(headers))
    assert not names & (set(HOP_BY_HOP) | {"x-secret", "content-length"})
    assert get(headers, "Accept") == "*/*"


def test_outbound_from_an_untrusted_peer_discards_every_forwarding_claim() -> None:
    headers, client = outbound(
        [
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
        ]
    )

    assert client == "192.0.2.1"
    assert get(headers, "X-Forwarded-For") == "192.0.2.1"
    assert get(headers, "X-Forwarded-Proto") == "http"
    assert get(headers, "X-Forwarded-Host") == "site.example"
    assert get(headers, "Forwarded") is None and get(headers, "X-Real-IP") is None


def test_outbound_from_a_trusted_peer_keeps_the_claims_and_appends_the_peer() -> None:
    headers, client = outbound(
        [
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example"),
        ],
        peer="127.0.0.1",
        trusted=LOCAL,
    )

    assert client == "203.0.113.7"
    assert get(headers, "X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert get(headers, "X-Forwarded-Proto") == "https"
    assert get(headers, "X-Forwarded-Host") == "public.example"


def test_outbound_sends_one_x_forwarded_for_whatever_the_spelling_of_the_claim() -> None:
    headers, _ = outbound([("x-forwarded-for", "203.0.113.7")], peer="127.0.0.1", trusted=LOCAL)

    assert lower_names(headers).count("x-forwarded-for") == 1, headers
    assert get(headers, "X-Forwarded-For") == "203.0.113.7, 127.0.0.1"


def test_outbound_sets_host_request_id_and_via_replacing_the_clients() -> None:
    headers, _ = outbound(
        [("Host", "client.example"), ("X-Request-ID", "client-id"), ("Via", "1.0 cache")],
        host="client.example",
        upstream_host="10.0.0.9:8080",
    )

    assert get(headers, "Host") == "10.0.0.9:8080"
    assert get(headers, "X-Request-ID") == "rid-1"
    assert get(headers, "Via") == "1.0 cache, 1.1 pyproxy-test"
    assert get(headers, "X-Forwarded-Host") == "client.example"


def test_outbound_joins_repeated_cookie_headers_with_a_semicolon() -> None:
    # RFC 6265 §5.4 / RFC 9110 §5.3: Cookie is not a comma-separated list.
    headers, _ = outbound([("Cookie", "a=1"), ("Cookie", "b=2")])

    assert get(headers, "Cookie") == "a=1; b=2"


def test_outbound_joins_other_repeated_headers_with_a_comma() -> None:
    headers, _ = outbound([("Accept", "text/html"), ("Accept", "application/json")])

    assert get(headers, "Accept") == "text/html, application/json"


def test_outbound_adds_nothing_the_client_did_not_send_beyond_its_own_set() -> None:
    headers, _ = outbound([])

    assert set(lower_names(headers)) == {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "via",
        "host",
    }


# -- the response headers sent downstream ---------------------------------------------------------


def test_downstream_keeps_repeated_headers_apart_and_in_order() -> None:
    upstream = [
        ("Set-Cookie", "a=1; Path=/"),
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT"),
        ("Content-Length", "5"),
    ]

    headers = downstream_response_headers(upstream, request_id="rid", instance_name="pyproxy-t")

    assert [v for k, v in headers if k == "Set-Cookie"] == [
        "a=1; Path=/",
        "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT",
    ]
    assert ("Content-Length", "5") in headers  # kept: the client can see a truncation


def test_downstream_strips_hop_by_hop_and_connection_named_headers() -> None:
    upstream = [
        ("Connection", "X-Private, close"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Proxy-Authenticate", "Basic"),
        ("Trailer", "X-T"),
        ("X-Kept", "yes"),
    ]

    headers = downstream_response_headers(upstream, request_id="rid", instance_name="pyproxy-t")

    names = set(lower_names(headers))
    assert not names & (set(HOP_BY_HOP) | {"x-private"})
    assert ("X-Kept", "yes") in headers


def test_downstream_drops_a_field_named_in_a_later_connection_header() -> None:
    """Connection may come after the fields it names, or twice: all named ones go."""
    upstream = [
        ("X-Before", "1"),
        ("X-Kept", "yes"),
        ("Connection", "keep-alive, X-Before"),
        ("X-After", "2"),
        ("connection", "x-after"),
        ("Set-Cookie", "a=1"),
    ]

    headers = downstream_response_headers(upstream, request_id="rid", instance_name="pyproxy-t")

    assert headers == [
        ("X-Kept", "yes"),
        ("Set-Cookie", "a=1"),
        ("Via", "1.1 pyproxy-t"),
        ("X-Request-ID", "rid"),
    ]


def test_downstream_sets_our_request_id_once_over_the_backends() -> None:
    headers = downstream_response_headers(
        [("X-Request-ID", "backend"), ("x-request-id", "again")],
        request_id="rid",
        instance_name="pyproxy-t",
    )

    assert [v for k, v in headers if k.lower() == "x-request-id"] == ["rid"]


def test_downstream_appends_our_via_to_the_backends() -> None:
    headers = downstream_response_headers(
        [("Via", "1.1 inner")], request_id="rid", instance_name="pyproxy-t"
    )

    assert [v for k, v in headers if k.lower() == "via"] == ["1.1 inner, 1.1 pyproxy-t"]


# -- fresh request IDs ----------------------------------------------------------------------


def test_fresh_request_ids_are_unique_across_threads_and_batches() -> None:
    per_thread = 3 * headers_module._IDS_PER_READ  # each thread empties a batch or more
    results: list[list[str]] = [[] for _ in range(8)]

    def take(out: list[str]) -> None:
        out.extend(sane_request_id(None) for _ in range(per_thread))

    threads = [threading.Thread(target=take, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    ids = [request_id for out in results for request_id in out]

    assert len(ids) == 8 * per_thread
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_worker_does_not_reuse_the_parents_pending_ids() -> None:
    sane_request_id(None)  # the parent now holds a batch of unused IDs
    pending = set(headers_module._fresh_ids)
    assert pending
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one fresh ID and leave at once
        try:
            os.write(write_end, sane_request_id(None).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)

    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
    assert child_id not in pending
