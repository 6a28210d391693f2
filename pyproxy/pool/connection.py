"""The connection class of pyproxy's upstream pools: urllib3's, with four fixes.

1. The request target goes out exactly as the client sent it. urllib3's `urlopen`
   re-encodes it (`%zz` becomes `%25zz`), which changes what the backend sees;
   `request()` below puts the raw target back.
2. The response head is read strictly (upstream_head.StrictResponse): whatever a
   backend writes, what comes back is valid HTTP or an exception, never a hang.
3. The `timeouts.total` deadline holds while the request is sent and while waiting
   for the response head.
4. Connections to backends added through the admin API (`check_peer`) go only to
   addresses the SSRF guard allows (urlguard.py), checked on the address actually
   dialled: a name can resolve differently after the admin check. Config-file
   backends are the operator's own choice and are not checked.

A socket timeout bounds each read or send, not the whole wait: a backend that
trickles its status line and headers a byte at a time, just under `timeouts.read`,
could hold a request forever, and so could one that reads the request body a little
at a time, keeping its TCP window almost shut. So while a worker sends a request or
waits for the head, its socket is registered here with the request's deadline, and
one watchdog thread (`pyproxy-deadline`) shuts the socket down when the deadline
passes. The blocked call then fails at once, and the attempt reports
`deadline_exceeded` (a 504).

Cost on the hot path: per send() call and per response head, one heap push and one
dictionary delete, under a lock held for nothing else; the watchdog sleeps until the
earliest deadline.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import itertools
import socket
import threading
import time
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import NameResolutionError, NewConnectionError

from pyproxy.pool import urlguard
from pyproxy.pool.errors import UnsendableRequest
from pyproxy.pool.response_head import StrictResponse


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
    # What http.client's getresponse() builds: the strict head reader.
    response_class: type[http.client.HTTPResponse] = StrictResponse
    host: str
    port: int
    _dns_host: str  # urllib3's: the name it resolves, self.host without a trailing dot
    check_peer = False  # True for admin-added backends: see _new_conn

    def _new_conn(self) -> socket.socket:
        """Open the TCP connection; for an admin-added backend, resolve the name once,
        refuse it if any answer is forbidden, and dial exactly the answers checked
        (letting urllib3 resolve again could get another, DNS rebinding). Called once
        per new connection, not per request; config backends skip it entirely."""
        if not self.check_peer:
            return super()._new_conn()  # type: ignore[misc]
        name = self._dns_host
        try:
            addresses = urlguard.resolve_allowed(name, self.port)
        except urlguard.ForbiddenAddress as refused:
            why = f"refused to connect to {self.host}: {refused}"
            raise NewConnectionError(self, why) from None  # type: ignore[arg-type]
        except OSError as error:  # socket.gaierror: the name does not resolve
            raise NameResolutionError(self.host, self, error) from error  # type: ignore[arg-type]
        failure: Exception | None = None
        try:
            for address in addresses:
                self._dns_host = address  # a literal: urllib3 connects without a lookup
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except NewConnectionError as error:  # also connect timeouts; try the next
                    failure = error
        finally:
            self._dns_host = name
        assert failure is not None  # resolve_allowed returns at least one address
        raise failure

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
            # The deadline passed just as the head came in: the socket is shut down,
            # so the body could not follow.
            response.close()
            raise TimeoutError("timeouts.total reached while waiting for response headers")
        return response

    def send(self, data: Any) -> None:
        """http.client's send() of the request head or a piece of the body, within the
        deadline. Unwatched only on a connection not yet open: http.client connects
        first (bounded by the connect timeout) to send the head, which an empty socket
        buffer takes at once."""
        deadline = getattr(_current, "deadline", None)
        if deadline is None or self.sock is None:
            return super().send(data)  # type: ignore[misc]
        token = WATCHDOG.watch(deadline, self.sock)
        try:
            super().send(data)  # type: ignore[misc]
        finally:
            if not WATCHDOG.unwatch(token):
                # The watchdog shut the socket down under sendall, which then failed
                # with a BrokenPipeError that urllib3 would swallow (hoping for an early
                # response). The cause is the deadline; say so.
                raise TimeoutError("timeouts.total reached while sending the request")


class UpstreamHTTPConnection(_AttemptMixin, HTTPConnection):
    """urllib3's HTTPConnection with the raw target, the strict head and the deadline."""


class UpstreamHTTPSConnection(_AttemptMixin, HTTPSConnection):
    """The same for HTTPS backends."""


class CheckedHTTPConnection(UpstreamHTTPConnection):
    """For backends added through the admin API: every peer address is checked."""

    check_peer = True


class CheckedHTTPSConnection(UpstreamHTTPSConnection):
    """The same for HTTPS backends added through the admin API."""

    check_peer = True


def connection_class(scheme: str, source: str) -> type[HTTPConnection]:
    """The connection class for a backend's pool, by its scheme and source ("config"
    from the file, "admin" added through the admin API)."""
    if source == "admin":
        return CheckedHTTPSConnection if scheme == "https" else CheckedHTTPConnection
    return UpstreamHTTPSConnection if scheme == "https" else UpstreamHTTPConnection
