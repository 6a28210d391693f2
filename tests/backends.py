"""Fixture backends for the integration tests: real servers on 127.0.0.1, port 0.

`EchoBackend` is a well-behaved HTTP/1.1 origin (http.server, not waitress, so what it
records is what crossed the wire, not what a WSGI layer made of it). It answers every
request with JSON describing exactly what it received, and keeps a list of those
records so a test can also say "this request never reached a backend". A few paths
behave differently, for the response-side promises (see `EchoHandler.ROUTES`).

`ScriptedBackend` is a misbehaving one: for each request path a test scripts the
exact bytes it writes (and whether it then hangs, closes, resets or keeps the
connection for the next request). It counts the connections it accepted, so a test
can prove that a broken connection was not reused.

Every server here runs in daemon threads and is stopped by `close()`; every wait is
bounded in time.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

WAIT = 10.0  # upper bound on any wait a backend does on a test's event


def pattern_bytes(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes, so a shifted or truncated copy is
    never equal to the original."""
    block = bytes((i * 7 + i // 251) % 256 for i in range(65_536))
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


GZIP_PLAIN = b"compressed payload that must reach the client still compressed\n" * 50
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)

COOKIES = (
    "session=abc123; Path=/; HttpOnly",
    "theme=dark; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/",
    "lang=en-GB, fr; Path=/",
)

SSE_EVENTS = (b"data: first\n\n", b"data: second\n\n", b"data: third\n\n")


@dataclass
class Received:
    """One request as the backend read it off the socket."""

    backend: str
    connection: int  # 1-based index of the TCP connection it came on
    request_line: str
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # in order, names as sent, repeats kept apart
    body: bytes
    chunked: bool  # the body arrived with Transfer-Encoding: chunked framing

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def as_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "connection": self.connection,
            "request_line": self.request_line,
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": [[k, v] for k, v in self.headers],
            "body_b64": base64.b64encode(self.body).decode() if len(self.body) <= 65_536 else None,
            "body_length": len(self.body),
            "chunked": self.chunked,
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: EchoBackend


class EchoHandler(BaseHTTPRequestHandler):
    """Answers with JSON describing the request, except on these paths:

    /cookies        three Set-Cookie headers (one value contains commas)
    /redirect       302 to /elsewhere
    /gzip           GZIP_BODY with Content-Encoding: gzip
    /large?size=N   N bytes of pattern_bytes(N), Content-Length framed
    /raw-echo       the request body back, byte for byte
    /status/N       status N (no body for 1xx/204/304), else a short body
    /hop            hop-by-hop response headers, some named in Connection
    /request-id     sets its own X-Request-ID on the response
    /hold           signals `holding`, waits for `release`, then echoes
    /slow?delay=S   sleeps S seconds before the headers
    /sse            SSE_EVENTS as chunks; waits for `sse_continue` after the first
    HEAD on any path: the GET headers (with Content-Length), no body.
    """

    protocol_version = "HTTP/1.1"
    # One segment per response, sent at once: a header/body split across two writes
    # meets Nagle + delayed ACK and costs ~40 ms per request.
    wbufsize = 256 * 1024
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def setup(self) -> None:
        super().setup()
        self.connection_index = self.server.backend._count_connection()

    # Every method goes through one place.
    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self.respond
        raise AttributeError(name)

    # -- reading ----------------------------------------------------------------

    def _read_body(self) -> tuple[bytes, bool]:
        encodings = self.headers.get_all("Transfer-Encoding") or []
        if encodings:
            return self._read_chunked(), True
        length = self.headers.get("Content-Length")
        if length is None:
            return b"", False
        return self.rfile.read(int(length)), False

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)

    # -- answering --------------------------------------------------------------

    def respond(self) -> None:
        backend = self.server.backend
        body, chunked = self._read_body()
        record = Received(
            backend=backend.name,
            connection=self.connection_index,
            request_line=self.requestline,
            method=self.command,
            # self.path is not the raw target: http.server collapses a leading "//".
            target=self.requestline.split(" ")[1] if " " in self.requestline else "",
            version=self.request_version,
            headers=[(k, v) for k, v in self.headers.raw_items()],
            body=body,
            chunked=chunked,
        )
        backend._record(record)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path
        head = self.command == "HEAD"
        if path == "/cookies":
            extra = [("Set-Cookie", c) for c in COOKIES]
            self._send(200, b"cookies set\n", extra, head)
        elif path == "/redirect":
            self._send(302, b"moved\n", [("Location", "/elsewhere")], head)
        elif path == "/gzip":
            extra = [("Content-Encoding", "gzip"), ("Content-Type", "text/plain")]
            self._send(200, GZIP_BODY, extra, head)
        elif path == "/large":
            self._send(200, pattern_bytes(int(query["size"][0])), [], head)
        elif path == "/raw-echo":
            self._send(200, body, [("Content-Type", "application/octet-stream")], head)
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            if status in (204, 304) or status < 200:
                self._send_no_body(status, [("ETag", '"v1"')] if status == 304 else [])
            else:
                self._send(status, f"status {status} from {backend.name}\n".encode(), [], head)
        elif path == "/hop":
            self._send(
                200,
                b"hop\n",
                [
                    ("Connection", "X-Private, Keep-Alive"),
                    ("X-Private", "connection-scoped"),
                    ("Keep-Alive", "timeout=5, max=100"),
                    ("Proxy-Authenticate", 'Basic realm="backend"'),
                    ("Upgrade", "h2c"),
                    ("Trailer", "X-Checksum"),
                    ("Proxy-Connection", "keep-alive"),
                    ("X-Kept", "yes"),
                ],
                head,
            )
        elif path == "/request-id":
            self._send(200, b"ok\n", [("X-Request-ID", "set-by-backend")], head)
        elif path == "/hold":
            backend.holding.set()
            backend.release.wait(WAIT)
            self._send_json(record, head)
        elif path == "/slow":
            time.sleep(float(query.get("delay", ["1"])[0]))
            self._send_json(record, head)
        elif path == "/sse":
            self._send_sse()
        else:
            self._send_json(record, head)

    def _send_json(self, record: Received, head: bool) -> None:
        payload = json.dumps(record.as_json()).encode()
        self._send(200, payload, [("Content-Type", "application/json")], head)

    def _send(self, status: int, body: bytes, extra: list[tuple[str, str]], head: bool) -> None:
        self.send_response(status)
        self.send_header("X-Backend", self.server.backend.name)
        for name, value in extra:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.wfile.flush()

    def _send_no_body(self, status: int, extra: list[tuple[str, str]]) -> None:
        self.send_response(status)
        self.send_header("X-Backend", self.server.backend.name)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def _send_sse(self) -> None:
        backend = self.server.backend
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, event in enumerate(SSE_EVENTS):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            if index == 0:
                backend.sse_first_sent.set()
                backend.sse_continue.wait(WAIT)
            else:
                time.sleep(0.05)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        backend.sse_finished.set()


