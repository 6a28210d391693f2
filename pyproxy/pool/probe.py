"""One health probe: a fresh connection, one GET, at most `health_check.timeout` in all.

A socket timeout bounds one read, not a whole answer: a backend that trickles its
status line, headers or body a byte at a time, just under the timeout, would hold a
probe for as long as it likes. So the probe gives every blocking call only the time
left before its deadline (`_time_left`): the connect, the send, and each read of
the answer (`_DeadlineReader`, which http.client reads the answer through). CPython
treats a socket's timeout as a deadline for one call (`sendall`, an SSL read or
handshake included), so the sum of the calls cannot pass the probe's deadline, and
no watchdog thread is needed. Inside urllib3's connect the probe cannot step in:
each address tried, and an https backend's TLS handshake, get the time that was left
when the connect began; the DNS lookup has the system resolver's own timeouts.

The body is read only up to `MAX_PROBE_BODY` bytes: enough to see that a short
answer arrived whole and to look for `expect_body` in it, never a large or endless
one (so `expect_body` is searched for in that prefix only). The connection is then
closed: a probe never returns a connection to the pool the client traffic uses,
whatever state the answer left it in.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import threading
import time
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

from urllib3.connection import HTTPConnection
from urllib3.exceptions import ProtocolError
from urllib3.util import SKIP_HEADER

from pyproxy import __version__
from pyproxy.config.schema import HealthCheckConfig
from pyproxy.pool.backend import Backend
from pyproxy.pool.connection import AddressRefused
from pyproxy.pool.errors import classify

# The most of a health answer's body a probe reads; the rest is never downloaded.
# HAProxy's checks read the answer into one buffer of tune.bufsize, 16 KiB by default.
MAX_PROBE_BODY = 16 * 1024
MAX_INTERIM = 8  # 1xx answers accepted before the final one (each within the deadline)

# What kind of failure a probe met; the log's hint is chosen by it (health_checker.py).
Cause = Literal["passed", "status", "body", "refused", "forbidden", "timeout", "error"]


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw. `detail` is a few words for the log, /admin/backends and the
    503 body: the status of a pass ("200"), the status and path of a failing answer
    ("404 on /health"), or why it failed ("connection refused", "body lacks 'ok'").
    It never holds an address: the 503 body that repeats it may go to anyone."""

    passed: bool
    detail: str
    body: bytes = b""  # the first MAX_PROBE_BODY bytes of the answer's body at most
    timed_out: bool = False  # it used its whole timeout (the scheduler keeps such apart)
    status: int | None = None  # the final answer's status, if one came
    cause: Cause = "error"


