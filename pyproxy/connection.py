"""The connection class of pyproxy's upstream pools: urllib3's, with two fixes.

1. The request target goes out exactly as the client sent it. urllib3's `urlopen`
   re-encodes it (`%zz` becomes `%25zz`, GUIDE "requests traps"), which changes what
   the backend sees; `request()` below puts the raw target back.
2. The `timeouts.total` deadline holds while waiting for the response headers.

A socket timeout bounds each read, not the whole wait: a backend that trickles its
status line and headers a byte at a time, just under `timeouts.read`, could hold a
request forever (GUIDE, requests traps). So while a worker waits for headers, its
socket is registered here with the request's deadline, and one watchdog thread
(`pyproxy-deadline`) shuts the socket down when the deadline passes. The blocked
read then fails at once, and the attempt reports `deadline_exceeded` (a 504).

Cost on the hot path: one heap push and one dictionary delete per attempt, under a
lock held for nothing else; the watchdog sleeps until the earliest deadline.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection

from pyproxy.errors import UnsendableRequest


class DeadlineWatchdog:
    """Shuts down registered sockets whose deadline (time.monotonic) has passed."""

    def __init__(self) -> None:
        self._lock = threading.Condition()  # guards the heap and the live set
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, sock: socket.socket) -> int:
        with self._lock:
            token = next(self._ids)
            self._live[token] = sock
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pyproxy-deadline", daemon=True
                )
                self._thread.start()
            elif earliest:
                self._lock.notify()
            return token

    def unwatch(self, token: int) -> bool:
        """Stop watching; False if the deadline already fired on this socket."""
        with self._lock:
            # Its heap entry is skipped when it comes up.
            return self._live.pop(token, None) is not None

    def _run(self) -> None:
        while True:
            expired: list[socket.socket] = []
            with self._lock:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, token = heapq.heappop(self._heap)
                    sock = self._live.pop(token, None)
                    if sock is not None:
                        expired.append(sock)
                if not expired:
                    if not self._live:
                        # Nothing to watch: end the thread; watch() starts a new one.
                        self._heap.clear()
                        self._thread = None
                        return
                    if len(self._heap) > 2 * len(self._live) + 1024:
                        # Mostly finished requests: rebuild instead of growing.
                        live = set(self._live)
                        self._heap = [entry for entry in self._heap if entry[1] in live]
                        heapq.heapify(self._heap)
                    wait = self._heap[0][0] - now if self._heap else None
                    self._lock.wait(wait)
                    continue
            for sock in expired:
                with contextlib.suppress(OSError):  # closed: the request finished meanwhile
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once


WATCHDOG = DeadlineWatchdog()
_current = threading.local()  # the attempt this worker thread is making right now


def set_attempt(target: str | None, deadline: float | None) -> None:
    """Set (or with None, None clear) the raw target and deadline of this thread's attempt."""
    _current.target = target
    _current.deadline = deadline


class _AttemptMixin:
    sock: socket.socket | None

    _head_sent = False

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        """Send the request with the client's raw target. An exception raised before
        the head goes to the socket means http.client refused to *build* the request
        (a control byte in the target, a header it cannot encode): nothing reached
        the backend, and errors.not_sent() decides whose fault it is."""
        raw = getattr(_current, "target", None)
        self._head_sent = False
        try:
            return super().request(method, raw or url, *args, **kwargs)  # type: ignore[misc]
        except OSError:
            raise  # the network: connecting, or a kept-alive connection found dead
        except Exception as exc:
            if self._head_sent:
                raise
            raise UnsendableRequest(f"{type(exc).__name__}: {exc}") from exc

    def endheaders(self, *args: Any, **kwargs: Any) -> Any:
        # From here on bytes may reach the backend (http.client connects and sends the
        # buffered head in endheaders); everything before only built the request.
        self._head_sent = True
        return super().endheaders(*args, **kwargs)  # type: ignore[misc]

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        deadline = getattr(_current, "deadline", None)
        if deadline is None or self.sock is None:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        token = WATCHDOG.watch(deadline, self.sock)
        try:
            response = super().getresponse(*args, **kwargs)  # type: ignore[misc]
        finally:
            fired = not WATCHDOG.unwatch(token)
        if fired:
            # The shutdown can also look like the end of the header block to
            # http.client, which then returns a "response" with half its headers.
            response.close()
            raise TimeoutError("timeouts.total reached while waiting for response headers")
        return response


class UpstreamHTTPConnection(_AttemptMixin, HTTPConnection):
    """urllib3's HTTPConnection with the raw target and the header deadline."""


class UpstreamHTTPSConnection(_AttemptMixin, HTTPSConnection):
    """The same for HTTPS backends."""
