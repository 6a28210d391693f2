"""EdgeServer through real sockets: a raw-socket client against a recording WSGI app.

Malformed requests need a raw client (requests will not send them). Each refusal test
checks the status, that the connection is closed, and that the app never ran.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from backends import wait_for

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge.server import EdgeServer
from pyproxy.wsgi import AbortResponse

WAIT = 5.0  # generous bound for anything that should happen "at once"
LIMITS = LimitsConfig(
    max_request_body=1000,
    max_request_header=2048,
    client_idle_timeout=30.0,
    header_timeout=30.0,
    send_timeout=30.0,
    max_connections=50,
)


@dataclass
class Recorder:
    """A WSGI app that records every request it sees and answers 200 `ok`."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["wsgi.input"].read()
        self.seen.append({**environ, "body": body})
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    def targets(self) -> list[str]:
        return [e["REQUEST_URI"] for e in self.seen]


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


@pytest.fixture
def serve() -> Iterator[Callable[..., EdgeServer]]:
    """serve(app, threads=4, **limits) -> a running EdgeServer on 127.0.0.1, stopped after."""
    started: list[tuple[EdgeServer, threading.Thread]] = []

    def start(app: Callable[..., Any], threads: int = 4, **limits: Any) -> EdgeServer:
        server = EdgeServer(
            app, "127.0.0.1", 0, threads=threads, limits=replace(LIMITS, **limits), name="test"
        )
        thread = threading.Thread(target=server.serve_forever, name="test-edge-loop")
        thread.start()
        started.append((server, thread))
        return server

    try:
        yield start
    finally:
        for server, thread in started:
            server.close()
            thread.join(WAIT)
            assert not thread.is_alive(), "serve_forever did not return after close()"


def connect(server: EdgeServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=WAIT)


def recv_until(sock: socket.socket, marker: bytes, buf: bytes = b"") -> bytes:
    deadline = time.monotonic() + WAIT
    while marker not in buf:
        assert time.monotonic() < deadline, f"no {marker!r} in {buf[:200]!r}"
        data = sock.recv(65536)
        assert data, f"connection closed before {marker!r}; got {buf[:200]!r}"
        buf += data
    return buf


def read_response(sock: socket.socket) -> Response:
    """One response: the head, then a Content-Length, chunked or close-delimited body."""
    buf = recv_until(sock, b"\r\n\r\n")
    raw_head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    response = Response(int(status_line.split()[1]), headers, b"", raw_head)
    if response.header("Content-Length") is not None:
        length = int(response.header("Content-Length") or 0)
        deadline = time.monotonic() + WAIT
        while len(rest) < length:
            assert time.monotonic() < deadline, "body incomplete"
            data = sock.recv(65536)
            assert data, "connection closed mid-body"
            rest += data
        response.body = rest[:length]
    elif response.header("Transfer-Encoding") == "chunked":
        rest = recv_until(sock, b"0\r\n\r\n", rest)
        response.body = rest
    else:
        response.body = rest + read_to_eof(sock)
    return response


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError("connection still open")


def assert_closed(sock: socket.socket) -> None:
    assert read_to_eof(sock) == b""


def exchange(server: EdgeServer, raw: bytes) -> tuple[Response, socket.socket]:
    sock = connect(server)
    sock.sendall(raw)
    return read_response(sock), sock


def assert_refused(server: EdgeServer, app: Recorder, raw: bytes, status: int, why: str) -> None:
    response, sock = exchange(server, raw)
    with sock:
        assert response.status == status, response
        assert response.header("Connection") == "close"
        assert (response.header("Content-Type") or "").startswith("text/plain")
        assert response.body.decode().startswith(f"{status} "), response.body
        assert why in response.body.decode(), response.body
        assert_closed(sock)
    assert app.seen == []


GOOD = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"


