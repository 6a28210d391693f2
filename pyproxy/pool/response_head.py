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

`StrictResponse.begin()` reads the head itself, in one pass, by the grammar of RFC
9112 §4-§6 and RFC 9110 §5, and raises `InvalidResponseHead` (an HTTPException, like
http.client's own BadStatusLine) for anything else. urllib3 then closes the
connection, as it does for http.client's refusals, and `errors.classify()` answers
502 (`bad_response`). The fields it builds are what the relay may pass on: names are
tokens, values contain no control character but HTAB, Content-Length is one number.
Interim responses (1xx but 101) are read past, at most MAX_INTERIM of them; the
`timeouts.total` watchdog (connection.py) bounds the time they take.

Reading the body is http.client's, unchanged: begin() sets the same attributes its
own begin() does. Whether the connection stays open follows RFC 9112 §9.3
(`_check_close`).
"""

from __future__ import annotations

import http.client
import re

from pyproxy.headers import connection_tokens

MAX_LINE = 65_536  # bytes in one head line: http.client's own limit (_MAXLINE)
MAX_FIELDS = 100  # header fields in one head: http.client's own limit (_MAXHEADERS)
# Bytes of head, interim responses included, a worker holds for one response: four
# times the largest request head pyproxy accepts (limits.max_request_header). For
# scale, nginx's default is 4-8 KiB (proxy_buffer_size), HAProxy's 16 KiB (bufsize).
# Without it, 100 lines of 64 KiB would be 6.4 MiB per worker.
MAX_HEAD = 256 * 1024
# A server sends a 100 Continue, a 102 Processing now and then, a 103 Early Hints or
# two. More than this many before the final response is a backend in a loop.
MAX_INTERIM = 10

# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ], where
# reason-phrase = *( HTAB / SP / VCHAR / obs-text ). Valid codes are 100-599 (RFC 9110
# §15). HTTP/1.x alone: this is an HTTP/1.1 connection. The space before an empty
# reason is often left out, and RFC 9112 §2.2 lets a recipient end a line with LF.
_STATUS_LINE = re.compile(
    rb"HTTP/1\.([0-9]) ([1-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?\r?\n"
)
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS; the name is a token
# (RFC 9110 §5.1), the value is HTAB, SP, VCHAR and obs-text (§5.5). Whitespace between
# the name and the colon is matched so it can be removed: RFC 9112 §5.1 says a proxy
# MUST remove it from a response. A line that starts with whitespace (obs-fold) never
# matches: RFC 9112 §5.2 lets a proxy answer 502 rather than unfold it. A value with
# CR, NUL or another control is refused too, where RFC 9110 §5.5 would also allow
# replacing CR and NUL with spaces: a silent repair hides a broken backend (nginx
# refuses NUL as well; it passes the other controls on, which strict clients refuse).
# Both character classes exclude CR and LF, so matching is linear in the line length.
_FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z\-]+)[ \t]*:([\t \x21-\x7e\x80-\xff]*)\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+")
_OWS = b" \t"


class InvalidResponseHead(http.client.HTTPException):
    """The backend's status line or header section is not valid HTTP/1.1."""


class StrictResponse(http.client.HTTPResponse):
    """http.client.HTTPResponse whose head is read by RFC 9112, strictly."""

    _head_left: int  # bytes of head still allowed (MAX_HEAD), set by begin()
    fields: ResponseFields  # the header fields, set by begin()

    def begin(self) -> None:
        if self.headers is not None:  # already begun (http.client's own guard)
            return
        self._head_left = MAX_HEAD
        for _ in range(MAX_INTERIM + 1):
            version, status, reason = self._read_status_line()
            fields, lengths, codings, connection = self._read_fields()
            # RFC 9110 §15.2: an interim response announces the final one; 101 ends
            # the exchange (and check() in upstream.py refuses to relay it).
            if not 100 <= status < 200 or status == 101:
                break
        else:
            raise InvalidResponseHead(f"more than {MAX_INTERIM} interim (1xx) responses")

        self.code = self.status = status
        self.reason = reason
        self.version = version
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
            fields.append(("Content-Length", str(self.length)))
        if status in (204, 304) or status < 200 or self._method == "HEAD":
            # RFC 9112 §6.3: these end at the empty line, whatever the fields say.
            self.length, self.chunked = 0, False
        self.will_close = self._check_close(connection)
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # the body runs to the end of the connection
        self.fields = ResponseFields(fields)
        # http.client's own attributes, for the health probe (it reads the response
        # through urllib3, which wants an HTTPMessage); the relay reads `fields`.
        self.headers = self.msg = http.client.HTTPMessage()
        for name, value in fields:
            self.msg.set_raw(name, value)

    def _check_close(self, connection: list[str]) -> bool:
        """Whether the backend closes the connection after this response (RFC 9112
        §9.3): it does if Connection lists "close"; an HTTP/1.0 one does unless it
        lists "keep-alive". http.client lets a Keep-Alive field outweigh "close" on
        HTTP/1.0, which pools a connection the backend is about to close.

        `connection` holds the Connection values _read_fields() set aside as it read
        them: asking the HTTPMessage instead (get_all) lower-cases every field name
        of the response again."""
        tokens = connection_tokens(", ".join(connection))
        if "close" in tokens:
            return True
        return self.version == 10 and "keep-alive" not in tokens

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

    def _read_status_line(self) -> tuple[int, int, str]:
        """(version as http.client says it: 10 or 11, status code, reason phrase)."""
        line = self._read_line()
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise InvalidResponseHead(f"invalid status line {line[:80]!r}")
        minor, code, reason = match.groups()
        version = 10 if minor == b"0" else 11  # HTTP/1.x, x >= 1, is read as 1.1
        return version, int(code), (reason or b"").strip(_OWS).decode("latin-1")

    def _read_fields(
        self,
    ) -> tuple[list[tuple[str, str]], list[bytes], list[bytes], list[str]]:
        """The header section up to its empty line, as (name, value) pairs in order,
        with the raw Content-Length and Transfer-Encoding values apart, and the
        Connection values as they were added to the pairs."""
        fields: list[tuple[str, str]] = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        connection: list[str] = []
        for _ in range(MAX_FIELDS + 1):
            line = self._read_line()
            if line == b"\r\n" or line == b"\n":
                return fields, lengths, codings, connection
            match = _FIELD_LINE.fullmatch(line)
            if match is None:
                raise InvalidResponseHead(field_line_problem(line))
            name, value = match.groups()
            value = value.strip(_OWS)
            lower = name.lower()
            if lower == b"content-length":
                lengths.append(value)  # added back once, as one number, by begin()
                continue
            if lower == b"transfer-encoding":
                codings.append(value)
            text = value.decode("latin-1")
            if lower == b"connection":
                connection.append(text)
            fields.append((name.decode("ascii"), text))
        raise InvalidResponseHead(f"more than {MAX_FIELDS} header fields")


class ResponseFields:
    """A response's header fields as they came, in order (a name may repeat:
    each Set-Cookie is its own field). What the relay needs and no more: the pairs,
    and whether a field is present, by name in any case (RFC 9110 §5.1)."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def items(self) -> list[tuple[str, str]]:
        return self._pairs

    def __contains__(self, name: object) -> bool:
        wanted = str(name).lower()
        return any(field.lower() == wanted for field, _ in self._pairs)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of the field `name`, or `default`."""
        wanted = name.lower()
        for field, value in self._pairs:
            if field.lower() == wanted:
                return value
        return default


def content_length(values: list[bytes]) -> int:
    """The one length a set of Content-Length field values gives.

    RFC 9110 §8.6: a list of the same decimal value ("42, 42", or the field repeated)
    may be taken as that value; anything else is invalid. Empty list elements are
    ignored (§5.6.1). More than 18 digits is no length a body will have, and int()
    refuses 4301 (CVE-2020-10735), which would escape as a ValueError.
    """
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        # The usual case, one field with one number (values arrive stripped of OWS),
        # taken without the list walk below: about half the time of this function.
        return int(values[0])
    lengths = set()
    for value in values:
        for item in value.split(b","):
            digits = item.strip(_OWS)
            if not digits:
                continue
            if not digits.isdigit() or len(digits) > 18:
                raise InvalidResponseHead(f"invalid Content-Length {value[:40]!r}")
            lengths.add(int(digits))
    if not lengths:
        raise InvalidResponseHead("an empty Content-Length")
    if len(lengths) > 1:
        raise InvalidResponseHead("Content-Length values differ")
    return lengths.pop()


def field_line_problem(line: bytes) -> str:
    """Why a header line did not match the grammar, in a few words (the slow path)."""
    if line[:1] in (b" ", b"\t"):
        return "a folded header line (obs-fold)"
    name, colon, _ = line.partition(b":")
    if not colon:
        return f"a header line without a colon {line[:40]!r}"
    if not _TOKEN.fullmatch(name.rstrip(_OWS)):
        return f"an invalid header name {name[:40]!r}"
    return f"a control character in the value of {name[:40]!r}"
