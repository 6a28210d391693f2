"""Admission: what one client request holds, and the one place that gives it back.

On its way to a backend a request takes, in order:

- a place among the requests in the app (`RetryBudget.requests_in_flight`,
  `ProxyApp.requests_in_flight`): the denominator of the retry budget, the
  `proxy_in_flight_requests` gauge, and what a graceful drain waits for. One count,
  three readers;
- for each attempt, a `BackendLease` on the chosen backend: one of its slots
  (`Backend.in_flight` counts the requests holding one: what `max_connections`
  caps, `least_connections` reads and `proxy_backend_in_flight` shows), a circuit
  breaker permit (in half-open, one of the few trial slots) and a per-backend rate
  token;
- at its first retry *after a request was sent*, a retry token from the budget.

Each must be given back exactly once, on every path, exceptions included. Giving
them back by hand on each branch of the request path is how a slot leaks: one
branch that raises, and a backend with `max_connections: 2` is out of service after
two such requests, until a restart. So one object owns them, and `close()` gives
back whatever is still held, once (the idea of werkzeug's `ClosingIterator`). The
proxy closes the Admission when it answers itself; when it relays a backend's
response, `ResponseStream.close()` does, and PEP 3333 obliges the server to call
that whatever happens to the response.

The rate token is the one thing not given back: it is spent at admission, like a
token of any token bucket, whatever the attempt's outcome. The per-backend limit
caps how often pyproxy admits requests to a backend.

No lock here: an Admission belongs to the one worker thread serving its request.
The counters it gives back to have their own locks, held for an increment.
"""

from __future__ import annotations

import logging

from pyproxy.observe.metrics import Metrics
from pyproxy.policy.ratelimit import BackendLimiter
from pyproxy.policy.retry import RetryBudget
from pyproxy.pool import upstream
from pyproxy.pool.backend import Backend
from pyproxy.pool.breaker import CircuitState, Permit
from pyproxy.pool.exchange import UpstreamResponse

log = logging.getLogger(__name__)


class BackendLease:
    """One attempt's hold on one backend: its slot, its breaker permit, and the
    upstream response until a relay takes it. Made by `Admission.admit()`."""

    __slots__ = ("_holds_slot", "backend", "failed", "metrics", "permit", "pool", "response")

    def __init__(self, backend: Backend, metrics: Metrics, pool: str = "") -> None:
        self.backend = backend
        self.pool = pool  # the backend's pool, for its metric labels
        self.metrics = metrics
        self.permit: Permit | None = None  # until the breaker has its verdict
        self.response: UpstreamResponse | None = None  # discarded on close if still here
        self.failed = False  # judged a failure: counted in the backend's failures_total
        self._holds_slot = False

    def _acquire(self, limiter: BackendLimiter | None) -> bool:
        """Take the slot, the permit, the rate token, in that order; False at the first
        refusal. What was taken before it stays held, for `close()` to give back."""
        backend = self.backend
        if not backend.try_acquire():
            return False
        self._holds_slot = True
        self.permit = backend.breaker.try_acquire()
        if self.permit is None:
            return False
        return limiter is None or limiter.take(backend.name)

    def judge(self, *, failed: bool) -> None:
        """Tell the breaker how the attempt went; log and count only a real transition.

        Called once the backend's answer is known, and again (without the permit,
        now spent) if the backend then dies mid-body. An attempt that never reached
        the backend gets no verdict: `close()` hands the permit back unjudged.
        """
        backend, breaker = self.backend, self.backend.breaker
        self.failed = self.failed or failed
        record = breaker.record_failure if failed else breaker.record_success
        changed = record(self.permit)
        self.permit = None  # spent: recorded (cleared only once the call returned)
        if not changed:
            return
        state = breaker.state
        if state is CircuitState.OPEN:
            log.warning(
                "backend %s: circuit open after %d consecutive failures",
                backend.name, breaker.consecutive_failures,
            )  # fmt: skip
            self.metrics.count_circuit_open(backend.name, self.pool)
        else:
            log.info("backend %s: circuit %s", backend.name, state.value)

    def take_response(self) -> UpstreamResponse:
        """Hand the upstream response to its relay, which now closes it."""
        response, self.response = self.response, None
        assert response is not None
        return response

    def close(self) -> None:
        """Give back what is still held: the response's connection (discarded, its
        bytes belong to nobody), the permit (unjudged), the slot. Idempotent."""
        response, self.response = self.response, None
        permit, self.permit = self.permit, None
        holds_slot, self._holds_slot = self._holds_slot, False
        try:
            if response is not None:
                upstream.discard(response)
        finally:
            try:
                if permit is not None:
                    self.backend.breaker.release(permit)
            finally:
                if holds_slot:
                    self.backend.release(failed=self.failed)


class Admission:
    """Everything one client request holds; `close()` gives it all back, once.

    Creating one counts the request among the requests in the app
    (`budget.request_started()`); closing it ends the count. At most one
    BackendLease is held at a time (`lease`).
    """

    __slots__ = ("_budget", "_closed", "_holds_retry_token", "lease", "metrics")

    def __init__(self, budget: RetryBudget, metrics: Metrics) -> None:
        self._budget = budget
        self.metrics = metrics
        self.lease: BackendLease | None = None
        self._holds_retry_token = False
        self._closed = False
        budget.request_started()

    def admit(
        self, backend: Backend, limiter: BackendLimiter | None, pool: str = ""
    ) -> BackendLease | None:
        """Take `backend` (of `pool`) for the next attempt, or None (holding nothing of
        it) if it is at max_connections, its circuit refuses, or its bucket is empty."""
        self.end_attempt()
        lease = self.lease = BackendLease(backend, self.metrics, pool)
        if lease._acquire(limiter):
            return lease
        self.end_attempt()
        return None

    def end_attempt(self) -> None:
        """The current attempt is over: give back its lease (nothing if none)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.close()

    def take_retry_token(self, percent: float) -> bool:
        """A token for this request's retries (one for all of them), or False if the
        budget is spent. Kept until `end_retries()`."""
        if not self._holds_retry_token:
            self._holds_retry_token = self._budget.try_start_retry(percent)
        return self._holds_retry_token

    def end_retries(self) -> None:
        """No more attempts: the retry token goes back. The budget caps retries being
        attempted; a retried request now streaming a long body must not hold one."""
        if self._holds_retry_token:
            self._holds_retry_token = False
            self._budget.retry_finished()

    def close(self) -> None:
        """Give back everything still held; the request is no longer in the app."""
        if self._closed:
            return
        self._closed = True
        try:
            self.end_attempt()
        finally:
            try:
                self.end_retries()
            finally:
                self._budget.request_finished()
