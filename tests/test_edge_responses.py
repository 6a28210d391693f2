"""The edge against slow clients and cut responses, through real sockets.

A client that reads nothing must cost the proxy a bounded buffer, and the backend
must feel it (the relay stops reading); `limits.send_timeout` then frees it all. A
response pyproxy cuts short must look cut short to every client: where the framing
cannot show it (HTTP/1.0, close-delimited), the client connection is reset.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from backends import CLOSE, RESET, ScriptedBackend, send, wait_for
from conftest import ProxyFactory

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge.listener import OUTPUT_BUFFER

WAIT = 10.0
MiB = 1024 * 1024


class FloodBackend:
    """Answers one request with a `size`-byte body, counting the bytes its socket took."""

    name = "flood"

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.finished = threading.Event()  # the body was sent, or the connection died
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, name="test-flood", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(WAIT)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            self.finished.set()
            return
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            conn.settimeout(WAIT * 3)
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
                block = b"x" * 65536
                while self.sent < self.size:
                    self.sent += conn.send(block[: self.size - self.sent])
            except OSError:
                pass
            finally:
                self.finished.set()

    def close(self) -> None:
        self.listener.close()
        self._thread.join(WAIT)


@pytest.fixture
def flood() -> Iterator[FloodBackend]:
    backend = FloodBackend(32 * MiB)
    yield backend
    backend.close()


def test_a_client_that_reads_nothing_holds_about_one_mib_and_the_backend_waits(
    make_proxy: ProxyFactory, flood: FloodBackend
) -> None:
    limits = dataclasses.replace(LimitsConfig(), send_timeout=3.0)
    proxy = make_proxy([flood], limits=limits)
    edge = proxy.proxy_server
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it reads nothing
    client.connect(edge.address)
    with client:
        client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: edge.buffered_output() >= OUTPUT_BUFFER, WAIT)
        # The worker now waits for the client; the backend is soon stuck too. Watch
        # until its count stops moving for a second (bounded: WAIT).
        peak, last, still_since = 0, -1, time.monotonic()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and time.monotonic() - still_since < 1.0:
            peak = max(peak, edge.buffered_output())
            if flood.sent != last:
                last, still_since = flood.sent, time.monotonic()
            time.sleep(0.02)
        assert peak <= OUTPUT_BUFFER + 128 * 1024, peak  # one relay chunk over the mark
        assert not flood.finished.is_set(), "the whole body was read from the backend"
        assert flood.sent < 16 * MiB, flood.sent  # the rest waits in socket buffers
        # send_timeout: the stalled client is dropped, the backend connection released.
        assert flood.finished.wait(WAIT), "the backend is still held after send_timeout"
        assert wait_for(lambda: edge.open_connections() == 0, WAIT)


# -- a cut response must look cut ----------------------------------------------------


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
LENGTH_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"


@pytest.fixture
def dying(make_scripted_backend: Callable[..., ScriptedBackend]) -> ScriptedBackend:
    """A backend that starts a body and dies (RST) before its end, in three framings."""
    scripts = {
        "/chunked": [send(CHUNKED_HEAD + b"5\r\nhello\r\n"), RESET],
        "/close": [send(CLOSE_HEAD + b"hello"), RESET],
        "/length": [send(LENGTH_HEAD + b"hello"), RESET],
    }
    return make_scripted_backend(scripts)


def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the server sends, and how it ended: "reset", "eof" (or "timeout")."""
    data = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            break
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "timeout"


def fetch(proxy_address: tuple[str, int], request: bytes) -> tuple[bytes, str]:
    with socket.create_connection(proxy_address, timeout=WAIT) as sock:
        sock.sendall(request)
        return read_until_end(sock)


@pytest.mark.parametrize("path", ["/chunked", "/close"])
def test_an_http_1_0_client_sees_a_reset_when_the_body_is_cut(
    make_proxy: ProxyFactory, dying: ScriptedBackend, path: str
) -> None:
    proxy = make_proxy([dying])
    data, end = fetch(proxy.proxy_server.address, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    head = data.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.0 200 ") or head == b"", data  # a reset may drop it
    assert b"content-length" not in head.lower()  # close-delimited: only a RST shows the cut
    assert end == "reset", (end, data)


@pytest.mark.parametrize("path", ["/chunked", "/close"])
def test_an_http_1_1_client_sees_the_cut_in_the_chunked_framing(
    make_proxy: ProxyFactory, dying: ScriptedBackend, path: str
) -> None:
    proxy = make_proxy([dying])
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    data, end = fetch(proxy.proxy_server.address, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\ntransfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nhello\r\n", body  # no last chunk: visibly incomplete
    assert end in ("eof", "reset")


def test_an_http_1_0_client_sees_the_cut_in_a_content_length(
    make_proxy: ProxyFactory, dying: ScriptedBackend
) -> None:
    proxy = make_proxy([dying])
    data, end = fetch(proxy.proxy_server.address, b"GET /length HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\ncontent-length: 100" in head.lower()
    assert body == b"hello"  # 5 of 100: visibly incomplete
    assert end in ("eof", "reset")


def test_a_complete_close_delimited_response_ends_cleanly(
    make_proxy: ProxyFactory, make_scripted_backend: Callable[..., ScriptedBackend]
) -> None:
    backend = make_scripted_backend({"/ok": [send(CLOSE_HEAD + b"all of it"), CLOSE]})
    proxy = make_proxy([backend])
    data, end = fetch(proxy.proxy_server.address, b"GET /ok HTTP/1.0\r\n\r\n")
    assert data.endswith(b"\r\n\r\nall of it")
    assert end == "eof"
