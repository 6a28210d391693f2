"""scripts/bare_forwarder.py is the yardstick for pyproxy's features: it must forward
correctly, or the benchmark compares pyproxy with something that cuts corners."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import waitress

from tests.backends import COOKIES, EchoBackend, closed_port
from tests.rawhttp import exchange, request_bytes

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bare_forwarder.py"
_spec = importlib.util.spec_from_file_location("bare_forwarder", SCRIPT)
assert _spec is not None and _spec.loader is not None
bare_forwarder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bare_forwarder)


@pytest.fixture
def forward_to() -> Iterator:
    servers = []

    def start(backend_url: str) -> str:
        app = bare_forwarder.make_app(backend_url, threads=4)
        server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.effective_port}"

    yield start
    for server, thread in servers:
        server.close()
        thread.join(timeout=10)


def test_raw_target_and_request_hop_by_hop(forward_to, echo_backend: EchoBackend) -> None:
    url = forward_to(echo_backend.url)
    headers = [("Connection", "X-Private"), ("X-Private", "1"), ("Keep-Alive", "timeout=5")]
    headers += [("TE", "trailers"), ("X-Kept", "yes")]
    answer = exchange(url, request_bytes("GET", "/a%2Fb//c?x=1&y", headers=headers))
    assert answer.status == 200
    received = echo_backend.received[-1]
    assert received.target == "/a%2Fb//c?x=1&y"
    assert received.header("X-Kept") == "yes"
    assert not received.header_names() & {"x-private", "keep-alive", "te", "user-agent"}


def test_response_hop_by_hop_and_repeated_headers(forward_to, echo_backend: EchoBackend) -> None:
    url = forward_to(echo_backend.url)
    hop = exchange(url, request_bytes("GET", "/hop"))
    assert hop.status == 200 and hop.header("X-Kept") == "yes"
    assert not hop.names() & {"x-private", "keep-alive", "proxy-authenticate", "upgrade"}
    cookies = exchange(url, request_bytes("GET", "/cookies"))
    assert cookies.values("Set-Cookie") == list(COOKIES)


def test_body_forwarded_and_connection_pooled(forward_to, echo_backend: EchoBackend) -> None:
    url = forward_to(echo_backend.url)
    for n in range(5):
        body = bytes([n]) * 70_000
        answer = exchange(url, request_bytes("POST", "/raw-echo", body=body))
        assert answer.status == 200 and answer.body == body
    assert echo_backend.connections == 1  # one pooled upstream connection served all five


def test_no_backend_is_a_502(forward_to) -> None:
    url = forward_to(f"http://127.0.0.1:{closed_port()}")
    answer = exchange(url, request_bytes("GET", "/"))
    assert answer.status == 502
