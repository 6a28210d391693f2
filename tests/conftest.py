"""Shared fixtures: fixture backends and a real pyproxy on 127.0.0.1, port 0.

`make_proxy(backends, **overrides)` builds a Config in code (no YAML), starts a
Service with a fresh CollectorRegistry and an in-memory access log, and closes it
when the test ends. The defaults suit forwarding tests: no health checks (fixture
backends need no /health), no circuit breaker and no retries (so one request is one
upstream attempt and a failure reaches the client as it is), short timeouts.

What an operator reads is read here once for every test: `metric_value` scrapes
/metrics the way Prometheus does, `admin_backends` lists /admin/backends by name, and
`registry_value` reads a sample straight from the service's own registry.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, TypeAlias

import pytest
import requests
from backends import Blackhole, EchoBackend, ScriptedBackend, Step
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pyproxy.config.load import load_config
from pyproxy.config.schema import (
    Address,
    AdminConfig,
    BackendConfig,
    CircuitBreakerConfig,
    Config,
    HealthCheckConfig,
    RetryConfig,
    Timeouts,
)
from pyproxy.process.service import Service

REPO = Path(__file__).resolve().parent.parent


class HasUrl(Protocol):
    url: str
    name: str


BackendLike: TypeAlias = BackendConfig | HasUrl


def as_backend_config(backend: BackendLike) -> BackendConfig:
    if isinstance(backend, BackendConfig):
        return backend
    return backend_config(backend)


def backend_config(backend: HasUrl, **fields: Any) -> BackendConfig:
    """The config entry for a fixture backend, with any other fields set."""
    return BackendConfig(url=backend.url, name=backend.name, **fields)


def replace_file(path: Path, text: str) -> None:
    """What editors do: write a temp file next to it, then rename it over the original."""
    temp = path.with_name(f".{path.name}.swp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def base_config(backends: Sequence[BackendLike] = (), **overrides: Any) -> Config:
    """A test Config: both listeners on port 0, no health checks, breaker or retries."""
    config = Config(
        backends=tuple(as_backend_config(b) for b in backends),
        listen=Address("127.0.0.1", 0),
        admin=AdminConfig(listen=Address("127.0.0.1", 0)),
        threads=8,
        timeouts=Timeouts(connect=1.0, read=2.0, total=10.0),
        health_check=HealthCheckConfig(enabled=False),
        circuit_breaker=CircuitBreakerConfig(enabled=False),
        retries=RetryConfig(max_retries=0),
    )
    return dataclasses.replace(config, **overrides)


_ACCESS_LOGS: dict[int, io.StringIO] = {}


def access_log_text(service: Service) -> str:
    """What the service has written to its access log so far."""
    return _ACCESS_LOGS[id(service)].getvalue()


class ProxyFactory(Protocol):
    def __call__(self, backends: Sequence[BackendLike] = (), **overrides: Any) -> Service: ...


@pytest.fixture
def make_proxy() -> Iterator[ProxyFactory]:
    """Start pyproxy Services; every one is closed at the end of the test."""
    services: list[Service] = []

    def start(backends: Sequence[BackendLike] = (), **overrides: Any) -> Service:
        stream = io.StringIO()
        service = Service(
            base_config(backends, **overrides),
            registry=CollectorRegistry(),
            access_log_stream=stream,
        )
        services.append(service)
        _ACCESS_LOGS[id(service)] = stream
        service.start()
        return service

    yield start
    for service in services:
        service.close()
        _ACCESS_LOGS.pop(id(service), None)


@pytest.fixture
def start_service() -> Iterator[Callable[[Config | Path], Service]]:
    """Start Services from a Config or a YAML file as given (no test defaults added)."""
    services: list[Service] = []

    def start(source: Config | Path) -> Service:
        config = source if isinstance(source, Config) else load_config(str(source))
        service = Service(config, registry=CollectorRegistry())
        services.append(service)
        service.start()
        return service

    yield start
    for service in services:
        service.close()


@pytest.fixture
def make_echo_backend() -> Iterator[Callable[[str], EchoBackend]]:
    backends: list[EchoBackend] = []

    def start(name: str = "echo") -> EchoBackend:
        backend = EchoBackend(name)
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        backend.close()


@pytest.fixture
def echo_backend(make_echo_backend: Callable[[str], EchoBackend]) -> EchoBackend:
    return make_echo_backend("echo")


@pytest.fixture
def three_backends(make_echo_backend: Callable[[str], EchoBackend]) -> list[EchoBackend]:
    return [make_echo_backend(f"app{i}") for i in (1, 2, 3)]


@pytest.fixture
def make_scripted_backend() -> Iterator[Callable[..., ScriptedBackend]]:
    backends: list[ScriptedBackend] = []

    def start(scripts: dict[str, list[Step]], **kw: Any) -> ScriptedBackend:
        backend = ScriptedBackend(scripts, **kw)
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        backend.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    """An address whose every connect times out, named "unreachable"."""
    hole = Blackhole("unreachable")
    yield hole
    hole.close()


@pytest.fixture
def proxy(make_proxy: ProxyFactory, echo_backend: EchoBackend) -> Service:
    """A proxy in front of the one echo backend."""
    return make_proxy([echo_backend])


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A plain HTTP client that ignores proxy variables and .netrc."""
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