def probe_url(backend: Backend, settings: HealthCheckConfig) -> str:
    """The URL a probe of `backend` requests: its scheme and host, `health_check.port`
    if set, and `health_check.path` (for the log; the Host header may differ)."""
    parts = urlsplit(backend.url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal (RFC 3986 §3.2.2)
    port = settings.port or parts.port
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{settings.path}"


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("health_check.timeout reached")
    return left


class _DeadlineReader(io.RawIOBase):
    """The reading side of a socket where every read waits at most until `deadline`."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)


class _AnswerSource:
    """What http.client.HTTPResponse reads from (it calls `makefile`). One buffered
    reader for the whole answer, so the final response can follow interim ones."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._file = io.BufferedReader(_DeadlineReader(sock, deadline))

    def makefile(self, mode: str) -> io.BufferedReader[_DeadlineReader]:
        return self._file


def _final_response(source: _AnswerSource) -> http.client.HTTPResponse:
    """Read response heads up to the final one. RFC 9110 §15.2: a client must accept
    any number of 1xx answers before it (http.client itself skips only 100)."""
    for _ in range(MAX_INTERIM + 1):
        answer = http.client.HTTPResponse(source, method="GET")  # type: ignore[arg-type]
        answer.begin()
        if not 102 <= answer.status < 200:  # 101 is final (and fails any sane range)
            return answer
        answer.fp = None  # type: ignore[assignment]  # the shared reader stays open
    raise http.client.HTTPException("too many interim responses")


def _read_body(answer: http.client.HTTPResponse) -> bytes:
    """At most MAX_PROBE_BODY bytes of the body; a body cut short raises IncompleteRead."""
    wanted = MAX_PROBE_BODY if answer.length is None else min(MAX_PROBE_BODY, answer.length)
    body = answer.read(wanted)
    if answer.length is not None and len(body) < wanted:
        raise http.client.IncompleteRead(body, wanted - len(body))
    return body


def _describe(exc: Exception) -> tuple[str, Cause]:
    """The hot path's words for what went wrong (errors.classify), and its kind."""
    if isinstance(exc, AddressRefused):  # not the backend's doing: the SSRF guard's
        return str(exc), "forbidden"
    if isinstance(exc, http.client.HTTPException | ConnectionError):
        exc = ProtocolError("health answer", exc)  # as urllib3 wraps these
    try:
        detail = classify(exc).detail
    except Exception:
        return type(exc).__name__, "error"
    if detail == "connection refused":  # also a name that does not resolve
        return detail, "refused"
    if detail in ("connect timeout", "no response in time"):
        return detail, "timeout"
    return detail, "error"


def _judge(status: int, body: bytes, settings: HealthCheckConfig) -> ProbeResult:
    """Pass or fail a complete answer by its status, then by `expect_body`."""
    low, high = settings.expected_status
    if not low <= status <= high:
        detail = f"{status} on {settings.path}"
        return ProbeResult(False, detail, body, status=status, cause="status")
    expected = settings.expect_body
    if expected is not None and expected.encode() not in body:
        # Only the prefix read (MAX_PROBE_BODY) is searched, as HAProxy's
        # `http-check expect string` searches only its check buffer.
        shown = expected if len(expected) <= 40 else expected[:37] + "..."
        return ProbeResult(False, f"body lacks {shown!r}", body, status=status, cause="body")
    return ProbeResult(True, str(status), body, status=status, cause="passed")


class Probe:
    """One probe of `backend`. `run()` does it in the calling thread; `abort()`, from
    any other thread, ends it at once (the shutdown uses it)."""

    def __init__(self, backend: Backend, settings: HealthCheckConfig) -> None:
        self.backend = backend
        self.settings = settings
        self._lock = threading.Lock()  # guards _conn and aborted; never held across I/O
        self._conn: HTTPConnection | None = None
        self.aborted = False

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # closed: the probe ended meanwhile
                sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once

    def run(self) -> ProbeResult:
        settings = self.settings
        deadline = time.monotonic() + settings.timeout
        # urllib3's own factory: the same connection class, TLS settings and socket
        # options as the connections of the pool the client traffic uses.
        conn = cast(HTTPConnection, self.backend.pool._new_conn())
        if settings.port:
            # Set before connecting: the class's connect reads `port`, so an admin-added
            # backend's SSRF check (connection.py) runs on this port's addresses too.
            conn.port = settings.port
        with self._lock:
            if self.aborted:
                return ProbeResult(False, "aborted")
            self._conn = conn  # from here abort() can end it, even in the TLS handshake
        status: int | None = None
        try:
            conn.timeout = _time_left(deadline)  # one wait per address tried
            conn.connect()
            sock = conn.sock
            with self._lock:
                if self.aborted or sock is None:  # aborted while connecting
                    raise ConnectionAbortedError("health probe aborted")
            sock.settimeout(_time_left(deadline))
            conn.request("GET", settings.path, headers=self._headers())
            answer = _final_response(_AnswerSource(sock, deadline))
            status = answer.status
            body = _read_body(answer)
        except Exception as exc:
            detail, cause = _describe(exc)
            if status is not None:
                detail = f"{status}, body failed: {detail}"
            timed_out = time.monotonic() >= deadline
            return ProbeResult(False, detail, timed_out=timed_out, status=status, cause=cause)
        finally:
            conn.close()
        return _judge(status, body, settings)

    def _headers(self) -> dict[str, str]:
        return {
            # As given: a virtual host the backend serves its health page under.
            "Host": self.settings.host or self.backend.netloc,
            "User-Agent": f"pyproxy-health/{__version__}",
            "Accept-Encoding": SKIP_HEADER,  # else http.client adds "identity"
            "Connection": "close",  # one probe, one connection: say so
        }


def check_backend(backend: Backend, settings: HealthCheckConfig) -> tuple[bool, str]:
    """Probe `backend` once: (passed, what happened). Never raises for network errors."""
    result = Probe(backend, settings).run()
    return result.passed, result.detail
