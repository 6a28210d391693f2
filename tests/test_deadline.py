"""The deadline watchdog on an injected clock, and `attempt_context`, the one way an
attempt's raw target and deadline reach the connection that sends it."""

from __future__ import annotations

import socket
import threading

import pytest

from pyproxy.pool import connection
from pyproxy.pool.connection import attempt_context
from pyproxy.pool.deadline import DEADLINE_WATCHDOG, DeadlineWatchdog


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


def test_attempt_context_sets_and_clears_the_attempt_together() -> None:
    assert connection._attempt() is None
    own = DeadlineWatchdog()
    with attempt_context("/raw%zz?x", 12.5, own) as attempt:
        assert connection._attempt() is attempt
        assert (attempt.target, attempt.deadline, attempt.watchdog) == ("/raw%zz?x", 12.5, own)
    assert connection._attempt() is None
    with pytest.raises(RuntimeError), attempt_context("/fails", None):
        raise RuntimeError("the attempt failed")
    assert connection._attempt() is None  # cleared on the way out of an exception too
    with attempt_context("/default", None) as attempt:
        assert attempt.watchdog is DEADLINE_WATCHDOG  # when the caller brings none


def test_the_attempt_is_per_thread() -> None:
    seen: list[object] = []
    with attempt_context("/here", None):
        worker = threading.Thread(target=lambda: seen.append(connection._attempt()))
        worker.start()
        worker.join(5)
    assert seen == [None]


def test_a_tls_error_after_the_request_was_sent_is_a_reset_not_a_connect_error() -> None:
    """urllib3 wraps every ssl.SSLError in its SSLError, which reads as a failed
    handshake (nothing sent: retry any method). Once the head went out it is a reset,
    so a POST is never sent to a second backend."""
    import ssl

    from urllib3.exceptions import ProtocolError

    from pyproxy.pool.connection import _AttemptMixin
    from pyproxy.pool.errors import classify

    class DiesWhileAnswering:
        sock = None

        def getresponse(self) -> None:
            raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")

    class Connection(_AttemptMixin, DiesWhileAnswering):
        pass

    with pytest.raises(ConnectionResetError) as raised:
        Connection().getresponse()
    # What urllib3's urlopen makes of an OSError from getresponse():
    failure = classify(ProtocolError("Connection aborted.", raised.value))
    assert (failure.reason, failure.request_sent) == ("reset", True)
