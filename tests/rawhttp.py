"""A tiny raw-socket HTTP/1.1 client, for what `requests` will not send or will hide.

`requests` normalises targets, adds headers, folds repeated response headers and
quietly accepts a body shorter than its Content-Length. This client sends exactly
the bytes it is given and reports exactly what came back, including whether the
body was complete by its framing (Content-Length, chunked, or connection close).
Every read is bounded by the socket timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    framing: str = "none"  # none | length | chunked | close
    complete: bool = True  # False: the connection ended before the framing said it would
    chunks: list[bytes] = field(default_factory=list)  # chunk payloads, for chunked bodies

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times: {values}"
        return values[0] if values else None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class IncompleteResponse(Exception):
    """The connection closed before a status line and header block arrived."""


class RawClient:
    """One TCP connection to `host:port`. Use as a context manager."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    @classmethod
    def to(cls, url: str, timeout: float = 5.0) -> RawClient:
        host_port = url.split("://", 1)[1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        return cls(host, int(port), timeout)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- reading ------------------------------------------------------------------

    def read_head(self) -> RawResponse:
        """The status line and headers of the next response (1xx included)."""
        line = self.reader.readline(65_536)
        if not line:
            raise IncompleteResponse("connection closed before a status line")
        version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        headers: list[tuple[str, str]] = []
        while True:
            line = self.reader.readline(65_536)
            if not line:
                raise IncompleteResponse("connection closed inside the header block")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            headers.append((name, value.strip(" \t")))
        return RawResponse(version, int(code), reason, headers)

    def read_response(self, method: str = "GET") -> RawResponse:
        """The next final response with its body, framed as RFC 9112 §6.3 says."""
        response = self.read_head()
        while 100 <= response.status < 200 and response.status != 101:
            response = self.read_head()
        if method == "HEAD" or response.status in (204, 304) or response.status < 200:
            return response
        encoding = response.values("transfer-encoding")
        length = response.values("content-length")
        if encoding and encoding[-1].lower().endswith("chunked"):
            response.framing = "chunked"
            for chunk in self.iter_chunks(response):
                response.chunks.append(chunk)
            response.body = b"".join(response.chunks)
        elif length:
            response.framing = "length"
            wanted = int(length[0])
            response.body = self._read_upto(wanted)
            response.complete = len(response.body) == wanted
        else:
            response.framing = "close"
            response.body = self._read_upto(None)
        return response

    def _read_upto(self, limit: int | None) -> bytes:
        """Read `limit` bytes (None: until EOF); fewer if the connection ends or is
        reset first. Partial data is kept, unlike BufferedReader.read on a reset."""
        parts: list[bytes] = []
        got = 0
        while limit is None or got < limit:
            want = 65_536 if limit is None else min(65_536, limit - got)
            try:
                data = self.reader.read1(want)
            except ConnectionError:
                break
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def iter_chunks(self, response: RawResponse) -> Iterator[bytes]:
        """Yield each chunk's payload as it arrives; sets `response.complete` to
        False if the connection ends before the terminating zero-size chunk."""
        response.complete = False
        while True:
            try:
                size_line = self.reader.readline(1024)
            except ConnectionError:
                return
            if not size_line:
                return
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                return
            if size == 0:
                while True:  # trailer section, ended by an empty line
                    try:
                        line = self.reader.readline(65_536)
                    except ConnectionError:
                        return
                    if not line:
                        return
                    if line in (b"\r\n", b"\n"):
                        response.complete = True
                        return
            data = self._read_upto(size)
            try:
                crlf = self.reader.readline(16)
            except ConnectionError:
                crlf = b""
            if len(data) < size or crlf not in (b"\r\n", b"\n"):
                if data:
                    yield data
                return
            yield data

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True if the server closed (EOF or reset) within `timeout` with no more bytes."""
        self.sock.settimeout(timeout)
        try:
            data = self.reader.read1(1)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return data == b""


def request_bytes(
    method: str,
    target: str,
    host: str | None = "example.test",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    """The exact bytes of a request; Content-Length is added for a body unless a
    framing header is given in `headers`."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    given = {name.lower() for name, _ in headers or []}
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body is not None and not given & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def exchange(url: str, data: bytes, method: str = "GET", timeout: float = 5.0) -> RawResponse:
    """Open a connection, send `data`, read one response, close."""
    with RawClient.to(url, timeout) as client:
        client.send(data)
        return client.read_response(method)