# -- pure-logic helpers ------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads very often, so a race gets a chance to show."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


class ChangedOnlyUnderLock:
    """Mixin for a class with a `_lock`: once `watching` is set, any attribute change
    made without that lock held fails the test."""

    watching = False
    _lock: Any

    def __setattr__(self, name: str, value: object) -> None:
        if self.watching:
            assert self._lock.locked(), f"{name} changed without the lock"
        super().__setattr__(name, value)


def spawn_pyproxy(config_path: Path, log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    """`python -m pyproxy -c config_path` as an operator runs it; its log to log_file.

    The caller stops it (SIGTERM, then SIGKILL if it hangs) by its pid.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "pyproxy", "-c", str(config_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )


def run_to_end(threads: Sequence[threading.Thread], timeout: float = 30.0) -> None:
    """Start the threads and wait for every one of them to finish (bounded)."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
        assert not thread.is_alive(), f"{thread.name} still running after {timeout}s"


# -- what an operator reads: /metrics and /admin/backends --------------------------------


class HasAdminUrl(Protocol):
    @property
    def admin_url(self) -> str: ...


def admin_get(service_or_url: HasAdminUrl | str, path: str) -> requests.Response:
    """GET a path of the admin listener (a Service, or its base URL as a string)."""
    base = service_or_url if isinstance(service_or_url, str) else service_or_url.admin_url
    with requests.Session() as session:
        session.trust_env = False  # no proxy variables or .netrc between test and pyproxy
        return session.get(base + path, timeout=5)


def metric_samples(service_or_url: HasAdminUrl | str) -> list[Sample]:
    """Every sample on /metrics, parsed by prometheus_client's own parser."""
    response = admin_get(service_or_url, "/metrics")
    assert response.status_code == 200, response.text
    return [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def metric_value(service_or_url: HasAdminUrl | str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`; None if there is none.

    Labels left out match anything, so more than one sample may fit: that is a mistake
    in the test (it would read an arbitrary one), and fails here.
    """
    found = [
        sample
        for sample in metric_samples(service_or_url)
        if sample.name == name and sample.labels.items() >= labels.items()
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples: {found}"
    return float(found[0].value) if found else None


def metric(service_or_url: HasAdminUrl | str, name: str, **labels: str) -> float:
    """`metric_value`, 0 when the sample is not there yet: a labelled counter or gauge
    first appears on /metrics when it is first touched."""
    return metric_value(service_or_url, name, **labels) or 0.0


def registry_value(service: Service, name: str, **labels: str) -> float:
    """One sample from the service's own registry, without HTTP (0 if never observed).
    Labels left out match anything (a `pool` label, say), as in `metric_value`."""
    found = [
        sample
        for family in service.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and sample.labels.items() >= labels.items()
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples: {found}"
    return float(found[0].value) if found else 0.0


def admin_backends(service_or_url: HasAdminUrl | str) -> dict[str, dict[str, Any]]:
    """/admin/backends as {name: entry}, in the order the API lists them."""
    response = admin_get(service_or_url, "/admin/backends")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return {entry["name"]: entry for entry in response.json()["backends"]}


def served_by(http: requests.Session, service: Service, count: int) -> list[str]:
    """Send `count` sequential GET /who; the X-Backend name that answered each."""
    names = []
    for _ in range(count):
        response = http.get(service.proxy_url + "/who", timeout=5)
        assert response.status_code == 200, response.text
        names.append(response.headers["X-Backend"])
    return names


def admin_reload(
    http: requests.Session, service_or_url: HasAdminUrl | str, token: str
) -> requests.Response:
    """POST /admin/reload with the admin token."""
    base = service_or_url if isinstance(service_or_url, str) else service_or_url.admin_url
    headers = {"Authorization": f"Bearer {token}"}
    return http.post(base + "/admin/reload", headers=headers, timeout=10)


def assert_finished_whole(result: dict[str, Any], backend: str) -> None:
    """A slow request that was in flight on `backend` while it was taken out of
    service (removed, drained) finished: 200, its whole body, from that backend."""
    assert result.get("status") == 200, result
    echoed = json.loads(result["body"])  # the whole body arrived and parses
    assert echoed["backend"] == backend
    assert len(result["body"]) == int(result["headers"]["Content-Length"])


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Names a test resolves itself: {name: address or numeric spelling}. Other names
    go to the real resolver. Nothing is ever sent to a non-loopback address: the SSRF
    guard refuses a forbidden answer before connecting."""
    answers: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        return real(answers.get(name, host), port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers
