"""StrictResponse: http.client's response object, with a strict reader for the head.

A backend is trusted to answer, not to speak valid HTTP. http.client reads a response
head leniently, and each leniency ends badly in a proxy:

- header lines go through the email parser, which takes a line it cannot parse (no
  colon, a space in the name, a folded line) for the start of the body: the fields
  after it, Content-Length included, vanish, and the relay waits for the connection
  to close, that is for `timeouts.read`;
- a bare CR splits one line into two fields; NUL and other controls pass through,
  and waitress then refuses CR or LF in the relayed head with a 500;
- the status code goes through int(), so `+200`, `2_00` and `0200` are 200, and the
  status line is split at any Unicode whitespace (a no-break space will do);
- `Content-Length: 2, 2` (valid, RFC 9110 §8.6) is unreadable to it, so it reads the
  body until the connection closes; a 304 with `Transfer-Encoding: chunked` waits
  for chunks that never come (RFC 9112 §6.3: a 304 has no body);
- the end of the connection in the middle of the head ends the head;
- 103 Early Hints is returned as the final response, and the real one is left on
  the connection for the next caller.

`StrictResponse.begin()` reads the head itself, within limits (a head that came in
one segment straight from the read buffer, else line by line), parses it by the
grammar of RFC 9112 §4-§6 and RFC 9110 §5 (head_grammar.py), and raises
`InvalidResponseHead` (an HTTPException, like http.client's own BadStatusLine) for
anything else. The exchange then closes the connection (exchange.py) and
`errors.classify()` answers 502 (`bad_response`). The fields it builds are what the
relay may pass on: names are tokens, values contain no control character but HTAB,
Content-Length is one number. Interim responses (1xx but 101) are read past, at most
MAX_INTERIM of them; the `timeouts.total` watchdog (deadline.py) bounds the time
they take.

Reading the body is http.client's, unchanged: begin() sets the same attributes its
own begin() does. Whether the connection stays open follows RFC 9112 §9.3
(`_check_close`).
"""

from __future__ import annotations

import http.client

from pyproxy.headers import connection_tokens
from pyproxy.pool.head_grammar import (
    FIELD_LINE,
    MAX_FIELDS,
    STATUS_LINE,
    InvalidResponseHead,
    ResponseFields,
    content_length,
    field_line_problem,
    head_problem,
    parse_head,
)

MAX_LINE = 65_536  # bytes in one head line: http.client's own limit (_MAXLINE)
# Bytes of head, interim responses included, a worker holds for one response: four
# times the largest request head pyproxy accepts (limits.max_request_header). For
# scale, nginx's default is 4-8 KiB (proxy_buffer_size), HAProxy's 16 KiB (bufsize).
# Without it, 100 lines of 64 KiB would be 6.4 MiB per worker.
MAX_HEAD = 256 * 1024
# A server sends a 100 Continue, a 102 Processing now and then, a 103 Early Hints or
# two. More than this many before the final response is a backend in a loop.
MAX_INTERIM = 10

__all__ = ["MAX_HEAD", "InvalidResponseHead", "StrictResponse"]


