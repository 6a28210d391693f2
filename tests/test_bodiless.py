"""Responses that end at their head (HEAD answers, 204, 304) keep the connection usable.

waitress frames a response without Content-Length as chunked (or closes after it).
For a HEAD answer that meant a stray `0\\r\\n\\r\\n` the client would read as the start of
the next response; for 204/304 it meant a closed connection after every one.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from conftest import ProxyFactory

from pyproxy.config.schema import BackendConfig

ANSWERS = {
    b"HEAD": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /304": b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"GET /204": b"HTTP/1.1 204 No Content\r\n\r\n",
    b"GET /ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.fixture
def bodiless_backend() -> Iterator[BackendConfig]:
    """Answers by request line prefix; keeps connections open."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while not stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    line = head.split(b"\r\n", 1)[0]
                    answer = next(a for prefix, a in ANSWERS.items() if line.startswith(prefix))
                    conn.sendall(answer)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield BackendConfig(url=f"http://127.0.0.1:{listener.getsockname()[1]}", name="bodiless")
    stop.set()
    listener.close()


def read_until(sock: socket.socket, marker: bytes, count: int) -> bytes:
    data = b""
    while data.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def test_a_head_answer_without_length_is_followed_by_the_next_response_intact(
    make_proxy: ProxyFactory, bodiless_backend: BackendConfig
) -> None:
    proxy = make_proxy([bodiless_backend])
    with socket.create_connection(proxy.proxy_server.address, timeout=5) as sock:
        sock.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\nGET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        data = read_until(sock, b"HTTP/1.1 ", 2)
        while not data.endswith(b"ok"):
            data += sock.recv(65536)
    head, second = data.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding" not in head
    assert second.startswith(b"HTTP/1.1 200 OK\r\n"), second  # no stray chunk in between
    assert second.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("path", ["/304", "/204"])
def test_bodiless_statuses_keep_the_connection_open(
    make_proxy: ProxyFactory, bodiless_backend: BackendConfig, path: str
) -> None:
    proxy = make_proxy([bodiless_backend])
    with socket.create_connection(proxy.proxy_server.address, timeout=5) as sock:
        for _ in range(2):  # the second request travels on the same connection
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            head = read_until(sock, b"\r\n\r\n", 1)
            assert head.startswith(f"HTTP/1.1 {path[1:]} ".encode()), head
            assert b"Connection: close" not in head
