"""The configuration schema: frozen dataclasses holding every setting and its default.

This module is the one place defaults live. Each field carries a comment saying what
it means and what its zero or null value means. Durations are float seconds, sizes
are int bytes, rates are `Rate`. Turning YAML into these objects (units, validation,
`${ENV}` expansion, field-path errors) is `load.py`'s job; this module imports
nothing from pyproxy, so a reader can start here.

Two file layouts give one shape. A v1 file lists top-level `backends`; a file with
`pools` + `routes` names several groups of backends and says which requests go to
which. Either way `Config.pools` and `Config.routes` describe what to run: a v1 file
is one pool named `default` and one catch-all route.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property

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
    # True: gets requests only while no non-backup backend of its pool is available
    # (nginx and HAProxy `backup`); retries may use it the same way.
    backup: bool = False


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
    host: str | None = None  # Host header of probes, sent as given; None = backend's host:port
    port: int | None = None  # probe the backend's host on this port; None = the backend's port
    expect_body: str | None = None  # a substring the body must contain; None = any body


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
DEFAULT_POOL = "default"  # the name of a v1 file's one pool


@dataclass(frozen=True)
class PoolConfig:
    """A named group of backends with its own balancing.

    Every section here is complete: the file's per-pool settings were merged field by
    field over the top-level sections when the file was loaded, so a pool that sets
    only `health_check: {path: /healthz}` has every other top-level health_check value.
    """

    name: str  # the key under `pools:`; a v1 file's one pool is DEFAULT_POOL
    backends: tuple[BackendConfig, ...] = ()  # names unique across every pool
    strategy: str = "round_robin"  # one of STRATEGIES; default: the top-level strategy
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    sticky: StickyConfig = field(default_factory=StickyConfig)
    # Each backend's request rate cap (`rate_limit.per_backend` in the pool); the other
    # rate_limit settings are per client, so they stay top-level only. None = off.
    per_backend_rate: Rate | None = None


@dataclass(frozen=True)
class RouteMatch:
    """What a request must look like for a route to take it; both None = every request."""

    # "api.example.com" (exact) or "*.example.com" (exactly one more label), lower
    # case, no port; None = any host.
    host: str | None = None
    # "/v1": the raw path is /v1 or goes on with "/" or "?" (never /v1x); a prefix
    # ending in "/" takes every path that starts with it. None = any path.
    path_prefix: str | None = None


@dataclass(frozen=True)
class RouteConfig:
    """Send the requests `match` takes to `pool`. Routes are tried in file order."""

    name: str  # default "routes[i]" (i from 0, as in field paths); unique
    pool: str  # the name of a pool in the same file
    match: RouteMatch = field(default_factory=RouteMatch)
    strip_prefix: bool = False  # True: /v1/users -> /users upstream, /v1 -> /


def catch_all(pool: str) -> RouteConfig:
    """The route a file gets when it names no routes: everything goes to `pool`."""
    return RouteConfig(name="routes[0]", pool=pool)


@dataclass(frozen=True)
class Config:
    """One complete, validated configuration. `Config(backends=())` is the defaults.

    Read `pools` and `routes`: they are always filled. A v1 file (and a Config built
    in code from `backends`) is one pool named "default", made of `backends` and the
    top-level sections, and one catch-all route to it. A file with `pools` keeps them
    in `declared_pools` / `declared_routes`, and `backends` then lists every pool's
    backends in file order, so code that reads `backends` still sees them all (as one
    group: it knows nothing of routes).
    """

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
    # Processes serving the proxy listener; "auto" in the file is the CPU count. Each
    # worker keeps its own health, breaker and memory rate-limit state.
    workers: int = 1
    declared_pools: tuple[PoolConfig, ...] = ()  # the file's `pools`, merged; () = v1 file
    declared_routes: tuple[RouteConfig, ...] = ()  # the file's `routes`; () = one catch-all
    source_path: str | None = None  # the file this came from; None when built in code

    # cached_property writes into the instance __dict__, which a frozen dataclass
    # allows; dataclasses.replace() builds a new instance, so nothing goes stale.
    @cached_property
    def pools(self) -> tuple[PoolConfig, ...]:
        """Every pool in file order; a v1 config's one pool is made here."""
        if self.declared_pools:
            return self.declared_pools
        return (
            PoolConfig(
                name=DEFAULT_POOL,
                backends=self.backends,
                strategy=self.strategy,
                health_check=self.health_check,
                circuit_breaker=self.circuit_breaker,
                retries=self.retries,
                sticky=self.sticky,
                per_backend_rate=self.rate_limit.per_backend,
            ),
        )

    @cached_property
    def routes(self) -> tuple[RouteConfig, ...]:
        """Every route in file order; without `routes`, one catch-all to the only pool."""
        return self.declared_routes or (catch_all(self.pools[0].name),)

    def pool(self, name: str) -> PoolConfig | None:
        """The pool called `name`, or None."""
        return next((pool for pool in self.pools if pool.name == name), None)
