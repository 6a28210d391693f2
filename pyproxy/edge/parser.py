"""StrictRequestParser: waitress's HTTP/1.1 request parser, made strict about framing.

waitress (3.0.2) is lenient where a proxy cannot afford to be: it accepts a request
with both Content-Length and Transfer-Encoding, `chunked, chunked`, a missing or
repeated Host, and any request target. A front server and a backend that frame the
same bytes differently is how requests get smuggled, so every ambiguous request is
refused here, before the app runs: the channel answers with the error and closes the
connection (RFC 9112 §6.3: after a framing error the connection cannot be reused).

It is also strict about what it lets through at all. Whatever passes must be
forwardable byte for byte: a request line that http.client would refuse to send
(controls, DEL, space, bytes >= 0x80 in the target) is refused here, not blamed on a
backend later. And it bounds what a client can make it hold or compute: the number
of header fields here, and a chunked body's framing in chunked.py.

Duplicates are found in the raw header block: waitress joins repeated fields with
", " and drops names containing "_", so its parsed `headers` cannot tell
`Host: a, b` from two Host lines. The checks are pure functions in head_checks.py.

A head whose request line and field lines are all valid (nearly every one) is parsed
in one pass into both the raw fields and waitress's `headers`, `path`, ...; one with
a fault goes line by line, through waitress's own parser, so that the refusal names
the first fault as waitress finds it.
"""

from __future__ import annotations

import re
import time
from typing import Any

from waitress.buffers import OverflowableBuffer
from waitress.parser import (
    HTTPRequestParser,
    ParsingError,
    TransferEncodingNotImplemented,
    split_uri,
)
from waitress.receiver import FixedStreamReceiver
from waitress.utilities import Error, RequestHeaderFieldsTooLarge

from pyproxy.edge.chunked import StrictChunkedReceiver
from pyproxy.edge.head_checks import (
    BAD_TARGET_BYTE_RE,
    REQUEST_LINE_RE,
    RawFields,
    framing_problem,
    raw_fields,
    request_line_problem,
    target_problem,
)

# A header block (after the request line) in which every line is a valid field: waitress's
# per-line HEADER_FIELD_RE (RFC 9110 §5.5: token ":" OWS field-value OWS), CRLF-ended.
# One match checks the whole block; whatever fails it takes the line-by-line path,
# which names the problem.
_FIELD_BLOCK_RE = re.compile(
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*"
    rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?[ \t]*\r\n)*\r\n"
)
_ONLY_DIGITS_RE = re.compile(r"[0-9]+")
# Apache's LimitRequestFields and HAProxy's tune.http.maxhdr stop near 100 too. Without
# a count, 64 KiB of tiny repeated fields costs waitress's loop thread ~0.1 s to join.
MAX_HEADER_FIELDS = 100
_FIELD_KEYS: dict[bytes, tuple[bytes, str | None]] = {}
_FIELD_KEYS_MAX = 1024


class VersionNotSupported(Error):
    code = 505
    reason = "HTTP Version Not Supported"


