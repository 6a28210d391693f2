"""How the edge server hands a response to the socket, counted at the socket.

A small response leaves in one send(): its head and its body together (a second
send per request was a syscall and a pass through the channel's locked buffer).
What must not change with it: a streamed body still leaves part by part as the app
yields it (server-sent events), a large first part is not copied onto the head, and
the head is byte for byte what waitress would frame, minus waitress's identity.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from backends import wait_for
from rawhttp import RawClient
from waitress.buffers import OverflowableBuffer

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge import tasks
from pyproxy.edge.listener import EdgeChannel
from pyproxy.edge.server import EdgeServer

WAIT = 10.0
LIMITS = LimitsConfig(client_idle_timeout=30.0, header_timeout=30.0, send_timeout=30.0)
GET = b"GET /%s HTTP/1.1\r\nHost: test\r\n\r\n"
MiB = 1024 * 1024
EVENT = b"data: one\n\n"
HUGE = 16 * MiB
PATTERN = bytes(range(256))  # a byte out of place shows


class App:
    """/small (Content-Length), /chunked (no length), /big (1 MiB), /events (two events,
    the second only once the test says the client has the first)."""

    def __init__(self) -> None:
        self.first_event_read = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ["PATH_INFO"]
        if path == "/small":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        if path == "/chunked":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return iter([b"ok"])  # no len(): waitress cannot infer a Content-Length
        if path == "/huge":  # more than the kernel's buffers hold, in one part
            start_response("200 OK", [("Content-Length", str(HUGE))])
            return [PATTERN * (HUGE // len(PATTERN))]
        if path == "/big":
            start_response("200 OK", [("Content-Length", str(MiB))])
            return [b"x" * MiB]
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return self._events()

    def _events(self) -> Iterator[bytes]:
        yield EVENT
        # The client must get the first event while the second does not exist yet.
        if not self.first_event_read.wait(WAIT):
            raise AssertionError("the first event never reached the client")
        yield b"data: two\n\n"


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every send() the edge's channels make, with the bytes the socket took."""
    sent: list[bytes] = []
    original = EdgeChannel.send

    def counted(channel: EdgeChannel, data: bytes, do_close: bool = True) -> int:
        n: int = original(channel, data, do_close=do_close)
        if n:
            sent.append(bytes(data[:n]))
        return n

    monkeypatch.setattr(EdgeChannel, "send", counted)
    return sent


@pytest.fixture
def server(app: App) -> Iterator[EdgeServer]:
    edge = EdgeServer(app, "127.0.0.1", 0, threads=2, limits=LIMITS)
    loop = threading.Thread(target=edge.serve_forever, name="test-writes-loop")
    loop.start()
    yield edge
    edge.close()
    loop.join(WAIT)


def settle(server: EdgeServer) -> None:
    """Wait until the server is done with the response the client has read: its last
    send() returns (and is counted) a moment after the client has the bytes."""
    assert wait_for(lambda: server.busy_connections() == 0, WAIT)


def test_a_small_response_leaves_in_one_send(server: EdgeServer, sends: list[bytes]) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        for _ in range(3):  # and again on the same connection
            client.send(GET % b"small")
            response = client.read_response()
            assert (response.status, response.body) == (200, b"ok")
        settle(server)
    assert len(sends) == 3
    assert all(data.endswith(b"\r\n\r\nok") for data in sends)


