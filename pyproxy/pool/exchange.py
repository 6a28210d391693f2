"""One request and its response head on a pooled backend connection, written directly.

This is the hot path's network half. urllib3's `urlopen` is built for a client that
knows nothing of the request it sends: it parses and re-encodes the URL, merges
default headers, builds a Retry and a Timeout, writes the head through http.client's
`putheader` one field at a time (each validated, encoded and appended separately),
and wraps the response in two more objects with a second header dictionary. A proxy
knows all of that already: the edge has parsed and checked the request, the headers
are a dict of strings, retrying is pyproxy's own decision. Going through urlopen cost
about 40% of pyproxy's CPU per request (docs/performance.md has the profile).

So the exchange is written here, in the order a backend sees it:

1. a connection from the backend's pool: the urllib3 HTTPConnectionPool of its
   requests.Session adapter, which keeps the idle keep-alive connections, checks a
   pooled one is still open (a peer that closed an idle connection would otherwise
   cost a failed request), and dials new ones (TLS included; for admin-added
   backends, only to addresses the SSRF guard allows: connection.py);
2. the head in one buffer, checked once against the RFC 9112 grammar and sent with
   the body in one `sendall` when the body is in memory;
3. the head of the answer read by `StrictResponse` (response_head.py);
4. the body read by http.client's `read1`, which knows Content-Length, chunked and
   close-delimited framing; the connection goes back to the pool as soon as the last
   byte is read (or is closed, if the backend said so or the body was abandoned).

`timeouts.total` is held from the first byte sent to the end of the head: the socket
is registered once with the deadline watchdog (deadline.py), which shuts it down when
the deadline passes, so a backend trickling its head a byte at a time, or reading the
body with its TCP window almost shut, cannot stretch an attempt past the deadline.
Exceptions are those urllib3's urlopen raised for the same events, so errors.classify
reads both the same way.
"""

from __future__ import annotations

import errno
import http.client
import re
import socket
import ssl
from typing import IO, cast

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, ProtocolError, ReadTimeoutError

from pyproxy.pool.deadline import DeadlineWatchdog
from pyproxy.pool.errors import UnsendableRequest
from pyproxy.pool.response_head import StrictResponse

# RFC 9112 §3 and §5: request-line = method SP request-target SP HTTP-version, each field
# line `token ":" SP value`, the value free of CR, LF and other controls but HTAB. The
# edge refused anything else already; this is the last check before bytes leave, so
# that nothing pyproxy adds (a config header, a rewritten target) can split a head.
# The target is visible ASCII; the method a token (RFC 9110 §9.1).
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+ [\x21-\x7e]+ HTTP/1\.1\r\n")
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z\-]+: [\t\x20-\x7e\x80-\xff]*\r\n)*\r\n")
# RFC 9110 §8.6: a request whose method defines a body but has none says so with
# Content-Length: 0 (http.client and urllib3 do the same).
_BODYLESS_METHODS = frozenset(("GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"))
# Bodies at most this large go out with the head in one sendall (one system call and,
# on loopback, one segment); larger ones are sent after it rather than copied.
_JOIN_BODY_UP_TO = 64 * 1024
_FILE_BLOCK = 64 * 1024


def request_head(
    method: str, target: str, headers: dict[str, str], body: bytes | IO[bytes] | None
) -> bytes:
    """The request head as bytes, or UnsendableRequest when it cannot be written as
    HTTP/1.1 (never a backend's fault: errors.not_sent answers 400 or 500)."""
    if "Content-Length" not in headers and "content-length" not in headers:
        if isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        elif body is None and method not in _BODYLESS_METHODS:
            headers["Content-Length"] = "0"
    parts = [method, " ", target, " HTTP/1.1\r\n"]
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    parts.append("\r\n")
    try:
        # join() refuses anything but str (a None where a value belongs is pyproxy's
        # bug: a 500, never the text "None" sent on); latin-1 because field values are
        # octets (RFC 9110 §5.5), the request line's ASCII is checked just below.
        head = "".join(parts).encode("latin-1")
    except (TypeError, UnicodeEncodeError) as exc:
        raise UnsendableRequest(f"{type(exc).__name__}: {exc}") from exc
    request_line = _REQUEST_LINE.match(head)
    if request_line is None:
        bad_target = http.client.InvalidURL(f"cannot send the request target {target[:80]!r}")
        raise UnsendableRequest(str(bad_target)) from bad_target
    if _FIELD_LINES.fullmatch(head, request_line.end()) is None:
        bad_field = ValueError("a header name or value that cannot be written as HTTP/1.1")
        raise UnsendableRequest(str(bad_field)) from bad_field
    return head


