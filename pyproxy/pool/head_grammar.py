"""The grammar of a response head (RFC 9112 §4-§6, RFC 9110 §5): bytes in, the status
and the fields out, or InvalidResponseHead saying which line is wrong and how.

Reading the bytes from the socket, within limits, is response_head.StrictResponse's
job; this module only parses. A head is parsed whole: one fullmatch checks every line
against the grammar, one findall takes the fields out of the decoded text, both in
C, instead of a read, a match and half a dozen calls per line (a nine-line head:
18 us line by line, 6 us whole, by timeit). The line patterns serve the reader that
checks line by line when a head does not arrive in one piece, and the error messages.
"""

from __future__ import annotations

import http.client
import re

MAX_FIELDS = 100  # header fields in one head: http.client's own limit (_MAXHEADERS)

# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ], where
# reason-phrase = *( HTAB / SP / VCHAR / obs-text ). Valid codes are 100-599 (RFC 9110
# §15). HTTP/1.x alone: this is an HTTP/1.1 connection. The space before an empty
# reason is often left out, and RFC 9112 §2.2 lets a recipient end a line with LF.
STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([1-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?\r?\n")
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS; the name is a token
# (RFC 9110 §5.1), the value is HTAB, SP, VCHAR and obs-text (§5.5). Whitespace between
# the name and the colon is matched so it can be removed: RFC 9112 §5.1 says a proxy
# MUST remove it from a response. A line that starts with whitespace (obs-fold) never
# matches: RFC 9112 §5.2 lets a proxy answer 502 rather than unfold it. A value with
# CR, NUL or another control is refused too, where RFC 9110 §5.5 would also allow
# replacing CR and NUL with spaces: a silent repair hides a broken backend (nginx
# refuses NUL as well; it passes the other controls on, which strict clients refuse).
# Both character classes exclude CR and LF, so matching is linear in the line length.
FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z\-]+)[ \t]*:([\t \x21-\x7e\x80-\xff]*)\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+")
_OWS = b" \t"
# A whole head: the status line, field lines, the empty line.
_HEAD = re.compile(STATUS_LINE.pattern + b"(?:" + FIELD_LINE.pattern + b")*\r?\n")
# (name, value) with the whitespace around the value left out (a lazy `*?` instead of
# the group before `[ \t]*` would do the same at twice the cost: sre tries each end).
_FIELD_PAIRS = re.compile(
    r"([!#$%&'*+.^_`|~0-9A-Za-z\-]+)[ \t]*:[ \t]*((?:[^\r\n]*[^\r\n \t])?)[ \t]*\r?\n"
)
_FRAMING_FIELDS = frozenset(("content-length", "transfer-encoding", "connection"))


class InvalidResponseHead(http.client.HTTPException):
    """The backend's status line or header section is not valid HTTP/1.1."""


class FieldSection:
    """One head's header fields: the (name, value) pairs in order, values without the
    whitespace around them; and apart, the raw Content-Length and Transfer-Encoding
    values (begin() checks them) and the Connection values."""

    __slots__ = ("codings", "connection", "fields", "lengths")

    def __init__(self) -> None:
        self.fields: list[tuple[str, str]] = []
        self.lengths: list[bytes] = []
        self.codings: list[bytes] = []
        self.connection: list[str] = []


def parse_head(head: bytes) -> tuple[int, int, str, FieldSection]:
    """(version as http.client says it: 10 or 11, status code, reason phrase, fields)
    of one response head, status line to empty line; InvalidResponseHead if any line
    breaks the grammar."""
    whole = _HEAD.fullmatch(head)
    if whole is None:
        raise InvalidResponseHead(head_problem(head))
    minor, code, reason = whole.group(1, 2, 3)  # the status line's groups come first
    text = head.decode("latin-1")
    section = FieldSection()
    section.fields = _FIELD_PAIRS.findall(text, text.index("\n") + 1)  # after the status line
    if len(section.fields) > MAX_FIELDS:
        raise InvalidResponseHead(f"more than {MAX_FIELDS} header fields")
    for name, value in section.fields:
        lower = name.lower()
        if lower not in _FRAMING_FIELDS:
            continue
        if lower == "content-length":
            section.lengths.append(value.encode("latin-1"))
        elif lower == "transfer-encoding":
            section.codings.append(value.encode("latin-1"))
        else:
            section.connection.append(value)
    version = 10 if minor == b"0" else 11  # HTTP/1.x, x >= 1, is read as 1.1
    return version, int(code), (reason or b"").strip(_OWS).decode("latin-1"), section


def head_problem(head: bytes) -> str:
    """Which line of an invalid head breaks the grammar, and how (the slow path)."""
    lines = re.findall(rb"[^\n]*\n", head)
    if not lines or STATUS_LINE.fullmatch(lines[0]) is None:
        first = lines[0] if lines else head
        return f"invalid status line {first[:80]!r}"
    for line in lines[1:-1]:
        if FIELD_LINE.fullmatch(line) is None:
            return field_line_problem(line)
    return f"an invalid end of the head {lines[-1][:80]!r}"


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