class EchoBackend:
    """A well-behaved origin server in a thread. `url`, `name`, `received`."""

    def __init__(self, name: str = "echo") -> None:
        self.name = name
        self.received: list[Received] = []
        self.connections = 0
        self._lock = threading.Lock()  # guards received and connections
        self.holding = threading.Event()
        self.release = threading.Event()
        self.sse_first_sent = threading.Event()
        self.sse_continue = threading.Event()
        self.sse_finished = threading.Event()
        self.server = _Server(("127.0.0.1", 0), EchoHandler)
        self.server.backend = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"test-backend-{name}",
            daemon=True,
        )
        self._thread.start()

    def _count_connection(self) -> int:
        with self._lock:
            self.connections += 1
            return self.connections

    def _record(self, record: Received) -> None:
        with self._lock:
            self.received.append(record)

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.release.set()
        self.sse_continue.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


# -- the misbehaving backend ------------------------------------------------------


@dataclass
class Step:
    """One thing the scripted backend does after reading a request."""

    kind: str  # send | trickle | sleep | close | reset | hang | keep
    data: bytes = b""
    seconds: float = 0.0


def send(data: bytes) -> Step:
    return Step("send", data)


def trickle(data: bytes, interval: float) -> Step:
    """Send `data` one byte at a time, `interval` seconds apart."""
    return Step("trickle", data, interval)


def sleep(seconds: float) -> Step:
    return Step("sleep", seconds=seconds)


CLOSE = Step("close")  # orderly FIN
RESET = Step("reset")  # RST (SO_LINGER 0)
HANG = Step("hang")  # keep the connection open and say nothing (until close())
KEEP = Step("keep")  # read the next request on this connection


