"""One attempt: try one admitted backend once, and tell its breaker how it went.

`try_backend()` returns (response, None) for an answer worth relaying, or a Failure
(with the backend's response when it answered a failure status, so that response
can still reach the client if no retry follows). The response stays owned by the
lease until a relay takes it. Chaos injection happens here, in place of the network
exchange, so an injected failure takes exactly the path of a real one: it is a
deliberate failure of that backend, judged and counted like one.

The verdict (`lease.judge`) is given only for what the backend did. A request that
never reached it (the deadline ran out first, or http.client refused to write the
request) gets none: the lease hands the breaker permit back unjudged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import urllib3

from pyproxy.policy.retry import retry_verdict
from pyproxy.pool import upstream
from pyproxy.pool.backend import Backend
from pyproxy.pool.deadline import DEADLINE_WATCHDOG, DeadlineWatchdog
from pyproxy.pool.errors import Failure, chaos_failure, classify, status_failure
from pyproxy.pool.exchange import UpstreamResponse
from pyproxy.proxy.admission import Admission, BackendLease
from pyproxy.proxy.request import Request
from pyproxy.runtime.pools import Pool
from pyproxy.runtime.snapshot import Runtime, attempt_timeout

log = logging.getLogger(__name__)

# upstream.send's shape:
# (backend, method, target, headers, body, timeout, deadline, watchdog) -> response.
UpstreamSend = Callable[
    [
        Backend,
        str,
        str,
        dict[str, str],
        bytes | IO[bytes] | None,
        urllib3.Timeout,
        float | None,
        DeadlineWatchdog,
    ],
    UpstreamResponse,
]

DEADLINE_EXCEEDED = Failure("deadline_exceeded", "timeout", 504, "total deadline reached")
# The deadline ran out before anything was sent (an injected latency, a backoff, a
# connect cut short by the deadline): the deadline's doing, not the backend's.
DEADLINE_BEFORE_SEND = Failure(
    "deadline_exceeded",
    "timeout",
    504,
    "total deadline reached",
    request_sent=False,
    backend_at_fault=False,
)


@dataclass(frozen=True)
class AttemptContext:
    """What an attempt takes from the world outside the request: the clock, the
    randomness (chaos, backoff jitter), the way to wait, and the exchange with a
    backend. Injected, so a test can run the sequence on its own clock and dice, and
    against backends of its own making."""

    clock: Callable[[], float]
    rng: random.Random
    sleep: Callable[[float], None]
    send: UpstreamSend = upstream.send
    watchdog: DeadlineWatchdog = DEADLINE_WATCHDOG  # timeouts.total; must read `clock` too


def attempt_timeout_for(runtime: Runtime, deadline: float | None, now: float) -> urllib3.Timeout:
    """The per-attempt timeouts, shrunk so the attempt cannot outlive the deadline."""
    timeouts = runtime.config.timeouts
    if deadline is None:
        return runtime.default_timeout
    left = deadline - now
    if timeouts.connect and timeouts.read and left >= max(timeouts.connect, timeouts.read):
        return runtime.default_timeout  # the common case: one shared object, nothing built
    return attempt_timeout(min(timeouts.connect or left, left), min(timeouts.read or left, left))


def try_backend(
    context: AttemptContext,
    runtime: Runtime,
    lease: BackendLease,
    request: Request,
    headers: dict[str, str],
    deadline: float | None,
    pool: Pool | None = None,
    target: str | None = None,
) -> tuple[UpstreamResponse | None, Failure | None]:
    """Send `request` to the lease's backend once, as `target` (default: as the client
    sent it; a route's strip_prefix rewrites it). `pool`'s settings (default: the
    runtime's default pool) say which statuses are failures and which are retried."""
    config = runtime.config
    settings = (pool or runtime.default_pool).config
    target = request.target if target is None else target
    chaos = config.chaos
    backend = lease.backend
    if chaos.latency and context.rng.random() < chaos.latency_rate:
        left = None if deadline is None else deadline - context.clock()
        context.sleep(chaos.latency if left is None else max(0.0, min(chaos.latency, left)))
        if deadline is not None and context.clock() >= deadline:
            return None, DEADLINE_BEFORE_SEND
    if chaos.error_rate and context.rng.random() < chaos.error_rate:
        # What a backend answering error_status would cause: same breaker, same retries.
        lease.judge(failed=chaos.error_status in settings.circuit_breaker.failure_statuses)
        return None, chaos_failure(chaos.error_status)
    now = context.clock()
    if deadline is not None and deadline <= now:
        return None, DEADLINE_BEFORE_SEND
    timeout = attempt_timeout_for(runtime, deadline, now)
    if not config.preserve_host:
        headers["Host"] = backend.netloc
    try:
        lease.response = context.send(
            backend, request.method, target, headers, request.body, timeout, deadline,
            context.watchdog,
        )  # fmt: skip
    except Exception as exc:
        failure = classify(exc)
        if not failure.backend_at_fault:
            return None, failure  # never reached the backend: no verdict
        if deadline is not None and context.clock() >= deadline:
            if not failure.request_sent:
                return None, DEADLINE_BEFORE_SEND  # a connect cut short by the deadline
            failure = DEADLINE_EXCEEDED
        lease.judge(failed=True)
        return None, failure
    response = lease.response
    broken = upstream.check(response)
    if broken is not None:
        lease.response = None  # check() discarded it
        lease.judge(failed=True)
        return None, broken
    status = response.status
    failed = status in settings.circuit_breaker.failure_statuses
    lease.judge(failed=failed)
    if failed or status in settings.retries.retry_on:
        return response, status_failure(status)
    return response, None


def why_not_retry(
    pool: Pool,
    request: Request,
    attempts: int,
    failure: Failure,
    seconds_left: float | None,
    admission: Admission,
) -> str | None:
    """None to retry after `failure` (attempt number `attempts`); else the reason not
    to (kept for the access log). The pool's retry settings decide."""
    settings = pool.config.retries
    why_not = retry_verdict(
        failure,
        method=request.method,
        retries_done=attempts - 1,
        settings=settings,
        # Buffered up to any pool's max_body; replayed only up to this pool's.
        body_replayable=request.replayable and (request.body_length or 0) <= settings.max_body,
        seconds_left=seconds_left,
    )
    if why_not is None and not pool.candidates():
        why_not = "no backend available for a retry"
    # The budget stops retries multiplying the load on failing backends. A retry
    # after a connect error adds none (nothing was sent), so it needs no token.
    if (
        why_not is None
        and failure.request_sent
        and not admission.take_retry_token(settings.budget_percent)
    ):
        why_not = "retry budget spent"
    return why_not
