"""Runtime: one immutable snapshot of everything a request needs.

A request reads `holder.runtime` once and uses that snapshot to the end, so a reload
or an admin change never shows it half a configuration. Building a new snapshot
reuses the previous one's Backend objects (matched by URL): their health, circuit
and in-flight counts are state that must survive a reload (nginx and HAProxy keep
a server's health and counters across a reload too).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

import urllib3

from pyproxy.config.schema import BackendConfig, Config, RateLimitConfig
from pyproxy.policy.ratelimit import BackendLimiter, ClientLimiter
from pyproxy.policy.ratelimit_store import make_client_limiter
from pyproxy.policy.selection import Selector, make_selector
from pyproxy.policy.sticky import Sticky
from pyproxy.pool.backend import Backend
from pyproxy.pool.urlguard import url_identity


def attempt_timeout(connect: float, read: float) -> urllib3.Timeout:
    """urllib3 timeouts from config seconds, where 0 means no limit."""
    return urllib3.Timeout(connect=connect or None, read=read or None)


RATE_BUCKET_EMPTY = "per-backend rate bucket empty"
DRAINED = "drained (admin)"


def why_unavailable(backend: Backend, limiter: BackendLimiter | None = None) -> str | None:
    """Why `backend` may not take a new request now, or None if it may.

    The one judge of availability; everything else keeps facts. A backend is
    available when it is still in the running set, the admin has not drained it,
    its health is up (when checked), its circuit admits a request, its (effective)
    weight is above 0, it is under its max_connections, and (with a per-backend
    limit) its rate bucket has a token.
    Reads without locks (plain attribute loads, a closed circuit without the clock):
    selection calls it for every backend on every request.
    """
    if backend.removed:
        return "removed"
    if backend.drained:  # before health: the admin's decision is the reason to show
        return DRAINED
    if backend.health_checked and not backend.health.up:
        return f"health {backend.health.state}"
    if not backend.breaker.allows_request():
        return f"circuit {backend.breaker.state.value}"
    config, admin_weight = backend.config, backend.admin_weight
    # Backend.weight, read inline: a property call here costs ~35 ns per backend judged.
    if (config.weight if admin_weight is None else admin_weight) <= 0:
        return "weight 0 (draining)" if admin_weight is None else "weight 0 (admin)"
    cap = config.max_connections
    if cap and backend.in_flight >= cap:
        return f"at max_connections ({cap})"
    if limiter is not None and not limiter.has_token(backend.name):
        return RATE_BUCKET_EMPTY
    return None


@dataclass(frozen=True)
class Runtime:
    config: Config
    backends: tuple[Backend, ...]
    selector: Selector
    sticky: Sticky
    default_timeout: urllib3.Timeout  # built once: most attempts are not near the deadline
    client_limiter: ClientLimiter | None = None  # None: no per-client limit
    backend_limiter: BackendLimiter | None = None  # None: no per-backend limit

    def why_unavailable(self, backend: Backend, *, rate_bucket: bool = True) -> str | None:
        """Why `backend` may not take a new request now, or None if it may: the one
        judge (`why_unavailable` below, with this runtime's rate buckets). Selection,
        the explain header, /admin/backends, the status page and /readyz all ask it.
        `rate_bucket=False` judges everything but the bucket (the 503's Retry-After
        asks which backends wait only for a token)."""
        return why_unavailable(backend, self.backend_limiter if rate_bucket else None)

    def candidates(self, exclude: Collection[Backend] = ()) -> list[Backend]:
        """The backends that may take a new request now."""
        limiter = self.backend_limiter
        return [
            b for b in self.backends if b not in exclude and why_unavailable(b, limiter) is None
        ]

    def find(self, name: str | None = None, url: str | None = None) -> Backend | None:
        """The backend with this name, or at this URL (http://h and http://h:80 are one)."""
        identity = url_identity(url) if url else None
        for backend in self.backends:
            if backend.name == name or (identity and url_identity(backend.url) == identity):
                return backend
        return None


@dataclass(frozen=True)
class BackendOverride:
    """What POST /admin/set-backend set on one backend (HAProxy's `set server ...
    weight` and `set server ... state drain`): a weight that wins over the configured
    one until cleared (None: the configured weight), and drain."""

    weight: int | None = None
    drain: bool = False

    def is_empty(self) -> bool:
        return self.weight is None and not self.drain

    def describe(self) -> str:
        weight = "configured weight" if self.weight is None else f"weight {self.weight}"
        return f"{weight}, {'drained' if self.drain else 'not drained'}"


NO_OVERRIDE = BackendOverride()


@dataclass(frozen=True)
class AdminChanges:
    """Backends changed through the admin API; they outlive reloads: a reload applies
    the file, and the admin's additions, removals and overrides on top of it.

    `overrides` is keyed by URL, the identity a Backend keeps across reloads; an
    override lasts as long as its backend is in the running set."""

    added: tuple[BackendConfig, ...] = ()
    removed_urls: frozenset[str] = frozenset()
    overrides: Mapping[str, BackendOverride] = field(default_factory=dict)

    def overrides_only_for(self, urls: Collection[str]) -> AdminChanges:
        """These changes without the overrides of backends not in `urls`."""
        kept = {url: o for url, o in self.overrides.items() if url in urls}
        return self if len(kept) == len(self.overrides) else replace(self, overrides=kept)

    def removed_from(self, config: Config) -> list[tuple[BackendConfig, str]]:
        """The file's backends the admin removed, each with the name of its pool."""
        return [
            (backend, pool.name)
            for pool in config.pools
            for backend in pool.backends
            if backend.url in self.removed_urls
        ]

    def desired(self, config: Config) -> list[tuple[BackendConfig, str]]:
        """The running set: the file's backends, minus admin-removed, plus admin-added."""
        added_urls = {b.url for b in self.added}
        wanted = [
            (b, "config")
            for b in config.backends
            if b.url not in self.removed_urls and b.url not in added_urls
        ]
        return wanted + [(b, "admin") for b in self.added]


def build_runtime(
    config: Config,
    previous: Runtime | None = None,
    admin: AdminChanges | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_store_error: Callable[[], None] = lambda: None,
) -> tuple[Runtime, list[Backend]]:
    """A new snapshot for `config`, and the Backends of `previous` that are gone.

    Callers mark the gone ones removed and close them once idle; requests holding
    the previous snapshot keep using them until they finish.
    """
    admin = admin or AdminChanges()
    old = {b.url: b for b in previous.backends} if previous else {}
    backends: list[Backend] = []
    for backend_config, source in admin.desired(config):
        existing = old.pop(backend_config.url, None)
        if existing is not None:
            existing.reconfigure(backend_config, config.health_check, config.circuit_breaker)
            existing.source = source
            backends.append(existing)
        else:
            backends.append(
                Backend(
                    backend_config,
                    pool_size=config.threads,
                    health=config.health_check,
                    breaker=config.circuit_breaker,
                    source=source,
                    clock=clock,
                )
            )
    keep_selector = previous is not None and previous.config.strategy == config.strategy
    selector = previous.selector if previous and keep_selector else make_selector(config.strategy)
    client_limiter, backend_limiter = _limiters(config.rate_limit, previous, on_store_error, clock)
    apply_overrides(backends, admin)
    runtime = Runtime(
        config=config,
        client_limiter=client_limiter,
        backend_limiter=backend_limiter,
        backends=tuple(backends),
        selector=selector,
        sticky=Sticky(config.sticky),
        default_timeout=attempt_timeout(config.timeouts.connect, config.timeouts.read),
    )
    return runtime, list(old.values())


def apply_overrides(backends: Iterable[Backend], admin: AdminChanges) -> None:
    """Set (or clear) on each backend what the admin set through set-backend: the one
    place overrides reach the Backends, after every build. Two plain attribute stores
    per backend, so a request reading them never sees a torn value."""
    for backend in backends:
        override = admin.overrides.get(backend.url, NO_OVERRIDE)
        backend.admin_weight = override.weight
        backend.drained = override.drain


def _limiters(
    settings: RateLimitConfig,
    previous: Runtime | None,
    on_store_error: Callable[[], None],
    clock: Callable[[], float],
) -> tuple[ClientLimiter | None, BackendLimiter | None]:
    """Rate limiters for `settings`, reusing the previous ones when their settings did
    not change: a reload must not hand every client a fresh, full bucket."""
    old = previous.config.rate_limit if previous else None
    client: ClientLimiter | None = None
    if settings.per_client is not None:
        same = old is not None and (
            (old.per_client, old.burst, old.max_clients, old.store, old.client_key)
            == (settings.per_client, settings.burst, settings.max_clients, settings.store,
                settings.client_key)
        )  # fmt: skip
        client = previous.client_limiter if same and previous else None
        client = client or make_client_limiter(settings, on_store_error, clock)
    backend: BackendLimiter | None = None
    if settings.per_backend is not None:
        same = old is not None and old.per_backend == settings.per_backend
        backend = previous.backend_limiter if same and previous else None
        backend = backend or BackendLimiter(settings.per_backend, clock=clock)
    return client, backend


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
