"""DeadlineWatchdog: one thread that shuts down sockets whose deadline has passed.

A socket timeout bounds each read or send, not a whole wait, so exchange.py
registers a socket here while it sends a request and waits for the response head,
with the request's `timeouts.total` deadline. When the deadline passes, the watchdog
shuts the socket down (`shutdown(SHUT_RDWR)`), and the call blocked on it returns at
once.

What is watched is a dict, token -> (deadline, socket): at most one entry per worker
thread, since a worker makes one attempt at a time. `watch()` and `unwatch()` are a
dict store and a dict pop under one lock. The thread sleeps until the earliest
deadline it saw (`_wake_at`) and is woken early only by a deadline earlier than that,
which with one `timeouts.total` for all means almost never: every new deadline is
later than the ones before it. When it wakes it scans the dict (a few dozen entries
at most). It ends only when nothing has been watched for as long as the latest
deadline reached; `watch()` starts it again. (A first version ended it whenever the
dict was empty as it looked, which under load is most of the time: it started a thread
for nearly every attempt until one happened to be in flight, and the proxy ran at a
third of its speed for its first seconds.)

A heap of deadlines would find the earliest without a scan, but a finished attempt
cannot leave a heap cheaply: its entry would wait there until its deadline came up,
60 s later by default, and at 2,000 requests a second the heap would hold 120,000
stale entries, each push paying for them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
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
        self._lock = threading.Condition()  # guards everything below
        self._live: dict[int, tuple[float, socket.socket]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # when the thread looks next, on `clock`
        self._latest = -math.inf  # the latest deadline handed to watch()

    def watch(self, deadline: float, sock: socket.socket) -> int:
        with self._lock:
            token = next(self._ids)
            self._live[token] = (deadline, sock)
            self._latest = max(self._latest, deadline)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pyproxy-deadline", daemon=True
                )
                self._thread.start()
            elif deadline < self._wake_at:
                self._lock.notify()
            return token

    def unwatch(self, token: int) -> bool:
        """Stop watching; False if the deadline already fired on this socket."""
        with self._lock:
            return self._live.pop(token, None) is not None

    def _run(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                expired = [token for token, (due, _) in self._live.items() if due <= now]
                sockets = [self._live.pop(token)[1] for token in expired]
                if not sockets:
                    if self._live:
                        self._wake_at = min(due for due, _ in self._live.values())
                    elif now < self._latest:
                        # Nothing watched this instant, but attempts come and go far
                        # faster than the thread runs: keep the thread (starting one per
                        # attempt would cost more than the attempt) and look again when
                        # the last deadline given out would have come.
                        self._wake_at = self._latest
                    else:
                        # Nothing watched for a whole timeouts.total: end the thread;
                        # watch() starts a new one.
                        self._thread, self._wake_at = None, math.inf
                        return
                    self._lock.wait(self._wake_at - now)
                    continue
            for sock in sockets:
                with contextlib.suppress(OSError):  # closed: the request finished meanwhile
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once


DEADLINE_WATCHDOG = DeadlineWatchdog()  # on time.monotonic; for attempts not given their own
