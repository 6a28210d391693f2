"""Backend: one upstream server, its connection pool, and the facts pyproxy knows about it.

A Backend object lives as long as the backend stays configured: a config reload
hands the same object to the new runtime (matched by URL), so its health, circuit
and in-flight count survive. A Backend keeps facts only (counters, streaks, circuit
state, weight, whether it was removed); whether it may take a request is judged in
one place, `why_unavailable()` in runtime/snapshot.py, which also sees the rate
bucket the runtime owns. Caddy splits its upstreams the same way: the facts on the
`Host`, the one `Upstream.Available()` predicate over them.
"""

from __future__ import annotations

import http.cookiejar
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from pyproxy.config.schema import BackendConfig, CircuitBreakerConfig, HealthCheckConfig
from pyproxy.pool.breaker import CircuitBreaker, CircuitState
from pyproxy.pool.connection import connection_class
from pyproxy.pool.health import HealthStatus


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """A cookie policy that accepts nothing: a proxy's client must never store a
    backend's Set-Cookie and replay it for another user. requests keeps and replays
    cookies by default (its Session has a RequestsCookieJar with the default policy)."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


def make_session(pool_size: int) -> requests.Session:
    """A requests.Session fit to be a proxy's client for one backend.

    `pool_size` connections are kept alive (urllib3's default of 10 would make the
    other threads open and drop a connection per request under load).
    """
    session = requests.Session()
    session.trust_env = False  # no proxy variables, no .netrc credentials
    session.cookies.set_policy(_NoCookies())
    session.headers.clear()  # no default User-Agent / Accept / Accept-Encoding
    session.max_redirects = 0
    # Room for a second pool key (e.g. TLS options) so the hot path's pool is never
    # evicted and closed under it by urllib3's PoolManager.
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass(frozen=True)
class BackendSnapshot:
    """The facts of one backend at one moment, for /admin/backends and the status page.

    Facts only: whether the backend is available is the judge's answer
    (`Runtime.why_unavailable`), asked by whoever shows it, never stored here."""

    name: str
    url: str
    weight: int  # the effective weight: the admin's when set, else the configured one
    file_weight: int  # the configured weight (the file's, or add-backend's)
    admin_weight: int | None  # set through POST /admin/set-backend; None: not overridden
    drain: bool  # drained through POST /admin/set-backend: no new requests
    source: str
    healthy: bool
    health: str
    health_transitions: int
    circuit: str
    in_flight: int
    max_connections: int
    requests_total: int
    failures_total: int


class Backend:
    """One upstream server. Create with `Backend(config, ...)`; `close()` when removed.

    `weight` 0 means "takes no new requests"; `max_connections` 0 means no cap.
    `source` is "config" (from the file) or "admin" (added through the admin API).
    """

    def __init__(
        self,
        config: BackendConfig,
        *,
        pool_size: int,
        health: HealthCheckConfig,
        breaker: CircuitBreakerConfig,
        source: str = "config",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = config.name
        self.url = config.url
        self.source = source
        parts = urlsplit(config.url)
        self.scheme = parts.scheme
        self.netloc = parts.netloc  # what Host says when preserve_host is off
        self.session = make_session(pool_size)
        # The hot path talks to the session adapter's urllib3 pool directly
        # (docs/performance.md: Session.request costs about half a request's CPU).
        adapter = self.session.get_adapter(config.url)
        assert isinstance(adapter, HTTPAdapter)
        pool = adapter.poolmanager.connection_from_url(config.url)
        # Connections that send the raw target and obey timeouts.total, and for an
        # admin-added backend, dial only addresses the SSRF guard allows (connection.py).
        pool.ConnectionCls = connection_class(self.scheme, source)
        self.pool: urllib3.HTTPConnectionPool = pool
        # Config backends start up; admin-added ones start unknown and wait for a
        # passing probe unless health checks are off (HAProxy's `add server` likewise
        # creates a server in maintenance, to be enabled once it is ready).
        initially_up: bool | None = True if source == "config" or not health.enabled else None
        self.health = HealthStatus(
            health.healthy_threshold, health.unhealthy_threshold, initially_up
        )
        self.health_checked = health.enabled  # with checks off, health is not consulted
        self.breaker = CircuitBreaker(breaker, clock=clock)
        self._lock = threading.Lock()  # guards the counters below; never held across I/O
        self.in_flight = 0
        self.requests_total = 0
        self.failures_total = 0
        self.removed = False  # set when taken out of the pool; in-flight requests finish
        # Set through POST /admin/set-backend (`apply_overrides` in runtime/snapshot.py),
        # like HAProxy's `set server ... weight` and `state drain`:
        self.admin_weight: int | None = None  # wins over config.weight while set
        self.drained = False  # no new requests; in-flight ones finish

    @property
    def weight(self) -> int:
        """The effective weight: the admin's while set, else the configured one."""
        admin_weight = self.admin_weight
        return self.config.weight if admin_weight is None else admin_weight

    @property
    def max_connections(self) -> int:
        return self.config.max_connections

    def reconfigure(
        self, config: BackendConfig, health: HealthCheckConfig, breaker: CircuitBreakerConfig
    ) -> None:
        """Apply new settings from a reload while keeping every piece of state."""
        self.config = config
        self.name = config.name
        self.health.update_thresholds(health.healthy_threshold, health.unhealthy_threshold)
        self.health_checked = health.enabled
        self.breaker.update_settings(breaker)

    # -- facts ---------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Count a request in flight if the cap allows it; False means "full"."""
        with self._lock:
            if self.removed:  # its pool is closing: a request must not start on it now
                return False
            cap = self.config.max_connections
            if cap and self.in_flight >= cap:
                return False
            self.in_flight += 1
            self.requests_total += 1
            return True

    def release(self, failed: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if failed:
                self.failures_total += 1
            last_of_removed = self.removed and self.in_flight == 0
        if last_of_removed:
            self.close()  # outside the lock: it is socket I/O

    def snapshot(self) -> BackendSnapshot:
        return BackendSnapshot(
            name=self.name,
            url=self.url,
            weight=self.weight,
            file_weight=self.config.weight,
            admin_weight=self.admin_weight,
            drain=self.drained,
            source=self.source,
            healthy=self.health.up,
            health=self.health.state,
            health_transitions=self.health.transitions,
            circuit=self.breaker.state.value,
            in_flight=self.in_flight,
            max_connections=self.config.max_connections,
            requests_total=self.requests_total,
            failures_total=self.failures_total,
        )

    def retire(self) -> None:
        """Take out of service: no new request is admitted (try_acquire checks `removed`
        under the same lock), and the pool is closed once the last request in flight
        ends (in `release`), or now if none is."""
        with self._lock:
            self.removed = True
            idle = self.in_flight == 0
        if idle:
            self.close()

    def close(self) -> None:
        """Close the pool's idle keep-alive connections (urllib3 2's PoolManager.clear()
        does not close its pools, so the hot path's pool is closed explicitly)."""
        self.pool.close()
        self.session.close()


__all__ = ["Backend", "BackendSnapshot", "CircuitState", "make_session"]
