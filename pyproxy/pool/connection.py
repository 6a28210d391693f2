"""The connection class of pyproxy's upstream pools: urllib3's, with four fixes.

1. The request target goes out exactly as the client sent it. urllib3's `urlopen`
   re-encodes it (`%zz` becomes `%25zz`), which changes what the backend sees;
   `request()` below puts the raw target back.
2. The response head is read strictly (response_head.StrictResponse): whatever a
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

How the attempt reaches the connection: `with attempt_context(target, deadline):`
around the urllib3 call. urllib3 offers no other way in: `HTTPConnectionPool.urlopen`
takes the connection from its pool queue itself (`_get_conn`), calls
`conn.request(method, url, body=, headers=, chunked=, preload_content=,
decode_content=, enforce_content_length=)` with exactly those arguments and then
`conn.getresponse()` with none (urllib3 2.x, connectionpool.py `_make_request`). So
the attempt is kept in a thread-local for the duration of the `with` block: the
worker thread that makes the attempt is the one that runs these calls. The context
manager sets it and clears it in one place, so the two cannot drift apart.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from types import TracebackType
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from pyproxy.pool import urlguard
from pyproxy.pool.deadline import DEADLINE_WATCHDOG, DeadlineWatchdog
from pyproxy.pool.errors import UnsendableRequest
from pyproxy.pool.response_head import StrictResponse

_current = threading.local()  # .attempt: the AttemptContext this worker thread is inside


class AttemptContext:
    """One attempt's raw target, deadline and watchdog, seen by the connection that
    sends it while the `with` block runs (see the module docstring for why)."""

    __slots__ = ("deadline", "target", "watchdog")

    def __init__(self, target: str, deadline: float | None, watchdog: DeadlineWatchdog) -> None:
        self.target = target
        self.deadline = deadline
        self.watchdog = watchdog

    def __enter__(self) -> AttemptContext:
        # Attempts do not nest: a worker makes one at a time, so leaving clears.
        _current.attempt = self
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _current.attempt = None


def attempt_context(
    target: str, deadline: float | None, watchdog: DeadlineWatchdog = DEADLINE_WATCHDOG
) -> AttemptContext:
    """`with attempt_context(target, deadline):` around the urllib3 call of one attempt:
    inside, the connection sends `target` as the client wrote it and holds `deadline`
    (on `watchdog`'s clock) while sending and waiting for the response head."""
    return AttemptContext(target, deadline, watchdog)


def _attempt() -> AttemptContext | None:
    return getattr(_current, "attempt", None)


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
                except ConnectTimeoutError as error:  # refused or timed out: try the next
                    # (NewConnectionError, a refusal, is a ConnectTimeoutError in urllib3 2)
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
        attempt = _attempt()
        target = attempt.target if attempt is not None else url
        self._head_sent = False
        try:
            return super().request(method, target, *args, **kwargs)  # type: ignore[misc]
        except ssl.SSLError as exc:
            if self._head_sent:
                raise _broken_after_sending(exc) from exc
            raise
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
        attempt = _attempt()
        if attempt is None or attempt.deadline is None or self.sock is None:
            return self._read_response(*args, **kwargs)
        watchdog = attempt.watchdog
        token = watchdog.watch(attempt.deadline, self.sock)
        try:
            response = self._read_response(*args, **kwargs)
        finally:
            fired = not watchdog.unwatch(token)
        if fired:
            # The deadline passed just as the head came in: the socket is shut down,
            # so the body could not follow.
            response.close()
            raise TimeoutError("timeouts.total reached while waiting for response headers")
        return response

    def _read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        except ssl.SSLError as exc:
            raise _broken_after_sending(exc) from exc

    def send(self, data: Any) -> None:
        """http.client's send() of the request head or a piece of the body, within the
        deadline. Unwatched only on a connection not yet open: http.client connects
        first (bounded by the connect timeout) to send the head, which an empty socket
        buffer takes at once."""
        attempt = _attempt()
        if attempt is None or attempt.deadline is None or self.sock is None:
            return super().send(data)  # type: ignore[misc]
        watchdog = attempt.watchdog
        token = watchdog.watch(attempt.deadline, self.sock)
        try:
            super().send(data)  # type: ignore[misc]
        finally:
            if not watchdog.unwatch(token):
                # The watchdog shut the socket down under sendall, which then failed
                # with a BrokenPipeError that urllib3 would swallow (hoping for an early
                # response). The cause is the deadline; say so.
                raise TimeoutError("timeouts.total reached while sending the request")


def _broken_after_sending(exc: ssl.SSLError) -> ConnectionResetError:
    """A TLS error once the request head went out (the backend died mid-exchange, e.g.
    SSLEOFError) is a reset, not a failed handshake: urllib3 wraps every ssl.SSLError
    in its SSLError, which reads as "nothing was sent, retry any method", and a POST
    would then be sent twice."""
    return ConnectionResetError(f"TLS connection broke after the request was sent: {exc}")


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
