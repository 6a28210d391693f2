"""Idle keep-alive connections cost the edge server's loop nothing per turn (poller.py).

The loop keeps one poll set and asks a connection for its interest (waitress's
readable()/writable()) only when something happened to it. These tests count those
questions, and check that everything the per-turn questions used to catch still
happens: an idle timeout, a closed idle client, a socket number reused, pipelining.
"""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from backends import wait_for
from rawhttp import RawClient

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge.listener import EdgeChannel
from pyproxy.edge.server import EdgeServer

WAIT = 10.0
LIMITS = LimitsConfig(
    client_idle_timeout=30.0, header_timeout=30.0, send_timeout=30.0, max_connections=200
)
GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@pytest.fixture
def serve() -> Iterator[Callable[..., EdgeServer]]:
    started: list[tuple[EdgeServer, threading.Thread]] = []

    def start(**limits: Any) -> EdgeServer:
        limits = {**LIMITS.__dict__, **limits}
        server = EdgeServer(app, "127.0.0.1", 0, threads=2, limits=LimitsConfig(**limits))
        thread = threading.Thread(target=server.serve_forever, name="test-idle-loop")
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.close()
        thread.join(WAIT)


def kept_open(server: EdgeServer) -> RawClient:
    """A client that made one request and keeps its connection."""
    client = RawClient(*server.address, timeout=WAIT)
    client.send(GET)
    assert client.read_response().status == 200
    return client


def test_idle_connections_are_not_asked_their_interest_on_every_turn(
    serve: Callable[..., EdgeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: collections.Counter[int] = collections.Counter()  # client port -> questions
    readable, writable = EdgeChannel.readable, EdgeChannel.writable

    def counted(method: Callable[[EdgeChannel], Any]) -> Callable[[EdgeChannel], Any]:
        def ask(channel: EdgeChannel) -> Any:
            asked[channel.addr[1]] += 1
            return method(channel)

        return ask

    monkeypatch.setattr(EdgeChannel, "readable", counted(readable))
    monkeypatch.setattr(EdgeChannel, "writable", counted(writable))
    server = serve()
    idle = [kept_open(server) for _ in range(20)]
    try:
        assert wait_for(lambda: server.busy_connections() == 0, WAIT)
        with kept_open(server) as busy:
            for _ in range(3):  # the loop has seen every idle one settle
                busy.send(GET)
                assert busy.read_response().status == 200
            before = {c.sock.getsockname()[1]: asked[c.sock.getsockname()[1]] for c in idle}
            for _ in range(30):
                busy.send(GET)
                assert busy.read_response().status == 200
            assert asked[busy.sock.getsockname()[1]] > 30  # the busy one is asked, each turn
        grown = {port: asked[port] - count for port, count in before.items()}
        # waitress's poll2 asks each one twice per turn: 60+ questions for 30 requests.
        assert max(grown.values()) <= 1, grown
        for client in idle:  # and they are still watched: each is served again
            client.send(GET)
            assert client.read_response().status == 200
    finally:
        for client in idle:
            client.close()


def test_an_idle_connection_is_closed_after_client_idle_timeout(
    serve: Callable[..., EdgeServer],
) -> None:
    # The idle check marks the channel closing between two polls; the poller must hear
    # of it, or the quiet channel would never be asked again and never closed.
    server = serve(client_idle_timeout=0.3)
    with kept_open(server) as client:
        assert client.closed_by_peer(timeout=WAIT)
    assert wait_for(lambda: server.open_connections() == 0, WAIT)


def test_idle_clients_that_leave_are_forgotten_and_their_numbers_reused(
    serve: Callable[..., EdgeServer],
) -> None:
    # A closed socket's number comes back with the next accept(): the new connection
    # must be watched, not mistaken for the old registration.
    server = serve()
    stay = [kept_open(server) for _ in range(10)]
    try:
        for _ in range(5):
            leaving = [kept_open(server) for _ in range(20)]
            for client in leaving:
                client.close()
            assert wait_for(lambda: server.open_connections() == len(stay), WAIT)
        for client in stay:
            client.send(GET)
            assert client.read_response().status == 200
    finally:
        for client in stay:
            client.close()


def test_pipelined_requests_on_a_kept_connection_are_all_answered_in_order(
    serve: Callable[..., EdgeServer],
) -> None:
    server = serve()
    with kept_open(server) as client:
        client.send(GET.replace(b"/", b"/a", 1) + GET.replace(b"/", b"/b", 1) + GET)
        assert [client.read_response().status for _ in range(3)] == [200, 200, 200]
        client.send(GET)
        assert client.read_response().status == 200


def test_a_client_half_closing_an_idle_connection_is_closed(
    serve: Callable[..., EdgeServer],
) -> None:
    server = serve()
    with kept_open(server) as client:
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed_by_peer(timeout=WAIT)
    assert wait_for(lambda: server.open_connections() == 0, WAIT)


class CountingPollSet:
    """The poller's poll set, recording each call and whether the kernel refused it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[str, bool]] = []  # (method, refused)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)
        if name not in ("register", "modify", "unregister"):
            return method

        def counted(*args: Any) -> Any:
            try:
                result = method(*args)
            except OSError:
                self.calls.append((name, True))
                raise
            self.calls.append((name, False))
            return result

        return counted


def test_a_request_costs_the_poll_set_no_refused_call(
    serve: Callable[..., EdgeServer],
) -> None:
    # While a request is served its connection leaves the poll set; it comes back with
    # register(), not with a modify() the kernel refuses (a syscall and an exception).
    server = serve()
    poll_set = CountingPollSet(server._poller._poll)
    with kept_open(server) as client:
        assert wait_for(lambda: server.busy_connections() == 0, WAIT)
        server._poller._poll = poll_set  # between two requests: the loop waits in poll()
        for _ in range(5):
            client.send(GET)
            assert client.read_response().status == 200
        calls = list(poll_set.calls)  # before the client leaves (its close is refused)
    assert [refused for _, refused in calls if refused] == []
    assert ("register", False) in calls  # it did come back
