"""The tasks of the edge server: how one response (or one refusal) is written.

waitress runs each request as a Task on a worker thread. pyproxy's tasks change three
things: the response head (built here, see _EdgeHead: no waitress identity,
`Connection: close` while draining, keep-alive after a chunked or bodiless answer,
sent with a small body in one send()), an app that cuts a response short on purpose
(AbortResponse: no final chunk, no traceback), and the errors waitress answers itself
(short text, X-Request-ID, and a report to the access log through `on_refused`).
See server.py for the server.
"""

from __future__ import annotations

import logging
from operator import itemgetter

from waitress.task import ErrorTask, Task, WSGITask
from waitress.utilities import build_http_date

from pyproxy.config.schema import LimitsConfig
from pyproxy.headers import sane_request_id
from pyproxy.wsgi import AbortResponse, EdgeRefusal

logger = logging.getLogger("pyproxy.edge.server")

# The largest first body part sent in one piece with the head (see _EdgeHead.write):
# an API answer or a server-sent event, not a download.
COALESCE_LIMIT = 16 * 1024
_FIELD_LINE = "%s: %s\r\n"
_CANONICAL_NAMES: dict[str, str] = {}  # response header name as sent -> as written
_CANONICAL_NAMES_MAX = 1024
_last_date = (-1, "")  # (second, its Date value): one tuple, replaced whole (thread-safe)


class _EdgeHead(Task):
    """The response head and its first body bytes, written by pyproxy rather than waitress.

    waitress's own Task.build_response_header() adds `Server: waitress` (or a Via),
    closes every HTTP/1.1 response without a Content-Length and frames a HEAD answer as
    chunked; pyproxy used to edit those bytes back. This builds what pyproxy sends in
    one pass: the same status line, the same header order (waitress sorts by name,
    keeping repeats in order), the same name capitalisation and Date, without
    waitress's identity (tests/test_edge_writes.py compares the two).
    """

    chunked_response: bool  # waitress's Task attributes, declared for the type checker
    close_on_finish: bool
    content_length: int | None
    content_bytes_written: int
    wrote_header: bool
    logged_write_excess: bool
    logged_write_no_body: bool

    def build_response_header(self) -> bytes:
        request = self.request
        if self.channel.server.draining:
            # As if the client had sent `Connection: close` (RFC 9112 §9.6). An app may not
            # send it itself: waitress refuses hop-by-hop headers from apps (PEP 3333).
            connection = "close"
        else:
            connection = request.headers.get("CONNECTION", "").lower()
        has_body = self.has_body  # False for 1xx, 204, 304 (RFC 9110 §6.4.1)
        headers = []
        length = connection_sent = date_sent = None
        for name, value in self.response_headers:
            name = _CANONICAL_NAMES.get(name) or _canonical_name(name)  # a call saved per hit
            if name == "Content-Length":
                if not has_body:
                    continue  # RFC 9110 §8.6: none on 1xx/204; waitress drops it on 304 too
                length = value
            elif name == "Date":
                date_sent = True
            elif name == "Connection":
                connection_sent = True
            headers.append((name, value))
        if length is None and self.content_length is not None and has_body:
            length = str(self.content_length)
            headers.append(("Content-Length", length))
        closing = False  # decided here, and said: `Connection: close` (RFC 9112 §9.6)
        if self.version == "1.0":
            # HTTP/1.0 keeps a connection only when asked and only with a length (RFC 9112 §9.3).
            if connection == "keep-alive" and length:
                headers.append(("Connection", "Keep-Alive"))
            else:
                closing = True
        else:
            closing = connection == "close"
            # No Content-Length: the body ends with a last chunk (RFC 9112 §7.1), and the
            # connection can carry the next request, as nginx and HAProxy keep it
            # (waitress closes instead). Answers to HEAD and 204/304 end at their head
            # (RFC 9112 §6.3): no chunked framing there, or the client would read the
            # last chunk `0 CRLF CRLF` as the start of the next response.
            if not length and not self._bodiless():
                if has_body:
                    self.chunked_response = True
                    headers.append(("Transfer-Encoding", "chunked"))
                elif not self.close_on_finish:
                    closing = True  # a 1xx as a final answer: unframed, so the close ends it
        if closing:
            self.close_on_finish = True
            if not connection_sent:
                headers.append(("Connection", "close"))
        if not date_sent:
            headers.append(("Date", _http_date(self.start_time)))
        headers.sort(key=itemgetter(0))  # stable: repeats keep their order (RFC 9110 §5.3)
        fields = "".join(map(_FIELD_LINE.__mod__, headers))  # no Python frame per field
        return f"HTTP/{self.version} {self.status}\r\n{fields}\r\n".encode("latin-1")

    def _bodiless(self) -> bool:
        """RFC 9112 §6.3: answers to HEAD, and 1xx/204/304, end at their head."""
        command = getattr(self.request, "command", None)  # unset when parsing failed
        return command == "HEAD" or self.status[:3] in ("204", "304")

    def write(self, data: bytes) -> None:
        """waitress's Task.write, sending the head and a small first body part together.

        waitress hands the head and the body to the channel separately, and the channel
        sends each at once (send_bytes=1, so that streamed chunks are not held back): two
        send() calls per response. Joined, a small response leaves in one, saving a
        syscall and a pass through the channel's locked output buffer (measured with
        scripts/profile_proxy.py: 2 -> 1 write_soon and send() a request). Only a part
        up to COALESCE_LIMIT is joined: copying it costs less than the send saved,
        while a large body is not copied again. Nothing waits: whatever is written
        still leaves at once, as it did.
        """
        if not self.complete:
            raise RuntimeError("start_response was not called before body written")
        head = b""
        if not self.wrote_header:
            head = self.build_response_header()
            self.wrote_header = True
        body = self._framed(data) if data else b""
        channel = self.channel
        if head and body and len(body) <= COALESCE_LIMIT:
            channel.write_soon(head + body)
            return
        if head:
            channel.write_soon(head)
        if body:
            channel.write_soon(body)

    def _framed(self, data: bytes) -> bytes:
        """The bytes that carry `data` on the wire (waitress's rules, in Task.write)."""
        if not self.has_body:
            # A 1xx/204/304 has no body (RFC 9110 §6.4.1): count it as written, send nothing.
            self.content_bytes_written += len(data)
            if not self.logged_write_no_body:
                self.logger.warning(
                    "application-written content was ignored due to HTTP response that "
                    "may not contain a message-body: (%s)",
                    self.status,
                )
                self.logged_write_no_body = True
            return b""
        if self.chunked_response:
            return b"%X\r\n%s\r\n" % (len(data), data)  # RFC 9112 §7.1 chunk
        length = self.content_length
        if length is None:
            return data
        part = data[: length - self.content_bytes_written]  # never past Content-Length
        self.content_bytes_written += len(part)
        if len(part) != len(data) and not self.logged_write_excess:
            self.logger.warning(
                "application-written content exceeded the number of bytes specified by "
                "Content-Length header (%s)",
                length,
            )
            self.logged_write_excess = True
        return part


