"""AdminApp reads the running pyproxy through `Instance`, a Protocol naming exactly
what it needs (its name, start time and clock, ready(), requests_in_flight()), not the whole
Service. Here the admin API is served through a real listener by an object that has
only those members, and each is seen in an answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
from backends import EchoBackend
from conftest import base_config

from pyproxy.edge.server import EdgeServer
from pyproxy.observe.metrics import Metrics
from pyproxy.ops.admin import AdminApp
from pyproxy.runtime.snapshot import RuntimeHolder, build_runtime
from pyproxy.runtime.swap import RuntimeSwap


@dataclass
class OnlyTheInstance:
    """Has the members of `Instance` and nothing else."""

    instance_name: str = "pyproxy-under-test"
    started_at: float = 1000.0
    now: float = 1125.0
    is_ready: bool = True
    requests_now: int = 3
    asked: list[str] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def ready(self) -> bool:
        self.asked.append("ready")
        return self.is_ready

    def requests_in_flight(self) -> int:
        self.asked.append("in_flight")
        return self.requests_now


@pytest.fixture
def served(echo_backend: EchoBackend) -> Iterator[tuple[str, OnlyTheInstance]]:
    config = base_config([echo_backend])
    runtime, _ = build_runtime(config)
    holder = RuntimeHolder(runtime)
    metrics = Metrics()
    instance = OnlyTheInstance()
    app = AdminApp(holder, metrics, instance, RuntimeSwap(holder, metrics))
    server = EdgeServer(app, "127.0.0.1", 0, threads=2, limits=config.limits, name="admin")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.address[:2]
    try:
        yield f"http://{host}:{port}", instance
    finally:
        server.close()
        thread.join(timeout=5)
        for backend in holder.runtime.backends:
            backend.close()


def test_the_admin_api_needs_only_the_instance_protocol(
    served: tuple[str, OnlyTheInstance], http: requests.Session
) -> None:
    url, instance = served
    assert http.get(url + "/readyz", timeout=5).text == "ready\n"
    instance.is_ready = False
    ready = http.get(url + "/readyz", timeout=5)
    assert (ready.status_code, ready.text) == (503, "shutting down\n")

    scrape = http.get(url + "/metrics", timeout=5).text
    assert "proxy_in_flight_requests 3.0" in scrape
    assert instance.asked == ["ready", "ready", "in_flight"]

    page = http.get(url + "/admin/status", timeout=5).text
    assert "pyproxy-under-test" in page
    assert "2 min 5 s" in page  # uptime: clock() - started_at

    looped = http.get(url + "/livez", headers={"Via": "1.1 pyproxy-under-test"}, timeout=5)
    assert looped.status_code == 508
