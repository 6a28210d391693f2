"""The deadline watchdog on an injected clock, and what a broken exchange raises."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import types

import pytest

from pyproxy.pool.deadline import DEADLINE_WATCHDOG, DeadlineWatchdog
from pyproxy.pool.errors import classify
from pyproxy.pool.exchange import exchange
from pyproxy.pool.response_head import StrictResponse
from pyproxy.runtime.snapshot import attempt_timeout


class SteppedClock:
    """A fake clock that says when the watchdog has read it."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.read = threading.Event()

    def __call__(self) -> float:
        self.read.set()
        return self.now


def test_the_watchdog_reads_deadlines_on_its_own_clock() -> None:
    """Deadlines computed on a fake clock are judged on that clock, not on the real
    monotonic one (which would be far past a fake deadline of 100)."""
    clock = SteppedClock(now=0.0)
    watchdog = DeadlineWatchdog(clock=clock)
    kept, kept_peer = socket.socketpair()
    cut, cut_peer = socket.socketpair()
    try:
        token = watchdog.watch(100.0, kept)
        assert clock.read.wait(5)  # the thread looked (under the lock unwatch takes)
        assert watchdog.unwatch(token)  # still watched: the fake deadline is ahead
        clock.now = 200.0
        watchdog.watch(50.0, cut)  # the earliest deadline: wakes the thread at once
        cut_peer.settimeout(5)
        assert cut_peer.recv(1) == b""  # shut down: the peer sees the end at once
        kept_peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            kept_peer.recv(1)  # untouched
    finally:
        for sock in (kept, kept_peer, cut, cut_peer):
            sock.close()


class OnePool:
    """Stands in for a backend's urllib3 pool: one connection, already open, on one
    end of a socket pair; records what comes back to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.conn = types.SimpleNamespace(sock=sock, closed=False)
        self.conn.close = lambda: setattr(self.conn, "closed", True)
        self.returned: list[object] = []

    def _get_conn(self) -> object:
        return self.conn

    def _put_conn(self, conn: object) -> None:
        self.returned.append(conn)


def test_a_tls_error_after_the_request_was_sent_is_a_reset_not_a_connect_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """urllib3 wraps every ssl.SSLError in its SSLError, which reads as a failed
    handshake (nothing sent: retry any method). Once the head went out it is a reset,
    so a POST is never sent to a second backend."""
    ours, backend = socket.socketpair()

    def dies_while_answering(self: StrictResponse) -> None:
        raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")

    monkeypatch.setattr(StrictResponse, "begin", dies_while_answering)
    pool = OnePool(ours)
    try:
        with pytest.raises(Exception) as raised:
            exchange(
                pool, "POST", b"POST / HTTP/1.1\r\nHost: t\r\n\r\n", None,  # type: ignore[arg-type]
                attempt_timeout(1, 1), None, DEADLINE_WATCHDOG,
            )  # fmt: skip
        backend.settimeout(5)
        assert backend.recv(100).startswith(b"POST / HTTP/1.1")  # the head went out
    finally:
        ours.close()
        backend.close()
    failure = classify(raised.value)
    assert (failure.reason, failure.request_sent) == ("reset", True)
    assert pool.conn.closed and pool.returned == [pool.conn]  # discarded, slot given back


def test_attempts_shorter_than_a_thread_start_share_one_watchdog_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A watchdog that ended its thread whenever nothing was watched as it looked
    started a new one for most attempts, when attempts were quicker than a thread
    start (298 threads for 2,000 attempts here)."""
    started: list[str] = []
    start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    watchdog = DeadlineWatchdog()
    ours, peer = socket.socketpair()
    try:
        for _ in range(2000):
            watchdog.unwatch(watchdog.watch(time.monotonic() + 60, ours))
            time.sleep(0.0002)  # the time between two attempts of a busy proxy
    finally:
        ours.close()
        peer.close()
    assert started.count("pyproxy-deadline") <= 2, len(started)
