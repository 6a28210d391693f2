"""DeadlineWatchdog: one thread that shuts down sockets whose deadline has passed.

A socket timeout bounds each read or send, not a whole wait, so connection.py
registers a socket here while it sends a request or waits for the response head,
with the request's `timeouts.total` deadline. When the deadline passes, the watchdog
shuts the socket down (`shutdown(SHUT_RDWR)`), and the call blocked on it returns at
once. The thread sleeps until the earliest deadline, and ends when nothing is
watched; `watch()` starts it again.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable


class DeadlineWatchdog:
    """Shuts down registered sockets whose deadline has passed.

    Deadlines are read on `clock`, which must be the clock the deadlines were computed
    on: a proxy running on a test's fake clock hands its attempts a watchdog on that
    same clock (the thread still waits in real seconds between looks at it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
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
                now = self._clock()
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


DEADLINE_WATCHDOG = DeadlineWatchdog()  # on time.monotonic; for attempts not given their own
