"""A property over response heads: whatever a backend writes, the client gets a valid
HTTP/1.1 relay of it or pyproxy's own 502, within a bounded time; never a 500, never
a hang.

Heads are built from a small grammar (interim responses, a status line, header
fields including hop-by-hop ones, three kinds of framing, a body), then at most one
mutation is applied to the bytes: a byte inserted or deleted, a line folded, a colon
lost, a Content-Length made into a list, the response cut short. An unmutated head
is valid, so it must be relayed, with its status, its end-to-end fields and its body.

Every generated response has `Connection: close` as its first field, and no mutation
touches that line. Either it is read, or a mutation ended the head before it, and
then no Content-Length was read either, so the body runs to the end of the
connection. Either way no upstream connection is reused between examples: one
example's leftover bytes never become the next one's head.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from backends import CLOSE, ScriptedBackend, send
from conftest import base_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_upstream_heads import SHARED_TIMEOUTS, ask, is_own_502

from pyproxy.headers import HOP_BY_HOP, WAITRESS_HOP_BY_HOP
from pyproxy.process.service import Service

# No 500 or 502: those would be mistaken for the edge's or pyproxy's own answers.
STATUSES = [200, 201, 204, 206, 299, 301, 304, 404, 418, 501, 503, 599]
NAMES = [
    "Content-Type",
    "Cache-Control",
    "Set-Cookie",
    "ETag",
    "X-Custom",
    "x-lower",
    "Server",
    "Date",
    "Keep-Alive",
    "Upgrade",
    "TE",
    "Trailer",
    "Trailers",
    "Proxy-Authenticate",
]
TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR_SP = "".join(chr(c) for c in range(0x20, 0x7F)) + "\xe9\xff"
# Bytes that break heads, or that parsers disagree about.
ODD_BYTES = [b"\x00", b"\r", b"\n", b"\x7f", b"\x01", b"\x0b", b"\x1f", b" ", b"\t", b":"]
ODD_BYTES += [b",", b"\x80", b"\x85", b"\xa0", b"\xff", b"\r\n", b"\r\n "]
DROPPED_DOWNSTREAM = HOP_BY_HOP | WAITRESS_HOP_BY_HOP | {"via", "x-request-id", "server", "date"}


@dataclass
class Generated:
    data: bytes  # what the backend writes
    status: int
    fields: list[tuple[str, str]]  # the final response's end-to-end fields
    body: bytes
    mutated: bool


names = st.one_of(st.sampled_from(NAMES), st.text(TCHAR, min_size=1, max_size=12))
values = st.text(VCHAR_SP, max_size=24).map(lambda v: v.strip(" "))
fields_st = st.lists(st.tuples(names, values), max_size=6)
interim_st = st.lists(
    st.tuples(st.sampled_from([100, 102, 103]), st.lists(st.tuples(names, values), max_size=2)),
    max_size=2,
)


def chunked(body: bytes, cut: int) -> bytes:
    pieces = [body[:cut], body[cut:]] if 0 < cut < len(body) else [body]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return encoded + b"0\r\n\r\n"


@st.composite
def responses(draw: st.DrawFn) -> Generated:
    status = draw(st.sampled_from(STATUSES))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    reason = draw(st.text(VCHAR_SP, max_size=16)).strip(" ")
    fields = [f for f in draw(fields_st) if f[0].lower() not in ("connection", "content-length")]
    fields = [f for f in fields if f[0].lower() != "transfer-encoding"]
    no_body = status in (204, 304)
    body = b"" if no_body else draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "length-list", "chunked", "close"]))
    if version == "HTTP/1.0" and framing == "chunked":
        framing = "length"  # chunked is HTTP/1.1 only (RFC 9112 §6.1)

    lines = [f"{version} {status} {reason}".encode("latin-1"), b"Connection: close"]
    lines += [f"{n}: {v}".encode("latin-1") for n, v in fields]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "length-list":
        lines.append(b"Content-Length: %d, %d" % (len(body), len(body)))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
    payload = body
    if framing == "chunked" and not no_body:
        payload = chunked(body, draw(st.integers(0, 40)))

    interims = b"".join(
        f"HTTP/1.1 {code} Interim\r\n".encode()
        + b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in extra)
        + b"\r\n"
        for code, extra in draw(interim_st)
    )

    mutated = draw(st.booleans())
    kind = ""
    if mutated:
        # Never line 1 (Connection: close): see the module docstring.
        index = draw(st.sampled_from([0, *range(2, len(lines))]))
        line = lines[index]
        at = draw(st.integers(0, len(line)))
        kind = draw(st.sampled_from(["insert", "delete", "fold", "colon", "cl-list", "cut"]))
        if kind == "insert":
            line = line[:at] + draw(st.sampled_from(ODD_BYTES)) + line[at:]
        elif kind == "delete":
            line = line[:at] + line[at + 1 :]
        elif kind == "fold":
            line = b" " + line
        elif kind == "colon":
            line = line.replace(b":", b" ", 1)
        elif kind == "cl-list":
            odd = draw(st.sampled_from([b"1, 2", b"-1", b"+1", b"1 1", b"", b"0x1", b",", b"1,,1"]))
            line = b"Content-Length: " + odd
        lines[index] = line
    data = interims + b"\r\n".join(lines) + b"\r\n\r\n" + payload
    if kind == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    return Generated(data, status, fields, body, mutated)


# -- the shared proxy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[ScriptedBackend]:
    scripted = ScriptedBackend(name="scripted")
    yield scripted
    scripted.close()


@pytest.fixture(scope="module")
def proxy(backend: ScriptedBackend) -> Iterator[Service]:
    service = Service(
        base_config([backend], timeouts=SHARED_TIMEOUTS), registry=CollectorRegistry()
    )
    service.start()
    yield service
    service.close()


_paths = itertools.count()


@settings(
    max_examples=150,
    deadline=None,  # a shared, busy machine: time is bounded by the client's timeout
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(generated=responses())
def test_any_head_is_relayed_as_valid_http_or_answered_502(
    proxy: Service, backend: ScriptedBackend, generated: Generated
) -> None:
    path = f"/h/{next(_paths)}"
    backend.scripts[path] = [send(generated.data), CLOSE]

    answer = ask(proxy, path)  # asserts a valid head and framing, within CLIENT_WAIT

    assert answer.status != 500, answer.body
    if is_own_502(answer):
        assert generated.mutated, f"a valid head was refused: {generated.data!r}"
        return
    assert answer.status == generated.status
    if generated.mutated:
        return
    assert answer.body == generated.body
    relayed = {(name.lower(), value) for name, value in answer.headers}
    for name, value in generated.fields:
        if name.lower() not in DROPPED_DOWNSTREAM:
            assert (name.lower(), value) in relayed, (name, value, answer.headers)
