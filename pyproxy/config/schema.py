"""The configuration schema: frozen dataclasses holding every setting and its default.

This module is the one place defaults live. Each field carries a comment saying what
it means and what its zero or null value means. Durations are float seconds, sizes
are int bytes, rates are `Rate`. Turning YAML into these objects (units, validation,
`${ENV}` expansion, field-path errors) is `configload.py`'s job; this module imports
nothing from pyproxy, so a reader can start here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Address:
    """A listener's host and port. Port 0 asks the OS for a free port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Rate:
    """`count` events per `per_seconds` seconds (e.g. 100/minute = Rate(100, 60.0))."""

    count: int
    per_seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.per_seconds

    def __str__(self) -> str:
        unit = {1.0: "second", 60.0: "minute", 3600.0: "hour"}.get(self.per_seconds)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.per_seconds}s"


@dataclass(frozen=True)
class BackendConfig:
    url: str  # http:// or https://, no path beyond "/"; stored without a trailing "/"
    name: str  # default: host:port; unique across backends
    weight: int = 1  # >= 0; 0 = takes no new requests (drain)
    max_connections: int = 0  # concurrent requests cap; 0 = unlimited


@dataclass(frozen=True)
class Timeouts:
    connect: float = 2.0  # TCP connect to a backend; 0 = no limit
    read: float = 30.0  # wait for each read from a backend; 0 = no limit
    total: float = 60.0  # deadline for one request, all attempts and waits; 0 = no limit


@dataclass(frozen=True)
class HealthCheckConfig:
    enabled: bool = True
    path: str = "/health"  # probed with GET; must start with "/"
    interval: float = 5.0  # between probes of one backend (jittered ~10%)
    timeout: float = 2.0  # one probe in all: connect, send, the answer and its body
    healthy_threshold: int = 2  # consecutive passes to come back up (HAProxy "rise")
    unhealthy_threshold: int = 3  # consecutive failures to go down (HAProxy "fall")
    expected_status: tuple[int, int] = (200, 399)  # inclusive range that passes


@dataclass(frozen=True)
class CircuitBreakerConfig:
    enabled: bool = True
    failure_threshold: int = 5  # consecutive failed attempts that open the circuit
    open_duration: float = 30.0  # first open period; doubles on each re-open ...
    max_open_duration: float = 300.0  # ... up to this
    half_open_requests: int = 1  # trial requests let through after the open period
    # Backend answers that count as failures; connect errors, resets and timeouts always do.
    failure_statuses: frozenset[int] = frozenset({502, 503, 504})


RETRY_CONDITIONS = frozenset({"connect_error", "reset", "timeout"})


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = 2  # extra attempts after the first; 0 = never retry
    # Named conditions (RETRY_CONDITIONS) and/or HTTP status codes.
    retry_on: frozenset[str | int] = frozenset({"connect_error", "reset", "timeout", 502, 503, 504})
    idempotent_only: bool = True  # once sent, retry only GET HEAD OPTIONS PUT DELETE TRACE
    max_body: int = 1024 * 1024  # bodies up to this are buffered so they can be replayed
    backoff: float = 0.0  # pause before each retry (jittered); 0 = retry at once
    budget_percent: float = 20.0  # retries in flight <= this % of requests in flight (min 3)


@dataclass(frozen=True)
class RateLimitConfig:
    per_client: Rate | None = None  # None = no per-client limit
    burst: int | None = None  # bucket size; None = the rate's count
    client_key: str = "ip"  # "ip" or "header:<Name>" (falls back to the address)
    per_backend: Rate | None = None  # applied to every backend; None = off
    max_clients: int = 100_000  # tracked client buckets; idle ones are evicted first
    # "memory", or "redis[s]://[[user]:password@]host:port/db"; left out of repr() (a
    # Config in a traceback or a debug line) because it may hold a password.
    store: str = field(default="memory", repr=False)


@dataclass(frozen=True)
class StickyConfig:
    mode: str = "none"  # none | cookie | ip
    cookie_name: str = "pyproxy_backend"
    cookie_max_age: int | None = None  # seconds; None = session cookie


@dataclass(frozen=True)
class ChaosConfig:
    error_rate: float = 0.0  # fraction (0..1) of upstream attempts failed on purpose
    error_status: int = 503  # the status such an injected failure answers with
    latency: float = 0.0  # extra delay added ...
    latency_rate: float = 0.0  # ... to this fraction (0..1) of attempts


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 8081)  # metrics, probes, API, status page
    # Bearer token for changes; None = changes refused (403). Not in repr(): a secret.
    token: str | None = field(default=None, repr=False)
    state_file: str | None = None  # where admin backend changes persist; None = not kept


@dataclass(frozen=True)
class LimitsConfig:
    max_request_body: int = 10 * 1024 * 1024  # larger -> 413
    max_request_header: int = 64 * 1024  # larger -> 431
    client_idle_timeout: float = 60.0  # idle keep-alive client connections are closed
    header_timeout: float = 10.0  # a client must send its whole header block in this time
    send_timeout: float = 60.0  # a client that reads nothing for this long is dropped
    max_connections: int = 1000  # open client connections


@dataclass(frozen=True)
class ShutdownConfig:
    delay: float = 0.0  # keep serving (with /readyz = 503) this long after SIGTERM
    drain_timeout: float = 30.0  # then wait at most this long for in-flight requests


@dataclass(frozen=True)
class AccessLogConfig:
    enabled: bool = True
    format: str = "text"  # text (Apache-combined-like) | json
    path: str = "-"  # "-" = stdout


STRATEGIES = ("round_robin", "random", "least_connections", "weighted")


@dataclass(frozen=True)
class Config:
    """One complete, validated configuration. `Config(backends=())` is the defaults."""

    backends: tuple[BackendConfig, ...] = ()
    listen: Address = Address("127.0.0.1", 8080)  # proxy listener
    threads: int = 32  # waitress worker threads = max requests served at once
    strategy: str = "round_robin"  # one of STRATEGIES
    preserve_host: bool = True  # forward the client's Host; False = the backend's host:port
    trusted_proxies: tuple[Network, ...] = ()  # peers whose X-Forwarded-* are believed
    timeouts: Timeouts = field(default_factory=Timeouts)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    sticky: StickyConfig = field(default_factory=StickyConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    source_path: str | None = None  # the file this came from; None when built in code
