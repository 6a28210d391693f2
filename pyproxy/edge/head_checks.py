"""The strict checks on a request head, as pure functions (parser.py applies them).

Each returns why a head is unsafe to pass on, or None; `raw_fields` gives the header
block as sent, before waitress joins repeated fields and drops names with "_".
"""

from __future__ import annotations

import re

from waitress.parser import ParsingError

RawFields = dict[bytes, list[bytes]]  # lowercased name -> one value per field line
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version, and nothing
# else (waitress also takes trailing whitespace and a bare CR). The target is checked
# byte by byte below, for a clearer answer.
REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^ ]+) HTTP/([0-9]\.[0-9])")
# RFC 3986 §2 allows visible ASCII only; http.client refuses [\x00-\x20\x7f] in a
# target and sends it as ASCII. (A `#` is refused later, with its own reason.)
BAD_TARGET_BYTE_RE = re.compile(rb"[^\x21-\x7e]")
# RFC 3986 §3.2.2-3.2.3: IP-literal / IPv4address / reg-name, then an optional port.
_HOST_RE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(:[0-9]*)?")
# RFC 9112 §3.2.2 absolute-form; only the schemes a reverse proxy for HTTP serves.
_ABSOLUTE_RE = re.compile(r"https?://([^/?#]*)", re.IGNORECASE)


def request_line_problem(line: bytes) -> str | None:
    match = REQUEST_LINE_RE.fullmatch(line)
    if match is None:
        return "malformed request line"
    bad = BAD_TARGET_BYTE_RE.search(match.group(2))
    if bad is not None:
        return f"invalid byte 0x{bad.group()[0]:02x} in request target"
    return None


def raw_fields(header_plus: bytes) -> RawFields:
    """The header block as {lowercased name: [value, ...]}, one value per field line."""
    fields: RawFields = {}
    for line in header_plus.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: a server MUST reject obs-fold or unfold it; waitress unfolds
            # without a space, so a folded Host or Transfer-Encoding could hide a value.
            raise ParsingError("obsolete line folding")
        name, _, value = line.partition(b":")
        if name:
            fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return fields


def framing_problem(fields: RawFields, version: str) -> str | None:
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


def target_problem(method: str, target: str) -> str | None:
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