def test_what_the_socket_takes_whole_never_enters_the_output_buffer(
    server: EdgeServer, sends: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    buffered: list[int] = []
    append = OverflowableBuffer.append

    def counted(buffer: OverflowableBuffer, data: bytes) -> None:
        buffered.append(len(data))
        append(buffer, data)

    monkeypatch.setattr(OverflowableBuffer, "append", counted)
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(GET % b"small")
        assert client.read_response().body == b"ok"
        settle(server)
        assert (len(sends), buffered) == (1, [])
        client.send(GET % b"big")
        response = client.read_response()
        settle(server)
    assert len(response.body) == MiB and response.complete
    head, *body = sends[1:]
    assert head.endswith(b"\r\n\r\n") and b"".join(body) == b"x" * MiB
    assert sum(buffered) <= MiB  # whatever the socket did not take at once, no more


def test_a_slow_reader_still_gets_every_byte_in_order(server: EdgeServer) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(GET % b"huge")
        head = client.read_head()
        # The socket took what it could at once; the rest waits in the output buffer.
        assert wait_for(lambda: server.buffered_output() > 0, WAIT)
        body = client.reader.read(HUGE)
    assert head.status == 200 and body == PATTERN * (HUGE // len(PATTERN))


def test_a_chunked_response_sends_head_and_first_chunk_together(
    server: EdgeServer, sends: list[bytes]
) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(GET % b"chunked")
        response = client.read_response()
        settle(server)
    assert (response.framing, response.complete, response.body) == ("chunked", True, b"ok")
    # The last chunk follows on its own: the app might have yielded more.
    assert sends == [sends[0], b"0\r\n\r\n"]
    assert sends[0].endswith(b"\r\n\r\n2\r\nok\r\n")


def test_a_refusal_leaves_in_one_send(server: EdgeServer, sends: list[bytes]) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(b"GET / HTTP/1.1\r\n\r\n")  # no Host
        response = client.read_response()
    assert response.status == 400
    settle(server)
    assert len(sends) == 1


def test_a_large_first_part_is_sent_after_the_head_not_joined_to_it(
    server: EdgeServer, sends: list[bytes]
) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(GET % b"big")
        response = client.read_response()
    assert len(response.body) == MiB and response.complete
    head = sends[0]
    assert head.endswith(b"\r\n\r\n") and len(head) < 1024  # the head alone


def test_events_still_leave_one_by_one(server: EdgeServer, app: App) -> None:
    with RawClient(*server.address, timeout=WAIT) as client:
        client.send(GET % b"events")
        response = client.read_head()
        assert response.header("Transfer-Encoding") == "chunked"
        chunks = client.iter_chunks(response)
        assert next(chunks) == EVENT  # before the app has the second one
        app.first_event_read.set()
        assert list(chunks) == [b"data: two\n\n"]
        assert response.complete


# -- the head, against waitress's own as the reference ----------------------------


class _Channel:
    def __init__(self, draining: bool) -> None:
        self.server = type("Server", (), {"draining": draining})()
        self.server.adj = type("Adj", (), {"ident": "pyproxy"})()


class _Request:
    def __init__(self, version: str, connection: str | None, command: str) -> None:
        self.version, self.command = version, command
        self.headers = {} if connection is None else {"CONNECTION": connection}


HEADERS = [
    [("Content-Type", "text/plain"), ("content-length", "5")],
    [("set-cookie", "a=1"), ("X-request-id", "r"), ("Set-Cookie", "b=2"), ("via", "1.1 p")],
    [("Server", "nginx"), ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"), ("ETag", '"x"')],
    [("www-authenticate", "Basic"), ("Content-Length", "0")],
]


@pytest.mark.parametrize("headers", HEADERS)
@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("connection", [None, "close", "keep-alive"])
@pytest.mark.parametrize("status", ["200 OK", "404 Not Found", "201 Created"])
def test_a_head_is_waitresss_minus_its_identity(
    headers: list[tuple[str, str]], version: str, connection: str | None, status: str
) -> None:
    """Where waitress frames a response as pyproxy wants it (a Content-Length, or none
    needed), the head is waitress's byte for byte, without its Server/Via line."""
    from waitress.task import Task

    heads = []
    for task_class in (Task, tasks.EdgeTask):
        task = task_class(_Channel(draining=False), _Request(version, connection, "GET"))
        task.status, task.response_headers = status, list(headers)
        task.content_length, task.start_time = 5, 1_700_000_000.25
        heads.append((task.build_response_header(), task.close_on_finish))
    (waitress, waitress_closes), (ours, we_close) = heads
    app_sent_server = any(name == "Server" for name, _ in headers)
    identity = b"\r\nVia: pyproxy\r\n" if app_sent_server else b"\r\nServer: pyproxy\r\n"
    assert identity in waitress
    assert ours == waitress.replace(identity, b"\r\n", 1)
    assert we_close == waitress_closes


def test_the_date_is_made_once_a_second_and_is_waitresss() -> None:
    from waitress.utilities import build_http_date

    now = time.time()
    for when in (now, now + 0.4, now + 1, 1_700_000_000.999, 1_700_000_001.0, 86_399.5):
        assert tasks._http_date(when) == build_http_date(when)


def test_a_flood_of_header_names_does_not_grow_the_name_cache_without_bound() -> None:
    for n in range(tasks._CANONICAL_NAMES_MAX + 50):
        assert tasks._canonical_name(f"x-name-{n}") == f"X-Name-{n}"
    assert len(tasks._CANONICAL_NAMES) <= tasks._CANONICAL_NAMES_MAX


# -- waking the loop at the end of a request ---------------------------------------


class WaitingApp:
    """/wait answers once the test allows it; anything else at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.may_answer = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["PATH_INFO"] == "/wait":
            self.entered.set()
            self.may_answer.wait(WAIT)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]


@pytest.fixture
def waiting_server() -> Iterator[tuple[EdgeServer, WaitingApp]]:
    app = WaitingApp()
    edge = EdgeServer(app, "127.0.0.1", 0, threads=4, limits=LIMITS)
    # A wake-up the loop needed and did not get would now stall it for a minute, not
    # for one tick: the client's read times out first and the test fails.
    edge._tick = 60.0
    loop = threading.Thread(target=edge.serve_forever, name="test-wake-loop")
    loop.start()
    yield edge, app
    app.may_answer.set()
    edge.close()
    loop.join(WAIT)


def test_a_request_ending_while_the_loop_is_busy_does_not_wake_it(
    waiting_server: tuple[EdgeServer, WaitingApp], monkeypatch: pytest.MonkeyPatch
) -> None:
    edge, app = waiting_server
    pulls: list[int] = []
    trigger = edge._server.trigger
    pull = trigger._physical_pull
    monkeypatch.setattr(trigger, "_physical_pull", lambda: (pulls.append(1), pull())[1])
    in_loop, release = threading.Event(), threading.Event()

    def hold_the_loop() -> None:  # as if it were handling other clients' events
        in_loop.set()
        release.wait(WAIT)

    with RawClient(*edge.address, timeout=WAIT) as client:
        client.send(GET % b"wait")
        assert app.entered.wait(WAIT)
        holder = threading.Thread(target=edge._on_loop, args=(hold_the_loop,))
        holder.start()
        try:
            assert in_loop.wait(WAIT)
            pulls.clear()
            app.may_answer.set()
            assert client.read_response().body == b"ok"  # the worker sent it itself
            (channel,) = edge._server.active_channels.values()
            assert wait_for(lambda: channel.responses == 1, WAIT)  # service() returned
            assert pulls == []  # the loop will look at the connection before it waits
        finally:
            release.set()
            holder.join(WAIT)
        # ... and it did: the connection is read again, with no wake-up ever sent.
        client.send(GET % b"again")
        assert client.read_response().body == b"ok"


def test_many_clients_many_requests_none_waits_for_a_wake_up(
    waiting_server: tuple[EdgeServer, WaitingApp],
) -> None:
    edge, _ = waiting_server
    failures: list[BaseException] = []

    def client_run() -> None:
        try:
            with RawClient(*edge.address, timeout=WAIT) as client:
                for _ in range(150):
                    client.send(GET % b"small")
                    assert client.read_response().body == b"ok"
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    clients = [threading.Thread(target=client_run) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(WAIT * 6)
    assert not failures
    assert not any(thread.is_alive() for thread in clients)
