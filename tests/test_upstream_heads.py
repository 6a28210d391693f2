"""Response heads from a misbehaving backend, and what reaches the client.

A backend is trusted to answer, not to speak valid HTTP. Whatever head it writes, the
client gets either a valid HTTP/1.1 relay of it or pyproxy's own 502, promptly (well
before `timeouts.read`), and an upstream connection that carried a refused head is
closed, never handed to the next request. Interim responses (100, 102, 103) are read
past: they never end an exchange and never count against the backend.

One proxy and one scripted backend serve the whole module; every case has its own
path. The client waits at most CLIENT_WAIT, far less than the proxy's read timeout,
so a head that makes pyproxy wait for more bytes fails the test instead of passing
after a long wait. What the client reads is checked with a strict reader written
here, independent of pyproxy's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import pytest
from backends import HANG, KEEP, ScriptedBackend, response, send, sleep, wait_for
from conftest import ProxyFactory, base_config, registry_value
from prometheus_client import CollectorRegistry
from rawhttp import RawClient, RawResponse, request_bytes

from pyproxy.config.schema import CircuitBreakerConfig, Timeouts
from pyproxy.headers import downstream_response_headers
from pyproxy.pool.head_grammar import InvalidResponseHead, content_length, field_line_problem
from pyproxy.process.service import Service

CLIENT_WAIT = 5.0  # seconds; the proxy below waits up to 20 s for a backend read
SHARED_TIMEOUTS = Timeouts(connect=2.0, read=20.0, total=40.0)

OK = response(200, b"ok", reason="OK")


def head(*lines: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    """A status line and header lines, CRLF-terminated, and the empty line."""
    return "".join(f"{line}\r\n" for line in (status, *lines)).encode("latin-1") + b"\r\n"


# Heads that must become a 502, with the upstream connection closed. Each one is sent
# on a connection the backend keeps open, so only pyproxy can close it.
REFUSED: dict[str, bytes] = {
    # Header lines the email parser under http.client cannot parse: it keeps what came
    # before and silently treats the rest, Content-Length included, as body.
    "/no-colon": head("X-A: 1", "this line has no colon", "Content-Length: 2") + b"ok",
    "/obs-fold": head("X-A: 1", "  folded onto X-A", "Content-Length: 2") + b"ok",
    "/whitespace-first-line": head(" X-A: 1", "Content-Length: 2") + b"ok",
    "/space-in-name": head("Bad Name: 1", "Content-Length: 2") + b"ok",
    "/non-token-name": head("Bad(Name): 1", "Content-Length: 2") + b"ok",
    "/empty-name": head(": 1", "Content-Length: 2") + b"ok",
    # Field values RFC 9110 §5.5 calls invalid: CR, LF, NUL and the other controls.
    "/nul-in-value": head("X-A: a\x00b", "Content-Length: 2") + b"ok",
    "/bare-cr-in-value": head("X-A: a\rInjected: 1", "Content-Length: 2") + b"ok",
    "/control-in-value": head("X-A: a\x01b", "Content-Length: 2") + b"ok",
    "/del-in-value": head("X-A: a\x7fb", "Content-Length: 2") + b"ok",
    # Status lines int() accepts but RFC 9112 §4 does not (status-code = 3DIGIT).
    "/status-plus-sign": head("Content-Length: 2", status="HTTP/1.1 +200 OK") + b"ok",
    "/status-underscore": head("Content-Length: 2", status="HTTP/1.1 2_00 OK") + b"ok",
    "/status-four-digits": head("Content-Length: 2", status="HTTP/1.1 0200 OK") + b"ok",
    "/status-no-break-space": head("Content-Length: 2", status="HTTP/1.1\xa0200 OK") + b"ok",
    "/status-below-100": head("Content-Length: 2", status="HTTP/1.1 099 Low") + b"ok",
    "/status-600": head("Content-Length: 2", status="HTTP/1.1 600 High") + b"ok",
    "/reason-control": head("Content-Length: 2", status="HTTP/1.1 200 O\x01K") + b"ok",
    "/reason-cr": head("Content-Length: 2", status="HTTP/1.1 200 O\rK") + b"ok",
    "/version-2": head("Content-Length: 2", status="HTTP/2.0 200 OK") + b"ok",
    "/version-lowercase": head("Content-Length: 2", status="http/1.1 200 OK") + b"ok",
    # Framing: a Content-Length no int() can read, lists that differ, chunked on 1.0.
    "/cl-5000-digits": head("Content-Length: " + "9" * 5000) + b"ok",
    "/cl-lists-differ": head("Content-Length: 2, 2", "Content-Length: 3") + b"ok",
    "/cl-empty": head("Content-Length: ") + b"ok",
    "/te-on-http-1.0": head("Transfer-Encoding: chunked", status="HTTP/1.0 200 OK")
    + b"2\r\nok\r\n0\r\n\r\n",
    # http.client's own limits (_MAXLINE, _MAXHEADERS) and pyproxy's on interim heads.
    "/line-too-long": head("X-A: " + "a" * 70_000, "Content-Length: 2") + b"ok",
    "/too-many-fields": head(*(f"X-{i}: v" for i in range(101)), "Content-Length: 2") + b"ok",
    "/too-many-interim": head(status="HTTP/1.1 103 Early Hints") * 11 + OK,
    "/head-too-large": head(*(f"X-{i}: {'v' * 60_000}" for i in range(5)), "Content-Length: 2")
    + b"ok",
    # pyproxy does not do Upgrade: a 101 is no answer it can relay.
    "/switching-protocols": head(
        "Upgrade: websocket", "Connection: Upgrade", status="HTTP/1.1 101 Switching Protocols"
    ),
}

# Heads that are valid, or that RFC 9112 says a proxy repairs, and what the client gets.
RELAYED: dict[str, tuple[bytes, int, bytes]] = {
    # RFC 9110 §8.6: a list of identical values is one Content-Length.
    "/cl-equal-list": (head("Content-Length: 2, 2") + b"ok", 200, b"ok"),
    "/cl-repeated-line": (head("Content-Length: 2", "Content-Length: 2") + b"ok", 200, b"ok"),
    # waitress refuses an app's "Trailers" (RFC 2616's spelling of Trailer) with a 500.
    "/trailers-field": (head("Trailers: X-Sum", "Content-Length: 2") + b"ok", 200, b"ok"),
    # RFC 9112 §5.1: a proxy removes whitespace between a field name and the colon.
    "/space-before-colon": (head("X-Note : kept", "Content-Length: 2") + b"ok", 200, b"ok"),
    # RFC 9112 §6.3: a 304 never has a body, whatever its framing headers say.
    "/not-modified-chunked": (
        head('ETag: "v1"', "Transfer-Encoding: chunked", status="HTTP/1.1 304 Not Modified"),
        304,
        b"",
    ),
    # Interim responses are read past (RFC 9110 §15.2).
    "/early-hints": (
        head("Link: </s.css>; rel=preload", status="HTTP/1.1 103 Early Hints") + OK,
        200,
        b"ok",
    ),
    "/continue-then-hints": (
        head(status="HTTP/1.1 100 Continue") + head(status="HTTP/1.1 103 Early Hints") + OK,
        200,
        b"ok",
    ),
    "/processing": (head(status="HTTP/1.1 102 Processing") * 3 + OK, 200, b"ok"),
    # Lenient where RFC 9112 allows it: LF alone ends a line (§2.2), no reason (§4).
    "/bare-lf": (b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nok", 200, b"ok"),
    "/no-reason": (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
}


# -- a strict reader for what the client receives -------------------------------------

TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\t \x21-\x7e\x80-\xff]*)\r\n")
FIELD_LINE = re.compile(rb"(" + TOKEN + rb"):[ \t]*([\t \x21-\x7e\x80-\xff]*?)[ \t]*\r\n")


def read_valid_response(client: RawClient, method: str = "GET") -> RawResponse:
    """The next response, asserting that its head is valid RFC 9112 and its framing
    unambiguous; the body is read by that framing."""
    line = client.reader.readline(65_537)
    match = STATUS_LINE.fullmatch(line)
    assert match, f"invalid status line {line!r}"
    status, reason = int(match[1]), match[2].decode("latin-1")
    headers: list[tuple[str, str]] = []
    while (line := client.reader.readline(65_537)) != b"\r\n":
        field = FIELD_LINE.fullmatch(line)
        assert field, f"invalid header line {line!r}"
        headers.append((field[1].decode("latin-1"), field[2].decode("latin-1")))
    answer = RawResponse("HTTP/1.1", status, reason, headers)
    lengths, encodings = answer.values("content-length"), answer.values("transfer-encoding")
    assert len(lengths) <= 1, f"several Content-Length fields: {lengths}"
    assert not (lengths and encodings), "both Content-Length and Transfer-Encoding"
    assert not lengths or lengths[0].isdigit(), lengths
    assert encodings in ([], ["chunked"]), encodings
    if method == "HEAD" or status in (204, 304):
        return answer
    if encodings:
        answer.framing = "chunked"
        answer.chunks = list(client.iter_chunks(answer))
        answer.body = b"".join(answer.chunks)
    elif lengths:
        answer.framing = "length"
        answer.body = client._read_upto(int(lengths[0]))
        answer.complete = len(answer.body) == int(lengths[0])
    else:
        answer.framing = "close"
        answer.body = client._read_upto(None)
    return answer


def ask(service: Service, *paths: str) -> RawResponse:
    """GET each path in turn on one client connection; the last answer."""
    with RawClient.to(service.proxy_url, timeout=CLIENT_WAIT) as client:
        for path in paths:
            client.send(request_bytes("GET", path))
            answer = read_valid_response(client)
        return answer


def is_own_502(answer: RawResponse) -> bool:
    return answer.status == 502 and answer.body.startswith(b"502 Bad Gateway: ")


# -- the shared proxy -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedBackend]:
    scripts = {path: [send(data), KEEP] for path, data in REFUSED.items()}
    for path, (data, _, _) in RELAYED.items():
        scripts[path] = scripts[path.replace("/", "/again-", 1)] = [send(data), KEEP]
    backend = ScriptedBackend(scripts, default=[send(OK), KEEP], name="scripted")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def shared_proxy(scripted: ScriptedBackend) -> Iterator[Service]:
    service = Service(
        base_config([scripted], timeouts=SHARED_TIMEOUTS), registry=CollectorRegistry()
    )
    service.start()
    yield service
    service.close()


def connection_of(backend: ScriptedBackend, path: str) -> int:
    """The backend connection that carried the (one) request for `path`."""
    hits = [r.connection for r in backend.requests() if r.request_line.split(" ")[1] == path]
    assert len(hits) == 1, hits
    return hits[0]


def errors(service: Service, reason: str, backend: str = "scripted") -> float:
    return registry_value(service, "proxy_errors_total", backend=backend, reason=reason)


# -- refused heads ------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(REFUSED))
def test_a_head_that_is_not_valid_http_is_a_prompt_502_on_a_discarded_connection(
    shared_proxy: Service, scripted: ScriptedBackend, path: str
) -> None:
    answer = ask(shared_proxy, path)

    assert is_own_502(answer), (answer.status, answer.headers, answer.body[:200])
    # The backend keeps the connection open: only pyproxy closing it ends it here.
    connection = connection_of(scripted, path)
    assert wait_for(lambda: connection in scripted.peer_closed), "upstream connection kept"
    assert ask(shared_proxy, "/after" + path).body == b"ok"


def test_a_head_cut_short_by_the_backend_is_a_502_not_a_response(
    shared_proxy: Service, scripted: ScriptedBackend
) -> None:
    # http.client takes the end of the connection for the end of the header block, and
    # relays a 200 whose body then never comes.
    scripted.scripts["/cut-head"] = [send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b")]

    answer = ask(shared_proxy, "/cut-head")

    assert is_own_502(answer), (answer.status, answer.headers)


# -- heads relayed, repaired where RFC 9112 says so --------------------------------------


@pytest.mark.parametrize("path", sorted(RELAYED))
def test_a_valid_or_repairable_head_is_relayed_as_valid_http(
    shared_proxy: Service, path: str
) -> None:
    _, status, body = RELAYED[path]

    answer = ask(shared_proxy, path)
    # The relay also ended where the backend's response did: the same client
    # connection is free for another request at once.
    following = ask(shared_proxy, path.replace("/", "/again-", 1), "/after" + path)

    assert (answer.status, answer.body) == (status, body), answer.headers
    assert "trailers" not in answer.names()
    if status == 200:
        assert answer.header("Content-Length") == "2"
    assert following.body == b"ok"


def test_whitespace_before_the_colon_is_removed_and_the_field_kept(shared_proxy: Service) -> None:
    assert ask(shared_proxy, "/space-before-colon").header("X-Note") == "kept"


def test_interim_responses_are_not_failures_and_leave_nothing_on_the_connection(
    make_proxy: ProxyFactory, make_scripted_backend: Callable[..., ScriptedBackend]
) -> None:
    data, _, _ = RELAYED["/continue-then-hints"]
    backend = make_scripted_backend({"/hints": [send(data), KEEP]}, default=[send(OK), KEEP])
    breaker = CircuitBreakerConfig(enabled=True, failure_threshold=1)
    proxy = make_proxy([backend], circuit_breaker=breaker)

    answers = [ask(proxy, "/hints"), ask(proxy, "/next")]

    assert [(a.status, a.body) for a in answers] == [(200, b"ok"), (200, b"ok")]
    snapshot = proxy.holder.runtime.backends[0].snapshot()
    assert (snapshot.failures_total, snapshot.circuit) == (0, "closed")
    assert errors(proxy, "bad_response") == 0
    # Both answers came over one kept-alive connection: nothing was left on it.
    assert {r.connection for r in backend.requests()} == {1}


def test_the_total_deadline_holds_while_interim_responses_trickle_in(
    make_proxy: ProxyFactory, make_scripted_backend: Callable[..., ScriptedBackend]
) -> None:
    # One 102 every 0.6 s, fewer than the interim limit, each well within the read
    # timeout: only the deadline can end this exchange, and it must, as a 504.
    interim = head(status="HTTP/1.1 102 Processing")
    steps = [step for _ in range(9) for step in (send(interim), sleep(0.6))] + [HANG]
    backend = make_scripted_backend({"/slow": steps})
    proxy = make_proxy([backend], timeouts=Timeouts(connect=1.0, read=5.0, total=1.0))

    started = time.monotonic()
    answer = ask(proxy, "/slow")

    assert answer.status == 504
    assert time.monotonic() - started < 4.0  # the 102s alone would take 5.4 s
    assert errors(proxy, "deadline_exceeded") == 1


# -- the deadline while the request body is sent --------------------------------------


@pytest.mark.parametrize(
    "slow_body",
    [
        # 16 KiB every 0.1 s: each send() of the body ends within the socket timeout,
        # so only the deadline stops an upload that would take about 50 s.
        pytest.param((16_384, 0.1), id="reads-slowly"),
        # Never reads: sendall blocks once the buffers are full. One blocked send() also
        # ends with the socket timeout (urllib3 sends within the connect timeout, which
        # attempt.py shrinks to what is left of the deadline).
        pytest.param((16_384, 60.0), id="never-reads"),
    ],
)
def test_the_total_deadline_bounds_sending_the_request_body(
    make_proxy: ProxyFactory,
    make_scripted_backend: Callable[..., ScriptedBackend],
    slow_body: tuple[int, float],
) -> None:
    backend = make_scripted_backend({}, slow_body=slow_body)
    proxy = make_proxy([backend], timeouts=Timeouts(connect=5.0, read=5.0, total=1.5))
    body = b"x" * (8 * 1024 * 1024)

    started = time.monotonic()
    with RawClient.to(proxy.proxy_url, timeout=30.0) as client:
        client.send(request_bytes("POST", "/upload", body=body))
        answer = read_valid_response(client)
    elapsed = time.monotonic() - started

    assert answer.status == 504, answer.body
    assert errors(proxy, "deadline_exceeded") == 1
    assert elapsed < 10.0
    assert backend.body_bytes < len(body)


# -- keep-alive decided by RFC 9112 §9.3 -------------------------------------------------


def test_a_response_that_says_close_is_never_pooled_even_with_a_keep_alive_field(
    make_proxy: ProxyFactory, make_scripted_backend: Callable[..., ScriptedBackend]
) -> None:
    # http.client lets a Keep-Alive field on HTTP/1.0 outweigh "Connection: close", and
    # pools a connection the backend is about to close: the next request on it fails.
    closing = head(
        "Connection: close", "Keep-Alive: timeout=5", "Content-Length: 2", status="HTTP/1.0 200 OK"
    )
    backend = make_scripted_backend({}, default=[send(closing + b"ok"), KEEP])
    proxy = make_proxy([backend])

    answers = [ask(proxy, "/one"), ask(proxy, "/two")]

    assert [a.body for a in answers] == [b"ok", b"ok"]
    assert [r.connection for r in backend.requests()] == [1, 2]
    assert wait_for(lambda: 1 in backend.peer_closed)


# -- what the operator is told ---------------------------------------------------------------


def test_the_log_names_the_backend_and_the_rule_a_head_broke(
    shared_proxy: Service, scripted: ScriptedBackend, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.scripts["/logged"] = [send(head("X-A: 1", "no colon here") + b"ok"), KEEP]

    with caplog.at_level("WARNING", logger="pyproxy.pool.upstream"):
        answer = ask(shared_proxy, "/logged")

    assert is_own_502(answer)
    messages = [r.getMessage() for r in caplog.records if r.name == "pyproxy.pool.upstream"]
    assert messages == [
        "backend scripted sent an invalid response head: "
        "a header line without a colon b'no colon here\\r\\n'"
    ]
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a broken backend"


# -- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"2"], 2),
        ([b"2, 2"], 2),
        ([b"2", b"2"], 2),
        ([b"02, 2"], 2),  # the same decimal value (RFC 9110 §8.6)
        ([b"2,, 2 ,"], 2),  # empty list elements are ignored (RFC 9110 §5.6.1)
        ([b"0"], 0),
        ([b"9" * 18], 10**18 - 1),
    ],
)
def test_content_length_reads_one_number_from_a_list_of_equal_ones(
    values: list[bytes], expected: int
) -> None:
    assert content_length(values) == expected


@pytest.mark.parametrize(
    "values",
    [[b"2, 3"], [b"2", b"3"], [b""], [b","], [b"-2"], [b"+2"], [b"2 2"], [b"0x2"],
     [b"\xd9\xa2"], [b"9" * 19], [b"1_0"]],
)  # fmt: skip
def test_content_length_refuses_anything_else(values: list[bytes]) -> None:
    with pytest.raises(InvalidResponseHead):
        content_length(values)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b" folded\r\n", "a folded header line (obs-fold)"),
        (b"\tfolded\r\n", "a folded header line (obs-fold)"),
        (b"no colon\r\n", "a header line without a colon b'no colon\\r\\n'"),
        (b"Bad Name: v\r\n", "an invalid header name b'Bad Name'"),
        (b": v\r\n", "an invalid header name b''"),
        (b"X: a\x00b\r\n", "a control character in the value of b'X'"),
    ],
)
def test_a_refused_field_line_is_named_for_the_operator(line: bytes, problem: str) -> None:
    assert field_line_problem(line) == problem


def test_every_name_waitress_refuses_from_an_app_is_dropped_downstream() -> None:
    # waitress answers 500 when an app sets one of these (task.py, start_response).
    from waitress.task import hop_by_hop

    relayed = downstream_response_headers(
        [(name.title(), "x") for name in sorted(hop_by_hop)] + [("X-Kept", "1")],
        request_id="rid",
        instance_name="pyproxy-t",
    )

    assert {name.lower() for name, _ in relayed} == {"x-kept", "via", "x-request-id"}