def _canonical_name(name: str) -> str:
    """`content-type` -> `Content-Type`, as waitress writes every response header name."""
    canonical = _CANONICAL_NAMES.get(name)
    if canonical is None:
        canonical = "-".join(part.capitalize() for part in name.split("-"))
        if len(_CANONICAL_NAMES) < _CANONICAL_NAMES_MAX:  # bounded: names come from backends
            _CANONICAL_NAMES[name] = canonical
    return canonical


def _http_date(when: float) -> str:
    """waitress's build_http_date(when), made once a second rather than once a response
    (nginx caches its Date the same way; the header has a one-second resolution)."""
    global _last_date
    second = int(when)
    cached = _last_date
    if cached[0] != second:
        cached = _last_date = (second, build_http_date(second))
    return cached[1]


class EdgeTask(_EdgeHead, WSGITask):
    """Runs the WSGI app for one request; AbortResponse closes the connection quietly.

    A response cut short must look cut short. With a Content-Length or chunked framing
    the close before the promised end shows it (RFC 9112 §8), and a clean close keeps
    the bytes still in flight (a RST makes the kernel drop them). A close-delimited
    body (an HTTP/1.0 client, which cannot take chunked) ends at the close by
    definition (RFC 9112 §6.3): a clean FIN would present the cut as complete, so
    that connection is reset instead.
    """

    aborted = False

    def execute(self) -> None:
        try:
            super().execute()
        except AbortResponse as exc:
            logger.debug("response to %s cut short: %s", self.request.path, exc)
            self.aborted = True
            self.close_on_finish = True
            self._reset_if_close_delimited()
        except Exception:
            self._reset_if_close_delimited()  # a bug mid-body cuts it short just as well
            raise

    def _reset_if_close_delimited(self) -> None:
        framed = self.chunked_response or self.content_length is not None
        if self.wrote_header and not framed and not self._bodiless():
            self.channel.reset_on_close = True

    def finish(self) -> None:
        # waitress's finish() would write the last chunk ("0\r\n\r\n") and make the
        # truncated body look complete; an aborted response must end with the connection.
        if not self.aborted:
            super().finish()


class EdgeErrorTask(_EdgeHead, ErrorTask):
    """An error waitress produces itself (400, 413, 431, 500, 501, 505): short text, close."""

    def execute(self) -> None:
        error = self.request.error
        self.status = f"{error.code} {error.reason}"
        body = f"{self.status}: {_plain_reason(error.body, self.channel.server.limits)}".encode()
        # Every answer pyproxy makes itself carries an X-Request-ID, for the client to quote.
        request_id = sane_request_id(self.request.headers.get("X_REQUEST_ID"))
        self.response_headers.append(("Content-Type", "text/plain; charset=utf-8"))
        self.response_headers.append(("X-Request-ID", request_id))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        report = self.channel.server.on_refused
        if report is not None:  # the access log and metrics hear of it too
            try:
                report(
                    EdgeRefusal(
                        peer=str(self.channel.addr[0]),
                        method=str(getattr(self.request, "command", "") or "-"),
                        target=str(getattr(self.request, "request_uri", "") or "-"),
                        status=int(error.code),
                        why=str(error.body),
                        bytes_sent=len(body),
                        request_id=request_id,
                    )
                )
            except Exception:
                logger.exception("reporting a refused request failed")


def _plain_reason(body: str, limits: LimitsConfig) -> str:
    """waitress words its limit errors with its own names and its off-by-one values
    (we pass limit + 1, see EdgeServer); say them in the config's terms instead."""
    if body.startswith("exceeds max_body"):
        return f"body larger than limits.max_request_body ({limits.max_request_body} bytes)"
    if body.startswith("exceeds max_header"):
        size = limits.max_request_header
        return f"header block larger than limits.max_request_header ({size} bytes)"
    return body
