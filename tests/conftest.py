"""Shared fixtures: fixture backends and a real pyproxy on 127.0.0.1, port 0.

`make_proxy(backends, **overrides)` builds a Config in code (no YAML), starts a
Service with a fresh CollectorRegistry and an in-memory access log, and closes it
when the test ends. The defaults suit forwarding tests: no health checks (fixture
backends need no /health), no circuit breaker and no retries (so one request is one
upstream attempt and a failure reaches the client as it is), short timeouts.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeAlias

import pytest
import requests
from backends import EchoBackend, ScriptedBackend, Step
from prometheus_client import CollectorRegistry

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


class HasUrl(Protocol):
    url: str
    name: str


BackendLike: TypeAlias = BackendConfig | HasUrl


def as_backend_config(backend: BackendLike) -> BackendConfig:
    if isinstance(backend, BackendConfig):
        return backend
    return BackendConfig(url=backend.url, name=backend.name)


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


def run_to_end(threads: Sequence[threading.Thread], timeout: float = 30.0) -> None:
    """Start the threads and wait for every one of them to finish (bounded)."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
        assert not thread.is_alive(), f"{thread.name} still running after {timeout}s"
