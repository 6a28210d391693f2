"""Pools at run time: each pool's backends, balancing, stickiness and rate buckets.

A pool is a named group of backends with its own settings (strategy, health check,
circuit breaker, retries, sticky rule, per-backend rate), already merged over the
top-level sections when the file was loaded. Routes send a request to one pool, and
everything after that (selection, retries, breaker verdicts) stays inside it.

`backup: true` backends are a pool's reserve, as nginx's and HAProxy's `backup`
servers: they take requests only while no other backend of their pool is available,
and the pool hands back to the others as soon as one is available again.

`why_unavailable()` here is the one judge of availability; everything else keeps facts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from pyproxy.config.schema import PoolConfig
from pyproxy.policy.ratelimit import BackendLimiter
from pyproxy.policy.selection import Selector, make_selector
from pyproxy.policy.sticky import Sticky
from pyproxy.pool.backend import Backend

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
class Pool:
    """One pool of the running snapshot. `backends` is in file order, admin-added last."""

    config: PoolConfig
    backends: tuple[Backend, ...]
    selector: Selector
    sticky: Sticky
    backend_limiter: BackendLimiter | None = None  # None: no per-backend limit

    @property
    def name(self) -> str:
        return self.config.name

    def why_unavailable(self, backend: Backend, *, rate_bucket: bool = True) -> str | None:
        """The one judge, with this pool's rate buckets (`rate_bucket=False`: all but
        the bucket, for the 503's Retry-After)."""
        return why_unavailable(backend, self.backend_limiter if rate_bucket else None)

    def candidates(self, exclude: Collection[Backend] = ()) -> list[Backend]:
        """The backends that may take a new request now, not in `exclude`.

        The non-backup ones while any of them is available (tried or not: a retry
        goes to a tried primary again before it wakes a backup, as HAProxy does);
        else the backups. Only backups that are themselves available count.
        """
        limiter = self.backend_limiter
        primaries = [
            b for b in self.backends if not b.config.backup and why_unavailable(b, limiter) is None
        ]
        if primaries:
            return [b for b in primaries if b not in exclude]
        return [
            b
            for b in self.backends
            if b.config.backup and b not in exclude and why_unavailable(b, limiter) is None
        ]


def build_pool(
    config: PoolConfig,
    backends: tuple[Backend, ...],
    previous: Pool | None,
    clock: Callable[[], float],
) -> Pool:
    """A Pool for `config`, keeping the previous one's rotation and rate buckets when
    their settings did not change: a reload must not reset the round-robin position
    nor hand every backend a fresh, full bucket."""
    same_strategy = previous is not None and previous.config.strategy == config.strategy
    selector = previous.selector if previous and same_strategy else make_selector(config.strategy)
    limiter: BackendLimiter | None = None
    rate = config.per_backend_rate
    if rate is not None:
        same_rate = previous is not None and previous.config.per_backend_rate == rate
        limiter = previous.backend_limiter if previous and same_rate else None
        limiter = limiter or BackendLimiter(rate, clock=clock)
    return Pool(
        config=config,
        backends=backends,
        selector=selector,
        sticky=Sticky(config.sticky),
        backend_limiter=limiter,
    )
