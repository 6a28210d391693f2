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
`Host: a, b` from two Host lines.
"""

from __future__ import annotations

import re
import time
from typing import Any

from waitress.parser import HTTPRequestParser, ParsingError
from waitress.utilities import Error, RequestHeaderFieldsTooLarge

from pyproxy.edge.chunked import StrictChunkedReceiver

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version, and nothing
# else (waitress also takes trailing whitespace and a bare CR). The target is checked
# byte by byte below, for a clearer answer.
_REQUEST_LINE_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ([^ ]+) HTTP/[0-9]\.[0-9]")
# RFC 3986 §2 allows visible ASCII only; http.client refuses [\x00-\x20\x7f] in a
# target and sends it as ASCII. (A `#` is refused later, with its own reason.)
_BAD_TARGET_BYTE_RE = re.compile(rb"[^\x21-\x7e]")
# RFC 3986 §3.2.2-3.2.3: IP-literal / IPv4address / reg-name, then an optional port.
_HOST_RE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(:[0-9]*)?")
# RFC 9112 §3.2.2 absolute-form; only the schemes a reverse proxy for HTTP serves.
_ABSOLUTE_RE = re.compile(r"https?://([^/?#]*)", re.IGNORECASE)
# Apache's LimitRequestFields and HAProxy's tune.http.maxhdr stop near 100 too. Without
# a count, 64 KiB of tiny repeated fields costs waitress's loop thread ~0.1 s to join.
MAX_HEADER_FIELDS = 100


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
        self._record_request_line(header_plus)
        problem = _request_line_problem(header_plus.partition(b"\r\n")[0])
        if problem:
            raise ParsingError(problem)
        fields = _raw_fields(header_plus)
        if sum(map(len, fields.values())) > MAX_HEADER_FIELDS:
            self._rejection = RequestHeaderFieldsTooLarge(
                f"more than {MAX_HEADER_FIELDS} header fields"
            )
            raise ParsingError("too many header fields")
        # Before waitress joins the repeats: RFC 9112 §3.2 (Host), §6.3 (Content-Length).
        for name in (b"host", b"content-length"):
            if len(fields.get(name, ())) > 1:
                raise ParsingError(f"repeated {name.decode().title()} header")
        try:
            super().parse_header(header_plus)
        except ValueError as exc:  # urlsplit() on a target like "http://[::1"
            raise ParsingError("invalid request target") from exc
        if len(fields.get(b"cookie", ())) > 1:
            # waitress joined them with ", ", which reads as one cookie `a="1, b=2"`; cookie
            # lists are joined with "; " (RFC 6265 §5.4; RFC 9113 §8.2.3 does the same).
            self.headers["COOKIE"] = "; ".join(v.decode("latin-1") for v in fields[b"cookie"])
        if self.version not in ("1.0", "1.1"):
            self._rejection = VersionNotSupported(f"HTTP/{self.version or '0.9'}")
            raise ParsingError("unsupported HTTP version")
        problem = _framing_problem(fields, self.version) or _target_problem(
            self.command, self.request_uri
        )
        if problem:
            raise ParsingError(problem)
        if self.chunked:
            adj = self.adj  # waitress's limits are ours + 1 (see EdgeServer)
            self.body_rcv = StrictChunkedReceiver(
                self.body_rcv.buf,
                max_body=adj.max_request_body_size - 1,
                max_trailer=adj.max_request_header_size - 1,
            )

    def _record_request_line(self, head: bytes) -> None:
        """Method and target as sent, best effort (waitress replaces them if it parses)."""
        line, complete, _ = head.lstrip().partition(b"\r\n")
        method, _, rest = line.partition(b" ") if complete else (b"", b"", b"")
        target, space, _version = rest.rpartition(b" ")
        self.command = method.decode("latin-1")
        self.request_uri = self.path = (target if space else rest).decode("latin-1")


def _request_line_problem(line: bytes) -> str | None:
    match = _REQUEST_LINE_RE.fullmatch(line)
    if match is None:
        return "malformed request line"
    bad = _BAD_TARGET_BYTE_RE.search(match.group(1))
    if bad is not None:
        return f"invalid byte 0x{bad.group()[0]:02x} in request target"
    return None


def _raw_fields(header_plus: bytes) -> dict[bytes, list[bytes]]:
    """The header block as {lowercased name: [value, ...]}, one value per field line."""
    fields: dict[bytes, list[bytes]] = {}
    for line in header_plus.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: a server MUST reject obs-fold or unfold it; waitress unfolds
            # without a space, so a folded Host or Transfer-Encoding could hide a value.
            raise ParsingError("obsolete line folding")
        name, _, value = line.partition(b":")
        if name:
            fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return fields


def _framing_problem(fields: dict[bytes, list[bytes]], version: str) -> str | None:
    """Why the message framing or Host is unsafe to pass on, or None. No repeats here."""
    hosts = fields.get(b"host", [])
    te = fields.get(b"transfer-encoding")
    # RFC 9112 §3.2: 400 for a 1.1 request without Host, or with an invalid one.
    if version == "1.1" and not hosts:
        return "missing Host header"
    # An empty Host is allowed (RFC 9110 §7.2); the app then uses the listener's name.
    if hosts and hosts[0] and not _HOST_RE.fullmatch(hosts[0]):
        return "invalid Host header"
    if te is None:
        return None
    # RFC 9112 §6.1: a 1.0 message with Transfer-Encoding must be treated as faulty framing.
    if version != "1.1":
        return "Transfer-Encoding on HTTP/1.0"
    # RFC 9112 §6.1 / §6.3 (3): both headers is the classic smuggling request.
    if b"content-length" in fields:
        return "both Content-Length and Transfer-Encoding"
    # Unknown codings got 501 from waitress already; what is left must be one "chunked".
    if len(te) != 1 or te[0].lower() != b"chunked":
        return "Transfer-Encoding must be exactly chunked"
    return None


def _target_problem(method: str, target: str) -> str | None:
    """Why `target` is not a request target pyproxy serves (RFC 9112 §3.2), or None."""
    if method in ("CONNECT", "TRACE"):
        return None  # refused by method (405) whatever the target, by the app
    if "#" in target:
        return "fragment in request target"
    if target.startswith("/"):
        return None  # origin-form
    if target == "*":
        return None if method == "OPTIONS" else "'*' target is only for OPTIONS"
    match = _ABSOLUTE_RE.match(target)
    if match is None or not match.group(1):
        return "request target must be origin-form or absolute-form"
    authority = match.group(1)
    if "@" in authority:
        return "userinfo in request target"  # RFC 9110 §4.2.4: treat it as an error
    # It becomes the forwarded Host, so it must be one; RFC 9110 §4.2.1 also makes an
    # http URI with an empty host invalid.
    if not _HOST_RE.fullmatch(authority.encode("latin-1")):
        return "invalid authority in request target"
    return None
