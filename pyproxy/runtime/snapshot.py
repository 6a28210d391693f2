"""Runtime: one immutable snapshot of everything a request needs.

A request reads `holder.runtime` once and uses that snapshot to the end, so a reload
or an admin change never shows it half a configuration. Building a new snapshot
reuses the previous one's Backend objects (matched by pool and URL): their health,
circuit and in-flight counts are state that must survive a reload (nginx and HAProxy
keep a server's health and counters across a reload too). Pools live in pools.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import urllib3

from pyproxy.config.schema import (
    DEFAULT_POOL,
    BackendConfig,
    Config,
    HealthCheckConfig,
    PoolConfig,
    RateLimitConfig,
)
from pyproxy.policy.ratelimit import BackendLimiter, ClientLimiter
from pyproxy.policy.ratelimit_store import make_client_limiter
from pyproxy.policy.routes import RouteTable
from pyproxy.policy.selection import Selector
from pyproxy.policy.sticky import Sticky
from pyproxy.pool.backend import Backend
from pyproxy.pool.urlguard import url_identity
from pyproxy.runtime.admin_changes import AdminChanges, apply_overrides
from pyproxy.runtime.pools import RATE_BUCKET_EMPTY, Pool, build_pool, why_unavailable

__all__ = [
    "RATE_BUCKET_EMPTY",
    "Pool",
    "Runtime",
    "RuntimeHolder",
    "attempt_timeout",
    "build_runtime",
    "why_unavailable",
]


def attempt_timeout(connect: float, read: float) -> urllib3.Timeout:
    """urllib3 timeouts from config seconds, where 0 means no limit."""
    return urllib3.Timeout(connect=connect or None, read=read or None)


@dataclass(frozen=True)
class Runtime:
    """The running snapshot: every pool (by name, file order), the route table, and
    `backends`, every pool's backends in one tuple (names are unique across pools)."""

    config: Config
    backends: tuple[Backend, ...]
    pools: Mapping[str, Pool]
    routes: RouteTable
    default_timeout: urllib3.Timeout  # built once: most attempts are not near the deadline
    client_limiter: ClientLimiter | None = None  # None: no per-client limit
    # The largest `retries.max_body` of any pool: the body is read before the route is
    # known, so it is buffered for replay up to what any pool might replay.
    max_replay_body: int = 0
    pool_of: Mapping[Backend, Pool] = field(default_factory=dict, compare=False)

    @property
    def default_pool(self) -> Pool:
        """The pool named "default", else the first: what the v1 view shows."""
        return self.pools.get(DEFAULT_POOL) or next(iter(self.pools.values()))

    # The v1 view (one group of backends): the default pool's balancing.
    @property
    def selector(self) -> Selector:
        return self.default_pool.selector

    @property
    def sticky(self) -> Sticky:
        return self.default_pool.sticky

    @property
    def backend_limiter(self) -> BackendLimiter | None:
        return self.default_pool.backend_limiter

    def why_unavailable(self, backend: Backend, *, rate_bucket: bool = True) -> str | None:
        """Why `backend` may not take a new request now, or None if it may: the one
        judge (`why_unavailable`, with the rate buckets of the backend's pool).
        Selection, the explain header, /admin/backends, the status page and /readyz
        all ask it. `rate_bucket=False` judges everything but the bucket (the 503's
        Retry-After asks which backends wait only for a token)."""
        pool = self.pool_of.get(backend)
        limiter = pool.backend_limiter if pool is not None and rate_bucket else None
        return why_unavailable(backend, limiter)

    def replacing_pool(self, pool: Pool) -> Runtime:
        """This snapshot with `pool` in place of its namesake (a test swaps a pool's
        rate limiter this way, as a reload would)."""
        pools = {**self.pools, pool.name: pool}
        pool_of = {**self.pool_of, **dict.fromkeys(pool.backends, pool)}
        return dataclasses.replace(self, pools=pools, pool_of=pool_of)

    def members(self) -> list[tuple[str, Backend]]:
        """(pool name, backend) for every running backend, pool by pool."""
        return [(pool.name, b) for pool in self.pools.values() for b in pool.backends]

    def pool_name(self, backend: Backend) -> str:
        """The name of `backend`'s pool ("" for one no longer in this snapshot)."""
        pool = self.pool_of.get(backend)
        return pool.name if pool is not None else ""

    def health_settings(self, backend: Backend) -> HealthCheckConfig:
        """The health_check settings `backend` is probed with: its pool's."""
        pool = self.pool_of.get(backend)
        return pool.config.health_check if pool is not None else self.config.health_check

    def candidates(self, exclude: Collection[Backend] = ()) -> list[Backend]:
        """The backends of any pool that may take a new request now."""
        return [b for pool in self.pools.values() for b in pool.candidates(exclude)]

    def find(self, name: str | None = None, url: str | None = None) -> Backend | None:
        """The backend with this name, or at this URL (http://h and http://h:80 are one)."""
        identity = url_identity(url) if url else None
        for backend in self.backends:
            if backend.name == name or (identity and url_identity(backend.url) == identity):
                return backend
        return None


