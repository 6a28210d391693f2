"""StrictChunkedReceiver on its own: pure decoding, fed in every possible split.

A body arrives in whatever pieces TCP makes of it; a line or a CRLF cut across two
reads must decode exactly as if it came whole (the socket-level tests are in
test_edge_requests.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from waitress.buffers import OverflowableBuffer

from pyproxy.edge.chunked import StrictChunkedReceiver

BODY = b"3;name=value\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\n"


def receiver(max_body: int = 1000, max_trailer: int = 100) -> StrictChunkedReceiver:
    return StrictChunkedReceiver(
        OverflowableBuffer(65536), max_body=max_body, max_trailer=max_trailer
    )


def feed(rcv: StrictChunkedReceiver, pieces: list[bytes]) -> int:
    """Feed like waitress does: each piece until it is used up or the body is done."""
    used = 0
    for piece in pieces:
        while piece and not rcv.completed and rcv.error is None:
            taken = rcv.received(piece)
            used += taken
            piece = piece[taken:]
            if not taken:
                break
    return used


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(BODY + NEXT)), max_size=8))
def test_any_split_decodes_the_same_and_stops_at_the_next_request(cuts: list[int]) -> None:
    data = BODY + NEXT
    points = sorted(set(cuts))
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    rcv = receiver()
    used = feed(rcv, pieces)
    assert rcv.error is None
    assert rcv.completed
    assert used == len(BODY)  # the next request's bytes are left for it
    assert rcv.getfile().read() == b"abc0123456789abcdef"


def test_byte_by_byte() -> None:
    rcv = receiver()
    assert feed(rcv, [bytes([b]) for b in BODY]) == len(BODY)
    assert rcv.completed and rcv.getfile().read() == b"abc0123456789abcdef"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"3e9\r\n", 413),  # 1001 > 1000, known before any data
        (b"3e9", 413),  # ... even before the line ends
        (b"1f4\r\n" + b"x" * 500 + b"\r\n1f5\r\n", 413),  # the sum
        (b"0" * 5000, 400),
        (b"0\r\nX: " + b"t" * 200, 431),
        (b"3\r\nabc\r\n0\r\nX: 1\r\nY: 2\r\n" + b"Z: 3\r\n" * 20, 431),
        (b"x\r\n", 400),
        (b"3\rabc\r\n", 400),
    ],
)
def test_refusals(data: bytes, code: int) -> None:
    rcv = receiver()
    feed(rcv, [data])
    assert rcv.error is not None and rcv.error.code == code, rcv.error


def test_exactly_the_limit_is_fine() -> None:
    rcv = receiver(max_body=1000)
    feed(rcv, [b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n"])
    assert rcv.error is None and rcv.completed and len(rcv) == 1000
