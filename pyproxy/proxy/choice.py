"""Choosing the backend for one attempt: the sticky rule, the strategy, admission.

The first attempt goes where the sticky rule pins it, else where the configured
strategy says. A retry picks at random among the backends not yet tried (Envoy's
`previous_hosts` retry predicate, HAProxy's `option redispatch`). The chosen backend
must then be admitted (its cap, its breaker, its rate bucket), or the choice is made
again among what is left.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pyproxy.policy.selection import Random as RandomSelector
from pyproxy.pool.backend import Backend
from pyproxy.proxy.admission import Admission, BackendLease
from pyproxy.proxy.request import Outcome, Request
from pyproxy.runtime.pools import Pool


class BackendChoice:
    """Chooses and admits the backend of each attempt; `rng` picks retries, `clock`
    times the choice for an explanation."""

    def __init__(self, rng: random.Random, clock: Callable[[], float]) -> None:
        self.retry_selector = RandomSelector(rng)
        self.clock = clock

    def lease(
        self,
        pool: Pool,
        request: Request,
        outcome: Outcome,
        tried: list[Backend],
        admission: Admission,
    ) -> BackendLease | None:
        """A lease on an available backend of `pool`, one not yet tried when there is
        one; the sticky rule first, the strategy otherwise; admitted by cap, breaker,
        bucket. Backups only while no other backend of the pool is available."""
        sticky = pool.sticky
        refused: list[Backend] = []  # lost a race for their last slot, permit or token
        for _ in range(3):  # another thread may take the last slot between look and admit
            candidates = pool.candidates(exclude=[*tried, *refused])
            if not candidates and tried:  # every backend was tried: one may take a retry
                candidates = pool.candidates(exclude=refused)
            backend = sticky.pinned(candidates, request.cookie, request.client)
            pinned = backend is not None
            if backend is None:
                # A retry picks at random among the rest: running it through the strategy
                # would advance a shared rotation, and with [dead, good] every request
                # would then start on the dead one.
                selector = pool.selector if not tried else self.retry_selector
                backend = selector.choose(candidates)
                if backend is None:
                    return None
                if sticky.mode == "cookie":
                    outcome.set_cookie = sticky.set_cookie(backend)
            elif sticky.mode == "cookie":
                outcome.set_cookie = None  # the client's cookie already names this one
            lease = admission.admit(backend, pool.backend_limiter, pool.name)
            if lease is None:
                refused.append(backend)  # the next look goes to another one
                continue
            if outcome.explanation is not None:
                if pinned:
                    rule = f"sticky {sticky.mode}"
                else:
                    rule = "retry (random among untried)" if tried else pool.config.strategy
                outcome.explanation.chose(pool, backend, rule, tried, self.clock())
            return lease
        return None
