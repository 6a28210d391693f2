"""The two ways a response head is read give the same answer.

A head that arrived in one segment is parsed whole from the read buffer; one that
arrives in pieces is read line by line, each line checked as it comes
(pool/response_head.py, pool/head_grammar.py). Whatever the bytes, both must agree:
the same status, fields and framing, or the same refusal. Heads come from the
property test's generator (valid heads, and heads with one mutation).
"""

from __future__ import annotations

import http.client
import io

import pytest
from hypothesis import given, settings
from test_upstream_heads_property import responses

from pyproxy.pool.head_grammar import InvalidResponseHead, parse_head
from pyproxy.pool.response_head import StrictResponse


class Trickle(io.RawIOBase):
    """A raw stream that gives one byte per read: the buffer never holds a whole head."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self.data[self.at : self.at + 1]
        buffer[: len(chunk)] = chunk
        self.at += len(chunk)
        return len(chunk)


class Source:
    """What StrictResponse reads from: a socket-like object with makefile()."""

    def __init__(self, data: bytes, whole: bool) -> None:
        self.data, self.whole = data, whole

    def makefile(self, mode: str) -> io.BufferedReader:
        raw = io.BytesIO(self.data) if self.whole else Trickle(self.data)
        return io.BufferedReader(raw, 1 << 16)  # type: ignore[arg-type]


def read_head(data: bytes, whole: bool) -> object:
    response = StrictResponse(Source(data, whole), method="GET")  # type: ignore[arg-type]
    try:
        response.begin()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    try:
        body: object = response.read()  # what is left after the head is the body, either way
    except http.client.IncompleteRead as cut:  # a generated body cut short: cut alike
        body = ("IncompleteRead", cut.partial, cut.expected)
    return (
        response.status, response.reason, response.version, response.fields.items(),
        response.length, response.chunked, response.will_close, body,
    )  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(generated=responses())
def test_a_head_read_whole_or_line_by_line_reads_the_same(generated: object) -> None:
    data: bytes = generated.data  # type: ignore[attr-defined]
    assert read_head(data, whole=True) == read_head(data, whole=False)


def fields_of(head: bytes) -> list[tuple[str, str]]:
    return parse_head(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n")[3].fields


def test_values_lose_the_whitespace_around_them_and_keep_the_inside() -> None:
    # RFC 9112 §5: field-line = field-name ":" OWS field-value OWS
    assert fields_of(b"X:  a \t b \t \r\n") == [("X", "a \t b")]
    assert fields_of(b"X:\r\nY: \r\n") == [("X", ""), ("Y", "")]


def test_whitespace_before_the_colon_is_removed_and_lf_ends_a_line() -> None:
    # RFC 9112 §5.1: a proxy MUST remove it from a response; §2.2: LF alone ends a line.
    assert fields_of(b"Server \t: x\nETag: \"e\"\r\n") == [("Server", "x"), ("ETag", '"e"')]


def test_the_framing_fields_are_set_apart() -> None:
    version, status, reason, section = parse_head(
        b"HTTP/1.0 404 Not  Found \r\nContent-Length: 2, 2\r\nConnection: keep-alive\r\n"
        b"transfer-ENCODING: chunked\r\n\r\n"
    )
    assert (version, status, reason) == (10, 404, "Not  Found")
    assert (section.lengths, section.codings, section.connection) == (
        [b"2, 2"], [b"chunked"], ["keep-alive"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        (b"X: a\r\n b\r\n", "folded"),
        (b"X a\r\n", "without a colon"),
        (b"X: a\x00b\r\n", "control character"),
        (b"X\x7f: a\r\n", "invalid header name"),
    ],
)
def test_a_line_that_breaks_the_grammar_is_named(head: bytes, problem: str) -> None:
    with pytest.raises(InvalidResponseHead, match=problem):
        fields_of(head)