def build_runtime(
    config: Config,
    previous: Runtime | None = None,
    admin: AdminChanges | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_store_error: Callable[[], None] = lambda: None,
) -> tuple[Runtime, list[Backend]]:
    """A new snapshot for `config`, and the Backends of `previous` that are gone.

    A backend that stays in its pool at the same URL is the same Backend object, so
    its health, circuit and in-flight count carry over; one that moved to another
    pool is a new backend there (its old self is gone from the old pool). Callers
    mark the gone ones removed and close them once idle; requests holding the
    previous snapshot keep using them until they finish.
    """
    admin = admin or AdminChanges()
    old = {}
    if previous is not None:
        old = {(pool.name, b.url): b for pool in previous.pools.values() for b in pool.backends}
    pools: dict[str, Pool] = {}
    pool_of: dict[Backend, Pool] = {}
    desired = admin.desired_by_pool(config)
    for pool_config in config.pools:
        backends = tuple(
            _backend(config, pool_config, backend_config, source, old, clock)
            for backend_config, source in desired[pool_config.name]
        )
        before = previous.pools.get(pool_config.name) if previous is not None else None
        pool = pools[pool_config.name] = build_pool(pool_config, backends, before, clock)
        pool_of.update((backend, pool) for backend in backends)
    apply_overrides(pool_of, admin)  # the admin's weights and drains, on every pool
    runtime = Runtime(
        config=config,
        backends=tuple(pool_of),
        pools=pools,
        routes=RouteTable.build(config.routes),
        default_timeout=attempt_timeout(config.timeouts.connect, config.timeouts.read),
        client_limiter=_client_limiter(config.rate_limit, previous, on_store_error, clock),
        max_replay_body=max(pool.retries.max_body for pool in config.pools),
        pool_of=pool_of,
    )
    return runtime, list(old.values())


def _backend(
    config: Config,
    pool: PoolConfig,
    backend_config: BackendConfig,
    source: str,
    old: dict[tuple[str, str], Backend],
    clock: Callable[[], float],
) -> Backend:
    """The pool's Backend for `backend_config`: the running one, reconfigured (taken
    out of `old`), or a new one."""
    existing = old.pop((pool.name, backend_config.url), None)
    if existing is not None:
        existing.reconfigure(backend_config, pool.health_check, pool.circuit_breaker)
        existing.source = source
        return existing
    return Backend(
        backend_config,
        pool_size=config.threads,
        health=pool.health_check,
        breaker=pool.circuit_breaker,
        source=source,
        clock=clock,
    )


def _client_limiter(
    settings: RateLimitConfig,
    previous: Runtime | None,
    on_store_error: Callable[[], None],
    clock: Callable[[], float],
) -> ClientLimiter | None:
    """The per-client limiter for `settings`, reusing the previous one when its settings
    did not change: a reload must not hand every client a fresh, full bucket."""
    if settings.per_client is None:
        return None
    old = previous.config.rate_limit if previous else None
    same = old is not None and (
        (old.per_client, old.burst, old.max_clients, old.store, old.client_key)
        == (settings.per_client, settings.burst, settings.max_clients, settings.store,
            settings.client_key)
    )  # fmt: skip
    client = previous.client_limiter if same and previous else None
    return client or make_client_limiter(settings, on_store_error, clock)


class RuntimeHolder:
    """Holds the current Runtime. Reads are a plain attribute load (atomic in
    CPython); swaps are serialised so a reload and an admin change cannot
    interleave and lose one another."""

    def __init__(
        self,
        runtime: Runtime,
        admin: AdminChanges | None = None,
        on_store_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.runtime = runtime
        self.admin = admin or AdminChanges()
        self.on_store_error = on_store_error  # handed to every rebuilt runtime's limiter
        self.swap_lock = threading.Lock()  # held while building and swapping; no network I/O