class UpstreamResponse:
    """A backend's answer with its body unread: the status, the header fields in the
    order they came, and `read1` for the body. Owns its connection until the body is
    read to the end (then the pool has it back) or `close()` discards it."""

    __slots__ = ("_conn", "_pool", "_raw", "headers", "reason", "status")

    def __init__(
        self,
        raw: StrictResponse,
        conn: HTTPConnection,
        pool: urllib3.HTTPConnectionPool,
    ) -> None:
        self._raw: StrictResponse | None = raw
        self._conn, self._pool = conn, pool
        self.status: int = raw.status
        self.reason: str = raw.reason
        self.headers = raw.fields

    def read1(self, amount: int) -> bytes:
        """Up to `amount` bytes of the body as soon as the socket has any; b"" at its
        end. A body cut short raises http.client.IncompleteRead, wrapped as urllib3
        wraps it (errors.classify: "response body cut short")."""
        raw = self._raw
        if raw is None:
            return b""
        try:
            data = raw.read1(amount)
        except TimeoutError as exc:
            raise ReadTimeoutError(self._pool, "", f"Read timed out. ({exc})") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ProtocolError(f"Connection broken: {exc!r}", exc) from exc
        if not data and raw.length:
            # http.client's read1 returns b"" at the end of the connection even with
            # Content-Length bytes still owed; urllib3 checked the count, and so do we.
            missing = raw.length
            raw.length = 0
            error = http.client.IncompleteRead(b"", missing)
            raise ProtocolError(f"Connection broken: {error!r}", error)
        if not data:
            # The framing says the body is complete (a truncated one raised above or in
            # http.client). Its read1 keeps the file open after a bodiless answer
            # (HEAD, 204, 304): close it, as urllib3 did.
            raw.close()
        if raw.isclosed():  # the last byte is read: the connection is free again
            self._release(reuse=not raw.will_close)
        return data

    def close(self) -> None:
        """Discard the connection unless the body was read to its end: the bytes left
        on it belong to nobody. Safe to call more than once."""
        if self._raw is not None:
            self._raw.close()
            self._release(reuse=False)

    def _release(self, reuse: bool) -> None:
        self._raw = None
        if not reuse:
            self._conn.close()
        self._pool._put_conn(self._conn)  # a closed one reconnects when next taken


def exchange(
    pool: urllib3.HTTPConnectionPool,
    method: str,
    head: bytes,
    body: bytes | IO[bytes] | None,
    timeout: urllib3.Timeout,
    deadline: float | None,
    watchdog: DeadlineWatchdog,
) -> UpstreamResponse:
    """Send `head` and `body` on a connection of `pool` and read the response head.

    Raises what urllib3's urlopen raised for the same event: NewConnectionError or
    ConnectTimeoutError before anything was sent, ReadTimeoutError when the backend
    is silent for `timeout.read_timeout`, ProtocolError when the connection broke or
    the head was not valid HTTP (its cause says which), TimeoutError at the deadline.
    """
    conn = cast(HTTPConnection, pool._get_conn())  # the pool's ConnectionCls: connection.py
    raw: StrictResponse | None = None
    try:
        if conn.sock is None:
            _connect(conn, timeout)
        sock = conn.sock
        assert sock is not None
        read_timeout = urllib3.Timeout.resolve_default_timeout(timeout.read_timeout)
        if sock.gettimeout() != read_timeout:  # settimeout is a system call; usually unchanged
            sock.settimeout(read_timeout)
        token = None if deadline is None else watchdog.watch(deadline, sock)
        try:
            _send(sock, head, body)
            raw = StrictResponse(sock, method=method)
            raw.begin()
        finally:
            if token is not None and not watchdog.unwatch(token):
                # The watchdog shut the socket down: whatever the blocked call raised
                # (a reset, a broken pipe, an end of head), the cause is the deadline.
                raise TimeoutError("timeouts.total reached before the response head")
    except TimeoutError as exc:  # socket.timeout is TimeoutError
        _discard(pool, conn, raw)
        raise ReadTimeoutError(pool, "", f"Read timed out. ({exc})") from exc
    except (OSError, http.client.HTTPException) as exc:
        _discard(pool, conn, raw)
        raise ProtocolError("Connection aborted.", exc) from exc
    except BaseException:
        _discard(pool, conn, raw)
        raise
    if raw.will_close:
        conn.close()  # the response still reads its body through its own file object
    return UpstreamResponse(raw, conn, pool)


def _connect(conn: HTTPConnection, timeout: urllib3.Timeout) -> None:
    """Open the connection (and its TLS session) within the connect timeout. urllib3
    raises NewConnectionError or ConnectTimeoutError for the TCP part; a failed or
    silent TLS handshake is told apart here the same way, so that nothing sent
    means connect_error, whatever step failed."""
    conn.timeout = urllib3.Timeout.resolve_default_timeout(timeout.connect_timeout)
    try:
        conn.connect()
    except ssl.SSLError as exc:
        raise urllib3.exceptions.SSLError(exc) from exc
    except TimeoutError as exc:
        raise ConnectTimeoutError(conn, f"TLS handshake timed out ({exc})") from exc


def _send(sock: socket.socket, head: bytes, body: bytes | IO[bytes] | None) -> None:
    try:
        if isinstance(body, bytes) and len(body) <= _JOIN_BODY_UP_TO:
            sock.sendall(head + body if body else head)
            return
        sock.sendall(head)
        if isinstance(body, bytes):
            sock.sendall(body)
        elif body is not None:
            while block := body.read(_FILE_BLOCK):
                sock.sendall(block)
    except OSError as exc:
        # A backend may answer and close before reading the whole request (a 413 to a
        # large upload): its answer is still there to read. urllib3 swallows exactly
        # these two errors for that reason (connectionpool.py, _make_request).
        if not isinstance(exc, BrokenPipeError) and exc.errno != errno.ECONNRESET:
            raise


def _discard(
    pool: urllib3.HTTPConnectionPool, conn: HTTPConnection, raw: StrictResponse | None
) -> None:
    """Close a connection an exchange broke and give its slot back to the pool. The
    response's file object holds the socket open too (socket.makefile), so it is
    closed as well: only then does the backend see the connection end."""
    if raw is not None:
        raw.close()
    conn.close()
    pool._put_conn(conn)
