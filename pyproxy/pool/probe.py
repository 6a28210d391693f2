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
answer arrived whole (and for a future check of the body's content), never a large
or endless one. The connection is then closed: a probe never returns a connection
to the pool the client traffic uses, whatever state the answer left it in.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import threading
import time
from dataclasses import dataclass
from typing import cast

from urllib3.connection import HTTPConnection
from urllib3.exceptions import ProtocolError
from urllib3.util import SKIP_HEADER

from pyproxy import __version__
from pyproxy.config.schema import HealthCheckConfig
from pyproxy.pool.backend import Backend
from pyproxy.pool.errors import classify

# The most of a health answer's body a probe reads; the rest is never downloaded.
# HAProxy's checks read the answer into one buffer of tune.bufsize, 16 KiB by default.
MAX_PROBE_BODY = 16 * 1024
MAX_INTERIM = 8  # 1xx answers accepted before the final one (each within the deadline)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw. `detail` is a few words for the log and /admin/backends:
    the status ("200"), or why it failed ("connection refused", "no response in time")."""

    passed: bool
    detail: str
    body: bytes = b""  # the first MAX_PROBE_BODY bytes of the answer's body at most
    timed_out: bool = False  # it used its whole timeout (the scheduler keeps such apart)


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


def _describe(exc: Exception) -> str:
    """The hot path's words for what went wrong (errors.classify)."""
    if isinstance(exc, http.client.HTTPException | ConnectionError):
        exc = ProtocolError("health answer", exc)  # as urllib3 wraps these
    try:
        return classify(exc).detail
    except Exception:
        return type(exc).__name__


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
            detail = _describe(exc)
            if status is not None:
                detail = f"{status}, body failed: {detail}"
            timed_out = time.monotonic() >= deadline
            return ProbeResult(False, detail, timed_out=timed_out)
        finally:
            conn.close()
        low, high = settings.expected_status
        return ProbeResult(low <= status <= high, str(status), body)

    def _headers(self) -> dict[str, str]:
        return {
            "Host": self.backend.netloc,
            "User-Agent": f"pyproxy-health/{__version__}",
            "Accept-Encoding": SKIP_HEADER,  # else http.client adds "identity"
            "Connection": "close",  # one probe, one connection: say so
        }


def check_backend(backend: Backend, settings: HealthCheckConfig) -> tuple[bool, str]:
    """Probe `backend` once: (passed, what happened). Never raises for network errors."""
    result = Probe(backend, settings).run()
    return result.passed, result.detail