class StrictRequestParser(HTTPRequestParser):
    """One request as waitress parses it, refused (400/501/505) if its framing is ambiguous.

    `started` is when its first byte arrived (time.monotonic()), for the header deadline.
    """

    error: Error | None  # set by waitress when the request is refused
    body_rcv: Any  # waitress's body decoder, None until the head announced a body
    _rejection: Error | None = None  # an error other than waitress's default 400
    # As received, for the access log of a refusal (waitress sets them only once the
    # whole head parsed); `path` is what waitress's own log lines name.
    command = request_uri = path = ""

    def __init__(self, adj: object) -> None:
        super().__init__(adj)
        self.started = time.monotonic()

    def received(self, data: bytes) -> int:
        head_so_far = self.header_plus
        consumed: int = super().received(data)
        if self.error is None:
            return consumed
        if self._rejection is not None:
            self.error = self._rejection
        elif isinstance(self.error, RequestHeaderFieldsTooLarge) and not self.headers_finished:
            # waitress parsed a stand-in `GET / HTTP/1.0` to answer; record what came.
            self._record_request_line(head_so_far + data)
        # waitress sends `100 Continue` for any request whose head asked for it, even
        # one it is about to refuse (say, a Content-Length over the limit): the client
        # would then send the whole body only to get the error (RFC 9110 §10.1.1).
        self.expect_continue = False
        # The bytes after a refused request are not known to start a new request
        # (that is the smuggling), so swallow them: the connection closes anyway.
        return len(data)

    def parse_header(self, header_plus: bytes) -> None:
        self.version = "1.1"  # the refusals below answer in our version, not waitress's 1.0
        line, _, block = header_plus.partition(b"\r\n")
        request_line = REQUEST_LINE_RE.fullmatch(line)
        if (
            request_line is not None
            and BAD_TARGET_BYTE_RE.search(request_line[2]) is None
            and _FIELD_BLOCK_RE.fullmatch(block) is not None
        ):
            fields = self._parse_valid_head(request_line, block)
        else:
            fields = self._parse_line_by_line(header_plus)
        if len(fields.get(b"cookie", ())) > 1:
            # waitress joined them with ", ", which reads as one cookie `a="1, b=2"`; cookie
            # lists are joined with "; " (RFC 6265 §5.4; RFC 9113 §8.2.3 does the same).
            self.headers["COOKIE"] = "; ".join(v.decode("latin-1") for v in fields[b"cookie"])
        if self.version not in ("1.0", "1.1"):
            self._rejection = VersionNotSupported(f"HTTP/{self.version or '0.9'}")
            raise ParsingError("unsupported HTTP version")
        problem = framing_problem(fields, self.version) or target_problem(
            self.command, self.request_uri
        )
        if problem:
            raise ParsingError(problem)
        if self.chunked:
            adj = self.adj  # waitress's limits are ours + 1 (see EdgeServer)
            self.body_rcv = StrictChunkedReceiver(
                OverflowableBuffer(adj.inbuf_overflow),
                max_body=adj.max_request_body_size - 1,
                max_trailer=adj.max_request_header_size - 1,
            )

    def _parse_valid_head(self, request_line: re.Match[bytes], block: bytes) -> RawFields:
        """A head whose request line and every field line are valid, parsed in one pass
        into both the raw fields (for the checks) and waitress's `headers`.

        waitress's parse_header() used to split and match the head line by line again
        after the checks here had split it (measured with scripts/profile_proxy.py:
        parse_header 176 -> 107 us a request under cProfile). The result is waitress's
        own (tests/test_edge_parse.py compares them); its rules are followed in its
        order (waitress/parser.py)."""
        method, target, version = request_line.groups()
        self.command = method.decode("latin-1")  # as received, should a check below refuse
        self.request_uri = self.path = target.decode("latin-1")
        fields: RawFields = {}
        headers: dict[str, str] = {}
        count = 0
        for line in block.split(b"\r\n"):
            if not line:
                break  # the blank line that ends the head: every line before it is a field
            count += 1
            name, _, raw = line.partition(b":")
            value = raw.strip(b" \t")
            lower, key = _field_keys(name)
            fields.setdefault(lower, []).append(value)
            if key is None:
                continue  # waitress drops a name with "_", which could pose as a "-" one
            text = value.decode("latin-1")
            headers[key] = headers[key] + ", " + text if key in headers else text
        self._check_fields(fields, count)
        self.headers = headers  # only now, as before: a refusal above echoes no X-Request-ID
        if method != method.upper():
            raise ParsingError(f'Malformed HTTP method "{self.command}"')
        self.version = version.decode("latin-1")
        try:
            uri = split_uri(target)  # (scheme, netloc, unquoted path, query, fragment)
        except ValueError as exc:  # urlsplit() on a target like "http://[::1"
            raise ParsingError("invalid request target") from exc
        self.proxy_scheme, self.proxy_netloc, self.path, self.query, self.fragment = uri
        self.url_scheme = self.adj.url_scheme
        self._framing_from_headers()
        return fields

    def _framing_from_headers(self) -> None:
        """waitress's reading of Connection, Transfer-Encoding, Expect and Content-Length."""
        headers, version = self.headers, self.version
        connection = headers.get("CONNECTION", "").lower()
        if version == "1.0" and connection != "keep-alive":
            self.connection_close = True
        if version == "1.1":
            # The body reaches the app de-chunked: the header goes, as waitress drops it.
            te = headers.pop("TRANSFER_ENCODING", None)
            if te is not None:
                codings = [coding.strip(" \t").lower() for coding in te.split(",") if coding]
                if any(coding != "chunked" for coding in codings):
                    raise TransferEncodingNotImplemented(
                        "Transfer-Encoding requested is not supported."
                    )
                self.chunked = bool(codings)  # its receiver is made once the checks pass
            self.expect_continue = headers.get("EXPECT", "").lower() == "100-continue"
            if connection == "close":
                self.connection_close = True
        if not self.chunked:
            length = headers.get("CONTENT_LENGTH", "0")
            if not _ONLY_DIGITS_RE.fullmatch(length):
                raise ParsingError("Content-Length is invalid")
            self.content_length = int(length)
            if self.content_length > 0:
                buf = OverflowableBuffer(self.adj.inbuf_overflow)
                self.body_rcv = FixedStreamReceiver(self.content_length, buf)

    def _parse_line_by_line(self, header_plus: bytes) -> RawFields:
        """A head with a fault somewhere: checked line by line, and parsed by waitress,
        so that the refusal names the first fault as it always has."""
        self._record_request_line(header_plus)
        problem = request_line_problem(header_plus.partition(b"\r\n")[0])
        if problem:
            raise ParsingError(problem)
        fields = raw_fields(header_plus)
        self._check_fields(fields, sum(map(len, fields.values())))
        try:
            super().parse_header(header_plus)
        except ValueError as exc:  # urlsplit() on a target like "http://[::1"
            raise ParsingError("invalid request target") from exc
        return fields

    def _check_fields(self, fields: RawFields, count: int) -> None:
        if count > MAX_HEADER_FIELDS:
            self._rejection = RequestHeaderFieldsTooLarge(
                f"more than {MAX_HEADER_FIELDS} header fields"
            )
            raise ParsingError("too many header fields")
        # Before waitress joins the repeats: RFC 9112 §3.2 (Host), §6.3 (Content-Length).
        for name in (b"host", b"content-length"):
            if len(fields.get(name, ())) > 1:
                raise ParsingError(f"repeated {name.decode().title()} header")

    def _record_request_line(self, head: bytes) -> None:
        """Method and target as sent, best effort (waitress replaces them if it parses)."""
        line, complete, _ = head.lstrip().partition(b"\r\n")
        method, _, rest = line.partition(b" ") if complete else (b"", b"", b"")
        target, space, _version = rest.rpartition(b" ")
        self.command = method.decode("latin-1")
        self.request_uri = self.path = (target if space else rest).decode("latin-1")


def _field_keys(name: bytes) -> tuple[bytes, str | None]:
    """A field name's key among the raw fields, and in waitress's `headers` (None: a
    name with "_", which waitress drops). Cached: the same few names come every time."""
    keys = _FIELD_KEYS.get(name)
    if keys is None:
        key = None if b"_" in name else name.upper().replace(b"-", b"_").decode("latin-1")
        keys = (name.lower(), key)
        if len(_FIELD_KEYS) < _FIELD_KEYS_MAX:  # bounded: names come from clients
            _FIELD_KEYS[name] = keys
    return keys