class StrictResponse(http.client.HTTPResponse):
    """http.client.HTTPResponse whose head is read by RFC 9112, strictly."""

    _head_left: int  # bytes of head still allowed (MAX_HEAD), set by begin()
    fields: ResponseFields  # the header fields, set by begin()
    _method: str | None  # http.client's: the request's method, set by __init__

    def begin(self) -> None:
        if getattr(self, "fields", None) is not None:  # already begun (http.client's guard)
            return
        self._head_left = MAX_HEAD
        for _ in range(MAX_INTERIM + 1):
            block = self._buffered_head() or self._read_head_lines()
            version, status, reason, section = parse_head(block)
            # RFC 9110 §15.2: an interim response announces the final one; 101 ends
            # the exchange (and check() in upstream.py refuses to relay it).
            if not 100 <= status < 200 or status == 101:
                break
        else:
            raise InvalidResponseHead(f"more than {MAX_INTERIM} interim (1xx) responses")

        self.code = self.status = status
        self.reason = reason
        self.version = version
        fields, lengths, codings = section.fields, section.lengths, section.codings
        self.chunk_left = None
        self.chunked = bool(codings)
        self.length = None
        if codings:
            # RFC 9112 §6.1: with Transfer-Encoding, Content-Length is a smuggling
            # attempt; an HTTP/1.0 message with it has faulty framing; and chunked is
            # the only coding pyproxy can frame (others are never decoded).
            if lengths:
                raise InvalidResponseHead("both Content-Length and Transfer-Encoding")
            if version == 10:
                raise InvalidResponseHead("Transfer-Encoding in an HTTP/1.0 response")
            if b",".join(codings).lower() != b"chunked":
                raise InvalidResponseHead("a Transfer-Encoding other than chunked")
        elif lengths:
            self.length = content_length(lengths)
            if len(lengths) > 1 or not lengths[0].isdigit():
                # A list ("2, 2") or a repeated field: relayed as the one length it gives.
                fields[:] = [field for field in fields if field[0].lower() != "content-length"]
                fields.append(("Content-Length", str(self.length)))
        if status in (204, 304) or status < 200 or self._method == "HEAD":
            # RFC 9112 §6.3: these end at the empty line, whatever the fields say.
            self.length, self.chunked = 0, False
        self.will_close = self._check_close(section.connection)
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # the body runs to the end of the connection
        self.fields = ResponseFields(fields)
        self._message = None  # built if asked for (`msg`)

    # http.client's `msg` and `headers` (the same object): the HTTPMessage urllib3 wants
    # when the health probe reads through it. Built only when asked for; the relay
    # reads `fields`, and the HTTPMessage costs a microsecond or two per response.
    _message: http.client.HTTPMessage | None = None

    @property  # type: ignore[override]
    def msg(self) -> http.client.HTTPMessage | None:
        if self._message is None and getattr(self, "fields", None) is not None:
            self._message = http.client.HTTPMessage()
            for name, value in self.fields.items():
                self._message.set_raw(name, value)
        return self._message

    @msg.setter
    def msg(self, message: http.client.HTTPMessage | None) -> None:
        self._message = message  # http.client's __init__ sets None

    headers = msg  # type: ignore[assignment]

    def _check_close(self, connection: list[str]) -> bool:
        """Whether the backend closes the connection after this response (RFC 9112
        §9.3): it does if Connection lists "close"; an HTTP/1.0 one does unless it
        lists "keep-alive". http.client lets a Keep-Alive field outweigh "close" on
        HTTP/1.0, which pools a connection the backend is about to close.

        `connection` holds the Connection values parse_head() set aside as it read
        them: asking the HTTPMessage instead (get_all) lower-cases every field name
        of the response again."""
        tokens = connection_tokens(", ".join(connection))
        if "close" in tokens:
            return True
        return self.version == 10 and "keep-alive" not in tokens

    def _buffered_head(self) -> bytes | None:
        """The next head, when the read buffer holds all of it (a head usually comes in
        one segment), taken from the buffer without a read per line; else None and the
        buffer as it was. Only CRLF line ends here: with a bare LF somewhere, the first
        empty line may come before the first CRLF CRLF, and the line reader finds it."""
        buffered = self.fp.peek(1)  # what is buffered; one read only if nothing is
        end = buffered.find(b"\r\n\r\n") + 4
        if end == 3 or end > self._head_left:
            return None
        head = buffered[:end]
        if head.count(b"\n") != head.count(b"\r\n"):
            return None
        self.fp.read(end)  # served from the buffer
        self._head_left -= end
        return head

    def _read_head_lines(self) -> bytes:
        """The next head read line by line, up to its empty line, within the limits.
        Each line is checked as it comes: a backend that sends one wrong line and then
        waits gets its 502 at once, not at the read timeout."""
        lines = [self._read_line()]
        if STATUS_LINE.fullmatch(lines[0]) is None:
            raise InvalidResponseHead(head_problem(lines[0]))
        for _ in range(MAX_FIELDS + 1):
            line = self._read_line()
            lines.append(line)
            if line == b"\r\n" or line == b"\n":
                return b"".join(lines)
            if FIELD_LINE.fullmatch(line) is None:
                raise InvalidResponseHead(field_line_problem(line))
        raise InvalidResponseHead(f"more than {MAX_FIELDS} header fields")

    def _read_line(self) -> bytes:
        limit = min(MAX_LINE, self._head_left)
        line: bytes = self.fp.readline(limit + 1)
        if len(line) > limit:
            if limit < MAX_LINE:
                raise InvalidResponseHead(f"a response head longer than {MAX_HEAD} bytes")
            raise InvalidResponseHead(f"a head line longer than {MAX_LINE} bytes")
        self._head_left -= len(line)
        if not line.endswith(b"\n"):
            # The end of the connection is not the end of the head (http.client's
            # reader takes it for one and hands on half a head).
            raise http.client.RemoteDisconnected(
                "connection closed inside the response head"
                if line
                else "Remote end closed connection without response"
            )
        return line
