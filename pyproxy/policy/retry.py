"""Retries: whether a failed attempt may be tried again, and a budget that keeps
retries from multiplying the load on a pool that is already failing.

`retry_verdict()` is the decision table of docs/retries.md as one pure function; it
returns None ("retry") or the reason not to, so logs and the explain header can say
why. The budget is asked by the proxy only for a retry of a request that was sent
(a retry after a connect error adds no load anywhere, see `proxy.attempt.why_not_retry`).
"""

from __future__ import annotations

import threading

from pyproxy.config.schema import RetryConfig
from pyproxy.headers import IDEMPOTENT_METHODS
from pyproxy.pool.errors import Failure

MIN_RETRY_BUDGET = 3  # retries allowed in flight even when little else is (Envoy's floor)


def retry_verdict(
    failure: Failure,
    *,
    method: str,
    retries_done: int,
    settings: RetryConfig,
    body_replayable: bool,
    seconds_left: float | None,
) -> str | None:
    """None if the failed attempt may be retried, else why not.

    `seconds_left` None means no total deadline. The budget and "is there another
    backend" are checked by the caller, which knows the pool.
    """
    if retries_done >= settings.max_retries:
        return "no retries left"
    if failure.condition not in settings.retry_on:
        return f"{failure.condition} is not in retry_on"
    if failure.request_sent and settings.idempotent_only and method not in IDEMPOTENT_METHODS:
        # The backend may have acted on it: a POST must never be sent twice.
        return f"{method} is not idempotent"
    if not body_replayable:
        return "request body too large to replay"
    if seconds_left is not None and seconds_left <= 0:
        return "total deadline reached"
    return None


class RetryBudget:
    """Caps retries in flight at `percent` of requests in flight (at least 3).

    Without it, a pool where every backend fails turns each request into
    1 + max_retries requests exactly when the backends can least afford it
    (the "retry storm"; Envoy and Finagle use the same budget idea).

    `requests_in_flight` is *the* count of requests in flight: a request is in it
    from its admission.Admission to that Admission's close() (the end of its
    response body), and the same number is the `proxy_in_flight_requests` gauge
    and what a graceful drain waits for. `retries_in_flight` counts requests
    holding a retry token: from their first retry of a sent request to their last
    attempt (not to the end of their body).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the two counts; never held across I/O
        self.requests_in_flight = 0
        self.retries_in_flight = 0

    def request_started(self) -> None:
        with self._lock:
            self.requests_in_flight += 1

    def request_finished(self) -> None:
        with self._lock:
            self.requests_in_flight -= 1

    def try_start_retry(self, percent: float) -> bool:
        with self._lock:
            allowed = max(MIN_RETRY_BUDGET, int(self.requests_in_flight * percent / 100))
            if self.retries_in_flight >= allowed:
                return False
            self.retries_in_flight += 1
            return True

    def retry_finished(self) -> None:
        with self._lock:
            self.retries_in_flight -= 1