@dataclass
class ScriptedRequest:
    connection: int
    request_line: str
    raw: bytes


@dataclass
class ScriptedBackend:
    """A raw-socket server whose answers are scripted per request path.

    `scripts[path]` is a list of Steps; a path not scripted gets `default`. A test
    may add scripts while the backend runs (one dict store is atomic).

    `slow_body=(n, seconds)` reads a request body `n` bytes at a time, pausing
    `seconds` between reads, behind a small receive buffer: a backend whose TCP window
    stays nearly full while the proxy sends it a large body.
    """

    scripts: dict[str, list[Step]] = field(default_factory=dict)
    default: list[Step] = field(default_factory=lambda: [send(response(200, b"default\n")), KEEP])
    name: str = "scripted"
    slow_body: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        self.connections = 0
        self.received: list[ScriptedRequest] = []
        self.body_bytes = 0  # request body bytes read so far, over all connections
        self.peer_closed: set[int] = set()  # connections the proxy closed (EOF or reset)
        self._lock = threading.Lock()  # guards the counters above and _sockets
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.slow_body is not None:
            # Set before listen() so accepted sockets inherit it: no receive-buffer
            # autotuning, so the sender blocks soon after this backend stops reading.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept_loop, name="test-scripted", daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                index = self.connections
                self._sockets.append(conn)
            worker = threading.Thread(
                target=self._serve, args=(conn, index), name=f"test-scripted-{index}", daemon=True
            )
            worker.start()
            with self._lock:
                self._threads.append(worker)

    def _read_request(self, conn: socket.socket, index: int, buffer: bytearray) -> bytes | None:
        deadline = time.monotonic() + WAIT
        while b"\r\n\r\n" not in buffer:
            if self._stop.is_set() or time.monotonic() > deadline:
                return None
            try:
                data = conn.recv(65_536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    self.peer_closed.add(index)
                return None
            buffer += data
        end = buffer.index(b"\r\n\r\n") + 4
        head = bytes(buffer[:end])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        size, pause = self.slow_body or (65_536, 0.0)
        while len(buffer) < end + length:
            if pause and self._stop.wait(pause):
                return None
            try:
                data = conn.recv(size)
            except TimeoutError:
                continue
            except OSError:
                return None
            if not data:
                return None
            buffer += data
            with self._lock:
                self.body_bytes += len(data)
        raw = bytes(buffer[: end + length])
        del buffer[: end + length]
        return raw

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(0.05)
        buffer = bytearray()
        try:
            while True:
                raw = self._read_request(conn, index, buffer)
                if raw is None:
                    return
                request_line = raw.split(b"\r\n", 1)[0].decode("latin-1")
                with self._lock:
                    self.received.append(ScriptedRequest(index, request_line, raw))
                path = request_line.split(" ")[1].split("?")[0] if " " in request_line else "/"
                steps = self.scripts.get(path, self.default)
                if not self._run(conn, steps):
                    return
        finally:
            conn.close()

    def _run(self, conn: socket.socket, steps: list[Step]) -> bool:
        """Play the steps; True if the connection should read another request."""
        for step in steps:
            if step.kind == "send":
                conn.sendall(step.data)
            elif step.kind == "trickle":
                for i in range(len(step.data)):
                    if self._stop.wait(step.seconds):
                        return False
                    try:
                        conn.sendall(step.data[i : i + 1])
                    except OSError:
                        return False
            elif step.kind == "sleep":
                if self._stop.wait(step.seconds):
                    return False
            elif step.kind == "close":
                # ENOTCONN when the client hung up first: the connection is closed either way.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                return False
            elif step.kind == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return False
            elif step.kind == "hang":
                self._stop.wait(WAIT * 3)
                return False
            elif step.kind == "keep":
                return True
        return False

    def requests(self) -> list[ScriptedRequest]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)


def response(
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    reason: str = "OK",
    content_length: bool = True,
) -> bytes:
    """The bytes of a simple HTTP/1.1 response."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Blackhole:
    """A listener whose accept queue is full, so every new connect times out.

    listen(0) leaves room for one queued connection; `filler` takes it, and the kernel
    drops every later SYN, which is what a firewalled or vanished host looks like.
    """

    def __init__(self, name: str = "blackhole") -> None:
        self.name = name
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port))
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
