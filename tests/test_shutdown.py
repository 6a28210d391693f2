"""Graceful shutdown (docs/shutdown.md): a real `python -m pyproxy` process and real signals.

The echo backends run in this test process, so a test decides when a held request
(`/hold`) may finish. Every process started here is stopped by its PID in a `finally`;
every wait polls with a deadline. See docs/shutdown.md for the sequence these
tests walk through.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from backends import EchoBackend, free_ports, wait_for
from conftest import base_config, spawn_pyproxy
from prometheus_client import CollectorRegistry

from pyproxy.config.schema import ShutdownConfig
from pyproxy.process.service import Service


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    url: str
    admin_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> float:
        self.process.send_signal(signum)
        return time.monotonic()

    def status(self, path: str) -> int | None:
        """The admin listener's answer for `path`, or None if nothing answers."""
        try:
            return requests.get(self.admin_url + path, timeout=2).status_code
        except requests.ConnectionError:
            return None


@pytest.fixture
def run_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start `python -m pyproxy -c FILE` on two free ports; kill it (by PID) at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(backends: list[EchoBackend], **shutdown: Any) -> Proxy:
        proxy_port, admin_port = free_ports(2)
        config = {
            "listen": f"127.0.0.1:{proxy_port}",
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "threads": 32,
            "health_check": {"enabled": False},
            "circuit_breaker": {"enabled": False},
            "retries": {"max_retries": 0},
            # connect: the fixture backend's listen backlog is 5, so a burst of new
            # connections can need a SYN retransmit (1 s) before it is accepted.
            "timeouts": {"connect": "5s", "read": "15s", "total": "20s"},
            "access_log": {"enabled": False},
            "shutdown": shutdown,
            "backends": [{"url": b.url, "name": b.name} for b in backends],
        }
        path = tmp_path / f"pyproxy-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        # Not next to the config: the watcher would see every log line as a change.
        log_path = tmp_path / "logs" / f"pyproxy-{len(started)}.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "wb") as log_file:
            process = spawn_pyproxy(path, log_file)
        started.append(process)
        proxy = Proxy(
            process, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", log_path
        )
        assert wait_for(lambda: proxy.status("/readyz") == 200 or process.poll() is not None, 15)
        assert process.poll() is None, proxy.log()
        return proxy

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(5)


@dataclass
class Outcome:
    status: int | None = None
    body: bytes = b""
    headers: dict[str, str] | None = None
    error: str | None = None


def fetch_in_threads(url: str, count: int) -> tuple[list[threading.Thread], list[Outcome]]:
    outcomes = [Outcome() for _ in range(count)]

    def fetch(outcome: Outcome) -> None:
        try:
            with requests.Session() as session:
                session.trust_env = False
                response = session.get(url, timeout=20)
            outcome.status = response.status_code
            outcome.body = response.content
            outcome.headers = dict(response.headers)
        except requests.RequestException as error:
            outcome.error = repr(error)

    threads = [threading.Thread(target=fetch, args=(o,), daemon=True) for o in outcomes]
    for thread in threads:
        thread.start()
    return threads, outcomes


def complete(outcome: Outcome) -> bool:
    """200, a body as long as its Content-Length, that parses as the echo's JSON."""
    if outcome.status != 200 or outcome.headers is None:
        return False
    if len(outcome.body) != int(outcome.headers["Content-Length"]):
        return False
    return bool(json.loads(outcome.body)["backend"])