def test_a_plain_request_reaches_the_app_and_keeps_the_connection(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    response, sock = exchange(server, GOOD)
    with sock:
        assert (response.status, response.body) == (200, b"ok")
        sock.sendall(GOOD)
        assert read_response(sock).status == 200
    assert app.targets() == ["/", "/"]


def test_forwarding_headers_reach_the_app_for_it_to_judge(serve: Any) -> None:
    # waitress 3 deletes X-Forwarded-* from untrusted peers by default; pyproxy's own
    # trusted_proxies logic needs to see them (and discards them itself).
    app = Recorder()
    server = serve(app)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"
    response, sock = exchange(server, raw)
    sock.close()
    assert response.status == 200
    assert app.seen[0]["HTTP_X_FORWARDED_FOR"] == "192.0.2.1"


def test_repeated_cookie_lines_reach_the_app_as_one_cookie_list(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2, c\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    response, sock = exchange(server, raw)
    sock.close()
    assert response.status == 200
    assert app.seen[0]["HTTP_COOKIE"] == "a=1; b=2, c"  # not "a=1, b=2, c"
    assert app.seen[0]["HTTP_X_A"] == "1, 2"  # other fields: a comma list (RFC 9110 §5.3)


# --- 1. strict request parsing -------------------------------------------------------


def test_content_length_with_transfer_encoding_is_refused_and_nothing_is_smuggled(
    serve: Any,
) -> None:
    app = Recorder()
    server = serve(app)
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert_refused(server, app, raw, 400, "both Content-Length and Transfer-Encoding")


def test_unknown_transfer_coding_is_501(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
    assert_refused(server, app, raw, 501, "Transfer-Encoding")


def test_chunked_twice_is_refused(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    for te in (b"Transfer-Encoding: chunked, chunked\r\n", b"Transfer-Encoding: chunked\r\n" * 2):
        raw = b"POST / HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n0\r\n\r\n"
        assert_refused(server, app, raw, 400, "exactly chunked")


def test_chunked_body_is_accepted(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    response, sock = exchange(server, raw)
    sock.close()
    assert response.status == 200
    assert app.seen[0]["body"] == b"abc"


def test_transfer_encoding_on_http_1_0_is_refused(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    raw = b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert_refused(server, app, raw, 400, "Transfer-Encoding on HTTP/1.0")


def test_missing_host_on_http_1_1_is_refused_but_allowed_on_1_0(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    assert_refused(server, app, b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host")
    response, sock = exchange(server, b"GET / HTTP/1.0\r\n\r\n")
    sock.close()
    assert response.status == 200


def test_repeated_host_is_refused(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    raw = b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: b.test\r\n\r\n"
    assert_refused(server, app, raw, 400, "repeated Host")
    raw = b"GET / HTTP/1.1\r\nHost: a.test, b.test\r\n\r\n"
    assert_refused(server, app, raw, 400, "invalid Host")


def test_repeated_content_length_is_refused(serve: Any) -> None:
    # waitress alone also refuses this (it joins "5, 5" and that is not a number); the
    # rule makes the reason explicit, and holds even if the values are identical.
    app = Recorder()
    server = serve(app)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    assert_refused(server, app, raw, 400, "repeated Content-Length")


@pytest.mark.parametrize(
    "start_line",
    [
        b"GET index.html HTTP/1.1",  # relative
        b"GET example.test:80 HTTP/1.1",  # authority-form is for CONNECT only
        b"GET * HTTP/1.1",  # asterisk-form is for OPTIONS only
        b"GET ftp://example.test/ HTTP/1.1",  # not an HTTP URI
        b"GET http://user@example.test/ HTTP/1.1",  # userinfo
        b"GET http://[::1/ HTTP/1.1",  # waitress's urlsplit() raises on this
        b"GET /a#frag HTTP/1.1",
    ],
)
def test_bad_request_target_forms_are_refused(serve: Any, start_line: bytes) -> None:
    app = Recorder()
    server = serve(app)
    raw = start_line + b"\r\nHost: x\r\n\r\n"
    assert_refused(server, app, raw, 400, "")


def test_good_request_target_forms_reach_the_app(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    for start_line in (b"OPTIONS * HTTP/1.1", b"GET http://example.test/a?b HTTP/1.1"):
        response, sock = exchange(server, start_line + b"\r\nHost: x\r\n\r\n")
        sock.close()
        assert response.status == 200
    assert app.targets() == ["*", "http://example.test/a?b"]


def test_connect_and_trace_reach_the_app_whatever_their_target(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    lines = [b"CONNECT example.test:443", b"CONNECT [::1]:443", b"TRACE *", b"TRACE /x"]
    for line in lines:
        response, sock = exchange(server, line + b" HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
        sock.close()
        assert response.status == 200  # the app decides (pyproxy's answers 405)
    assert [(e["REQUEST_METHOD"], e["REQUEST_URI"]) for e in app.seen] == [
        ("CONNECT", "example.test:443"),
        ("CONNECT", "[::1]:443"),
        ("TRACE", "*"),
        ("TRACE", "/x"),
    ]


def test_obsolete_line_folding_and_other_versions_are_refused(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"
    assert_refused(server, app, raw, 400, "folding")
    assert_refused(server, app, b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505, "HTTP/1.2")


def test_413_for_a_body_over_the_limit(serve: Any) -> None:
    app = Recorder()
    server = serve(app, max_request_body=1000)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n"
    assert_refused(server, app, raw, 413, "413 Request Entity Too Large")
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n"
    assert_refused(server, app, chunked + b"x" * 0x3E9, 413, "413 Request Entity Too Large")
    # exactly the limit is fine
    response, sock = exchange(
        server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    )
    sock.close()
    assert response.status == 200


def test_431_for_headers_over_the_limit(serve: Any) -> None:
    app = Recorder()
    server = serve(app, max_request_header=2048)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
    assert_refused(server, app, raw, 431, "431 Request Header Fields Too Large")


# --- 2. header deadline ------------------------------------------------------------


def test_a_client_trickling_its_headers_is_cut_after_header_timeout(serve: Any) -> None:
    app = Recorder()
    server = serve(app, header_timeout=0.5, client_idle_timeout=30.0)
    with connect(server) as sock:
        began = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        received = b""
        while time.monotonic() - began < WAIT:
            # one more header byte every 0.1 s keeps the connection busy, never idle
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
                continue
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.monotonic() - began
    assert 0.4 < elapsed < 3.0, elapsed
    if received:  # the 408 is best effort
        assert received.startswith(b"HTTP/1.1 408 ")
    assert app.seen == []
    assert wait_for(lambda: server.open_connections() == 0, WAIT)


def worker_is_in(function: str) -> bool:
    """True when the worker thread pyproxy-test-0 is running `function` right now."""
    worker = next(t for t in threading.enumerate() if t.name == "pyproxy-test-0")
    frame = sys._current_frames().get(worker.ident or 0)
    while frame is not None and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


# --- 3. send deadline ----------------------------------------------------------------


def test_a_client_that_stops_reading_is_dropped_and_the_worker_freed(serve: Any) -> None:
    released = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        if environ["PATH_INFO"] == "/next":
            start_response("200 OK", [("Content-Length", "4")])
            yield b"next"
            return
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                yield b"x" * 65536  # far more than the socket buffers hold
        finally:
            released.set()  # waitress closes the iterator when the client is gone

    server = serve(app, threads=1, send_timeout=0.5)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(server.address)
    with stalled:
        stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        assert released.wait(10), "the worker is still stuck writing to the stalled client"
        response, sock = exchange(server, b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.close()
        assert (response.status, response.body) == (200, b"next")


# --- 4. prompt flushing --------------------------------------------------------------


def test_small_streamed_chunks_arrive_one_by_one(serve: Any) -> None:
    go = [threading.Event() for _ in range(3)]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        for n, event in enumerate(go):
            yield f"data: {n}\n\n".encode()
            event.wait(WAIT)  # the next event only after the client saw this one

    server = serve(app)
    with connect(server) as sock:
        sock.sendall(GOOD)
        buf = recv_until(sock, b"\r\n\r\n")
        for n, event in enumerate(go):
            buf = recv_until(sock, f"data: {n}\n\n".encode(), buf)
            event.set()
        recv_until(sock, b"0\r\n\r\n", buf)


def test_headers_go_out_on_an_empty_write(serve: Any) -> None:
    go, returned = threading.Event(), threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/event-stream")])
        write(b"")
        go.wait(WAIT)  # the client must see the head while the app is still here
        returned.set()
        return [b"data: late\n\n"]

    server = serve(app)
    with connect(server) as sock:
        sock.sendall(GOOD)
        head = recv_until(sock, b"\r\n\r\n")
        assert not returned.is_set(), "the head waited for the body"
        assert head.startswith(b"HTTP/1.1 200 ")
        go.set()
        recv_until(sock, b"data: late", head)


# --- 5. no waitress identity ---------------------------------------------------------


def test_no_waitress_server_or_via_header(serve: Any) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        headers = [("Content-Length", "2")]
        if environ["PATH_INFO"] == "/with-server":
            headers += [("Server", "backend/1.0"), ("Via", "1.1 pyproxy-a")]
        start_response("200 OK", headers)
        return [b"ok"]

    server = serve(app)
    with connect(server) as sock:
        for path in (b"/", b"/with-server"):
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            response = read_response(sock)
            assert response.status == 200
            assert b"waitress" not in response.raw_head.lower()
            assert b"pyproxy\r\n" not in response.raw_head + b"\r\n"  # no ident either
        assert response.header("Server") == "backend/1.0"
        assert response.header("Via") == "1.1 pyproxy-a"
    refused, sock = exchange(server, b"GET / HTTP/1.1\r\n\r\n")
    sock.close()
    assert b"waitress" not in refused.raw_head.lower() + refused.body.lower()
    assert refused.header("Server") is None


# --- 6. draining ---------------------------------------------------------------------


def test_draining_adds_connection_close_and_closes_idle_connections(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    with connect(server) as idle, connect(server) as busy:
        idle.sendall(GOOD)
        assert read_response(idle).header("Connection") is None  # keep-alive
        server.draining = True
        assert_closed(idle)  # an idle keep-alive connection is closed when draining
        busy.sendall(GOOD)
        response = read_response(busy)
        assert response.status == 200
        assert response.header("Connection") == "close"
        assert_closed(busy)
    response, sock = exchange(server, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    with sock:
        assert response.header("Connection") == "close"
        assert_closed(sock)


# --- 7. AbortResponse ----------------------------------------------------------------


def test_abort_response_truncates_without_a_traceback(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        if environ["PATH_INFO"] == "/abort":
            raise AbortResponse("backend died")
        raise RuntimeError("a real bug")

    server = serve(app)
    caplog.set_level(logging.DEBUG)
    head, body = raw_exchange_to_eof(server, b"GET /abort HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head + b"\r\n"
    assert body == b"7\r\npartial\r\n"  # no final "0\r\n\r\n": visibly truncated
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    # other exceptions are still logged (and truncate the same way)
    head, body = raw_exchange_to_eof(server, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert body == b"7\r\npartial\r\n"
    assert [r for r in caplog.records if r.exc_info and "a real bug" in str(r.exc_info[1])]


def raw_exchange_to_eof(server: EdgeServer, raw: bytes) -> tuple[bytes, bytes]:
    """Send `raw`; return the response head and everything after it until the close."""
    with connect(server) as sock:
        sock.sendall(raw)
        head, _, body = read_to_eof(sock).partition(b"\r\n\r\n")
    return head, body


# --- plumbing ------------------------------------------------------------------------


def test_port_in_use_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as raised:
            EdgeServer(Recorder(), "127.0.0.1", port, threads=1, limits=LIMITS)
    assert raised.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in str(raised.value.strerror)  # which listener failed


def test_stop_accepting_refuses_new_connections_but_serves_open_ones(serve: Any) -> None:
    app = Recorder()
    server = serve(app)
    with connect(server) as sock:
        sock.sendall(GOOD)
        assert read_response(sock).status == 200
        server.stop_accepting()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.address, timeout=WAIT).close()
        sock.sendall(GOOD)
        assert read_response(sock).status == 200
        assert server.open_connections() == 1


def test_worker_threads_are_named(serve: Any) -> None:
    serve(Recorder(), threads=2)
    names = {t.name for t in threading.enumerate()}
    assert {"pyproxy-test-0", "pyproxy-test-1"} <= names


def test_close_is_prompt_and_frees_a_worker_blocked_on_a_stalled_client(serve: Any) -> None:
    finished = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            for _ in range(2000):
                yield b"x" * 65536  # blocks once waitress holds OUTPUT_BUFFER (1 MiB) for it
        finally:
            finished.set()

    server = serve(app, threads=1)
    with socket.create_connection(server.address) as stalled:
        stalled.sendall(GOOD)
        recv_until(stalled, b"\r\n\r\n")
        assert wait_for(lambda: worker_is_in("_flush_outbufs_below_high_watermark"), WAIT)
        began = time.monotonic()
        server.close()
        assert time.monotonic() - began < 1.5
        assert finished.wait(WAIT), "the worker is still blocked writing"
