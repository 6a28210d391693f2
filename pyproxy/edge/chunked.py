"""StrictChunkedReceiver: the chunked request-body decoder of the edge (RFC 9112 §7.1).

It replaces waitress's ChunkedReceiver (same interface) because that one is lenient
and unbounded where a front server cannot be:

- It accepts a bare LF at the end of a size line (`5\\n\\r\\n`: its regexes end in `$`,
  which matches before a newline) and any bytes in trailer lines. A server in front
  of pyproxy that ends lines differently would frame the body differently: request
  smuggling. CRLF is the only line end here, as in nginx (nginx/nginx#1016).
- It checks the body size only after the bytes arrived: `ffffffffffffffffff` as a
  chunk size (or a size line that never ends) got no answer until the limit's worth
  of bytes was sent. Here a chunk that would take the body over
  `limits.max_request_body` is refused (413) as soon as its size is read.
- A size line or trailer section that never ends was kept and rescanned on every
  read. Here a size line is at most MAX_CHUNK_LINE bytes (400) and the trailer
  section at most `limits.max_request_header` (431).

The decoded body goes to waitress's buffer; the trailer fields are checked and
dropped (waitress drops them too; pyproxy forwards the body with a Content-Length).
"""

from __future__ import annotations

import re
from typing import Any

from waitress.rfc7230 import CHUNK_EXT_RE, HEADER_FIELD_RE
from waitress.utilities import (
    BadRequest,
    Error,
    RequestEntityTooLarge,
    RequestHeaderFieldsTooLarge,
)

# A chunk size is a few hex digits; extensions are rare and short.
MAX_CHUNK_LINE = 4096
_HEX_RE = re.compile(rb"[0-9A-Fa-f]+")
_SIGNIFICANT_HEX_RE = re.compile(rb"0*([0-9A-Fa-f]*)")  # the size digits, leading zeros aside
_CHUNK_HEAD_RE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:;[^\r\n]*)?)\r\n")  # a size line, CRLF


class StrictChunkedReceiver:
    """Decodes one chunked body into `buf`; `error` is set when the body is refused.

    `received(data)` returns how many bytes of `data` belong to the body: after the
    last chunk and the trailer section, the rest is the next request's.
    """

    completed = False
    error: Error | None = None

    def __init__(self, buf: Any, *, max_body: int, max_trailer: int) -> None:
        self.buf = buf
        self.max_body = max_body
        self.max_trailer = max_trailer
        self._state = "size"  # size | data | data-end | trailer
        self._line = b""  # an unfinished size or trailer line, or part of a data CRLF
        self._remaining = 0  # bytes of the current chunk still to come
        self._trailer_size = 0

    def __len__(self) -> int:
        return len(self.buf)

    def getfile(self) -> Any:
        return self.buf.getfile()

    def getbuf(self) -> Any:
        return self.buf

    def received(self, data: bytes) -> int:
        pos, end = 0, len(data)
        while pos < end and not self.completed and self.error is None:
            if self._state == "size" and not self._line:
                pos = self._whole_chunks(data, pos)
                if pos == end:
                    break
            if self._state == "data":
                take = min(self._remaining, end - pos)
                self.buf.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = "data-end"
            elif self._state == "data-end":
                # RFC 9112 §7.1: chunk-data is followed by CRLF (which may arrive split).
                wanted = b"\r\n"[len(self._line) :]
                got = data[pos : pos + len(wanted)]
                if not wanted.startswith(got):
                    self.error = BadRequest("chunk data not followed by CRLF")
                    break
                pos += len(got)
                self._line += got
                if self._line == b"\r\n":
                    self._line, self._state = b"", "size"
            else:
                newline = data.find(b"\n", pos)
                stop = end if newline < 0 else newline + 1
                line = self._line + data[pos:stop]
                pos = stop
                if newline < 0:
                    self._line = line
                    self.error = self._unfinished_line_problem(line)
                    break
                self._line = b""
                if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                    self.error = BadRequest("bare CR or LF in chunked framing")
                elif self._state == "size":
                    self.error = self._size_line(line[:-2])
                else:
                    self.error = self._trailer_line(line[:-2])
        return pos

    def _whole_chunks(self, data: bytes, pos: int) -> int:
        """The fast path: take the chunks that lie wholly in `data` from `pos` on, with
        one append. Stops before anything unusual (an error, a chunk cut by the end of
        `data`, the last chunk), which the line-by-line path then handles."""
        parts: list[bytes] = []
        held = len(self.buf)
        while True:
            head = _CHUNK_HEAD_RE.match(data, pos)
            if head is None or head.end() - pos > MAX_CHUNK_LINE:
                break
            size_hex, extensions = head.groups()
            size = int(size_hex, 16)
            start, stop = head.end(), head.end() + size
            if (
                not size
                or held + size > self.max_body
                or data[stop : stop + 2] != b"\r\n"
                or (extensions and not CHUNK_EXT_RE.match(extensions))
            ):
                break
            parts.append(data[start:stop])
            held += size
            pos = stop + 2
        if parts:
            self.buf.append(b"".join(parts))
        return pos

    def _size_line(self, line: bytes) -> Error | None:
        size, semi, extensions = line.partition(b";")
        if not _HEX_RE.fullmatch(size):
            return BadRequest("invalid chunk size")
        if semi and not CHUNK_EXT_RE.match(semi + extensions):
            return BadRequest("invalid chunk extension")
        if len(line) > MAX_CHUNK_LINE:
            return _line_too_long()
        digits = _SIGNIFICANT_HEX_RE.match(size).group(1)  # type: ignore[union-attr]
        if len(digits) > 16 or len(self.buf) + int(size, 16) > self.max_body:
            return _body_too_large(self.max_body)
        self._remaining = int(size, 16)
        self._state = "data" if self._remaining else "trailer"
        return None

    def _trailer_line(self, line: bytes) -> Error | None:
        if not line:
            self.completed = True  # the empty line that ends the message
            return None
        self._trailer_size += len(line) + 2
        if self._trailer_size > self.max_trailer:
            return _trailer_too_large(self.max_trailer)
        if not HEADER_FIELD_RE.match(line):
            return BadRequest("invalid trailer field")
        return None

    def _unfinished_line_problem(self, line: bytes) -> Error | None:
        """Refuse a line before its end when its end cannot make it acceptable."""
        if self._state == "trailer":
            if self._trailer_size + len(line) > self.max_trailer:
                return _trailer_too_large(self.max_trailer)
            return None
        digits = _SIGNIFICANT_HEX_RE.match(line).group(1)  # type: ignore[union-attr]
        if len(digits) > 16 or (digits and len(self.buf) + int(digits, 16) > self.max_body):
            return _body_too_large(self.max_body)
        if len(line) > MAX_CHUNK_LINE:
            return _line_too_long()
        return None


def _body_too_large(limit: int) -> Error:
    return RequestEntityTooLarge(f"body larger than limits.max_request_body ({limit} bytes)")


def _trailer_too_large(limit: int) -> Error:
    return RequestHeaderFieldsTooLarge(
        f"trailer section larger than limits.max_request_header ({limit} bytes)"
    )


def _line_too_long() -> Error:
    return BadRequest(f"chunk size line longer than {MAX_CHUNK_LINE} bytes")