def refused(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


# -- the drain ------------------------------------------------------------------------


def test_sigterm_lets_every_in_flight_request_finish(
    run_proxy: Callable[..., Proxy], echo_backend: EchoBackend
) -> None:
    proxy = run_proxy([echo_backend], delay="0s", drain_timeout="15s")
    count = 24
    threads, outcomes = fetch_in_threads(proxy.url + "/slow?delay=1.5", count)
    assert wait_for(lambda: len(echo_backend.requests()) == count, timeout=10)

    proxy.signal(signal.SIGTERM)
    # /readyz turns 503 at once; /livez stays 200 while the process drains.
    assert wait_for(lambda: proxy.status("/readyz") == 503, timeout=1.0)
    assert proxy.status("/livez") == 200
    assert proxy.process.poll() is None  # the slow requests are still in flight

    for thread in threads:
        thread.join(20)
    assert [o.error for o in outcomes] == [None] * count
    assert all(complete(o) for o in outcomes), [o.status for o in outcomes]
    # Every response from the signal on tells the client not to reuse the connection.
    assert {o.headers["Connection"].lower() for o in outcomes if o.headers} == {"close"}
    assert proxy.process.wait(timeout=15) == 0
    log = proxy.log()
    assert "shutdown: all requests finished" in log
    assert "Traceback" not in log


def test_sigint_is_a_graceful_shutdown_too(
    run_proxy: Callable[..., Proxy], echo_backend: EchoBackend
) -> None:
    proxy = run_proxy([echo_backend])
    threads, outcomes = fetch_in_threads(proxy.url + "/hold", 1)
    assert echo_backend.holding.wait(5)
    proxy.signal(signal.SIGINT)
    assert wait_for(lambda: proxy.status("/readyz") == 503, timeout=1.0)
    assert proxy.process.poll() is None
    echo_backend.release.set()
    threads[0].join(10)
    assert complete(outcomes[0])
    assert proxy.process.wait(timeout=10) == 0


def test_shutdown_delay_keeps_serving_then_refuses_new_connections(
    run_proxy: Callable[..., Proxy], make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    holder, other = make_echo_backend("holder"), make_echo_backend("other")
    delay = 1.5
    proxy = run_proxy([holder, other], delay=f"{delay}s", drain_timeout="10s")
    # One request stays in flight, so the process cannot exit before the test says so.
    held_threads, held = fetch_in_threads(proxy.url + "/hold", 1)
    assert holder.holding.wait(5)
    try:
        signalled = proxy.signal(signal.SIGTERM)
        assert wait_for(lambda: proxy.status("/readyz") == 503, timeout=1.0)

        # During the delay: new connections are still served (with Connection: close).
        response = requests.get(proxy.url + "/during-delay", timeout=5)
        served_at = time.monotonic() - signalled
        assert served_at < delay, "the check came too late to prove anything"
        assert response.status_code == 200
        assert response.headers["Connection"].lower() == "close"

        # After the delay: the listener is closed while the process is still draining.
        assert wait_for(lambda: refused(proxy.url), timeout=delay + 5)
        refused_at = time.monotonic() - signalled
        assert refused_at >= delay * 0.9, f"refused after {refused_at:.2f}s"
        assert proxy.process.poll() is None
        assert proxy.status("/livez") == 200
        assert proxy.status("/readyz") == 503
    finally:
        holder.release.set()
    held_threads[0].join(10)
    assert complete(held[0])
    assert proxy.process.wait(timeout=10) == 0


def test_a_second_signal_exits_at_once(
    run_proxy: Callable[..., Proxy], echo_backend: EchoBackend
) -> None:
    proxy = run_proxy([echo_backend], drain_timeout="30s")
    threads, outcomes = fetch_in_threads(proxy.url + "/hold", 1)
    assert echo_backend.holding.wait(5)
    try:
        proxy.signal(signal.SIGTERM)
        assert wait_for(lambda: proxy.status("/readyz") == 503, timeout=1.0)
        assert proxy.process.poll() is None  # draining: it would wait up to 30 s
        second = proxy.signal(signal.SIGTERM)
        code = proxy.process.wait(timeout=5)
        assert time.monotonic() - second < 3
    finally:
        echo_backend.release.set()
    # Observed (and documented in docs/shutdown.md): exit status 1, no drain; the held
    # client loses its connection.
    assert code == 1
    assert "second SIGTERM: exiting now" in proxy.log()
    threads[0].join(10)
    assert outcomes[0].status is None and outcomes[0].error is not None


def test_drain_timeout_bounds_the_wait_for_a_hung_request(
    run_proxy: Callable[..., Proxy], echo_backend: EchoBackend
) -> None:
    drain_timeout = 1.0
    proxy = run_proxy([echo_backend], drain_timeout=f"{drain_timeout}s")
    threads, outcomes = fetch_in_threads(proxy.url + "/hold", 1)
    assert echo_backend.holding.wait(5)
    try:
        signalled = proxy.signal(signal.SIGTERM)
        code = proxy.process.wait(timeout=drain_timeout + 5)
        took = time.monotonic() - signalled
    finally:
        echo_backend.release.set()
    assert code == 0
    assert drain_timeout * 0.9 <= took < drain_timeout + 4, took
    assert "drain timeout passed with 1 request(s)" in proxy.log()
    threads[0].join(10)
    assert not complete(outcomes[0])  # cut off: the client sees it was not completed


# -- in process: what the drain waits for -----------------------------------------------


@pytest.fixture
def service_and_backend() -> Iterator[tuple[Service, EchoBackend]]:
    backend = EchoBackend("big")
    service = Service(
        base_config([backend], shutdown=ShutdownConfig(delay=0.0, drain_timeout=10.0)),
        registry=CollectorRegistry(),
        access_log_stream=io.StringIO(),
    )
    try:
        service.start()
        yield service, backend
    finally:
        service.close()
        backend.close()


def test_a_response_still_being_sent_at_shutdown_is_delivered_whole(
    service_and_backend: tuple[Service, EchoBackend],
) -> None:
    service, backend = service_and_backend
    size = 16 * 1024 * 1024
    host, port = service.proxy_server.address[:2]
    client = socket.create_connection((host, port), timeout=10)
    try:
        client.sendall(f"GET /large?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # The client reads nothing yet: most of the body waits in pyproxy's buffers.
        assert wait_for(lambda: len(backend.requests()) == 1, timeout=5)
        wait_for(lambda: service.requests_in_flight() == 0, timeout=5)  # the app is done with it
        service.request_shutdown()
        serving = threading.Thread(target=service.serve, daemon=True)
        serving.start()
        serving.join(2)  # a correct drain is still waiting for this client here
        received = bytearray()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                chunk = client.recv(1 << 20)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        serving.join(15)
    finally:
        client.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == size


def test_idle_keep_alive_connections_are_closed_and_threads_stop(
    service_and_backend: tuple[Service, EchoBackend],
) -> None:
    service, _ = service_and_backend
    session = requests.Session()
    session.trust_env = False
    try:
        assert session.get(service.proxy_url + "/", timeout=5).status_code == 200
        assert service.proxy_server.open_connections() == 1  # kept alive, idle
        service.request_shutdown()
        serving = threading.Thread(target=service.serve, daemon=True)
        serving.start()
        serving.join(10)
        assert not serving.is_alive()
    finally:
        session.close()
    assert service.proxy_server.open_connections() == 0

    # Background threads stop cleanly (issue 6): none of this Service's is left running.
    # (`pyproxy-deadline` is the process-wide upstream deadline watchdog of
    # pyproxy/pool/connection.py, shared by every Service: it ends by itself once nothing is
    # watched, at the latest at the last request's deadline, which may be far off.)
    def ours() -> list[str]:
        return [
            t.name
            for t in threading.enumerate()
            if t.name.startswith("pyproxy-") and t.name != "pyproxy-deadline"
        ]

    assert wait_for(lambda: not ours(), 5), ours()
    with (
        contextlib.suppress(OSError),
        socket.create_connection(service.proxy_server.address[:2], 1),
    ):
        pytest.fail("the proxy listener still accepts connections after shutdown")
