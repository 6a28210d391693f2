"""ProxyApp: the WSGI app on the proxy listener. admit -> select -> forward -> stream.

Each request reads the runtime snapshot once, then tries backends until one gives
an answer worth relaying or the retry rules say stop. The judgement lives in small
modules (request, headers, choice, attempt, errors, retry, upstream, stream); this
file is the sequence, so it reads top to bottom as "what happens to a request".
What the client sent is a frozen `Request`; what becomes of it is written into its
`Outcome`, which the access log reads at the end.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from pyproxy.observe.accesslog import AccessLog
from pyproxy.observe.metrics import Metrics
from pyproxy.policy.retry import RetryBudget
from pyproxy.policy.routes import request_host
from pyproxy.pool import upstream
from pyproxy.pool.backend import Backend
from pyproxy.pool.errors import Failure
from pyproxy.proxy.admission import Admission
from pyproxy.proxy.answers import OwnAnswers
from pyproxy.proxy.attempt import AttemptContext, UpstreamSend, try_backend, why_not_retry
from pyproxy.proxy.choice import BackendChoice
from pyproxy.proxy.explain import REQUEST_HEADER, Explanation, wants_explanation
from pyproxy.proxy.request import ALLOWED_METHODS, Outcome, Request, edge_refusal_record
from pyproxy.proxy.stream import Relay, ResponseStream
from pyproxy.runtime.pools import Pool
from pyproxy.runtime.snapshot import Runtime, RuntimeHolder
from pyproxy.wsgi import EdgeRefusal, StartResponse

log = logging.getLogger(__name__)

class ProxyApp:
    """The proxy's WSGI application. `instance_name` goes into Via (loop detection).

    `clock`, `rng`, `sleep` and `send` (one exchange with a backend) are the world
    outside the request; tests inject their own to run the sequence without waiting
    or a network."""

    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        *,
        instance_name: str,
        access_log: AccessLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        send: UpstreamSend = upstream.send,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.instance_name = instance_name
        self.access_log = access_log
        self.clock = clock
        self.context = AttemptContext(clock, rng or random.Random(), sleep, send)
        self.budget = RetryBudget()
        self.own_answers = OwnAnswers(metrics, clock)
        self.choice = BackendChoice(self.context.rng, clock)
        self.relay = Relay(metrics, self.own_answers, instance_name, clock, on_close=self._log)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        runtime = self.holder.runtime  # read once: a reload must not change it mid-request
        config = runtime.config
        request, headers = Request.from_environ(
            environ,
            max_replay_body=runtime.max_replay_body,
            started=self.clock(),
            trusted=config.trusted_proxies,
            instance_name=self.instance_name,
        )
        outcome = Outcome()
        refusal = request.refusal(self.instance_name)
        if refusal is not None:
            extra = [("Allow", ALLOWED_METHODS)] if refusal[0] == 405 else []
            answer = self.own_answers.answer(request, outcome, start_response, *refusal, extra)
            return self._log(request, outcome, answer)
        route = runtime.routes.match(request.host, request.target)
        if route is None:
            return self._log(request, outcome, self._no_route(request, outcome, start_response))
        pool = runtime.pools[route.pool]  # a validated config routes only to its pools
        outcome.pool_name = pool.name
        self.metrics.count_route(route.name, pool.name)
        if wants_explanation(environ.get(REQUEST_HEADER), request.client, config.trusted_proxies):
            named = bool(config.declared_pools)  # a v1 file: one pool, nothing to name
            outcome.explanation = Explanation(route, pool, name_route=named)
        headers.pop("X-Pyproxy-Explain", None)  # a question for pyproxy, not the backend
        if runtime.client_limiter is not None:
            limited = self.own_answers.over_client_limit(runtime, request, outcome, start_response)
            if limited is not None:
                return self._log(request, outcome, limited)
        # From here the request holds things (its place in flight, a backend's slot,
        # a breaker permit, a retry token), all owned by `admission`. Its close() gives
        # them back: here when pyproxy answers itself or something raised, else in
        # ResponseStream.close(), which the server calls however the relay ends.
        admission = Admission(self.budget, self.metrics)
        handed_over = False
        try:
            target = route.upstream_path(request.target)
            result = self._attempts(
                runtime, pool, target, request, outcome, headers, start_response, admission
            )
            handed_over = isinstance(result, ResponseStream)
            return result
        finally:
            if not handed_over:
                admission.close()
                self._log(request, outcome)

    @property
    def requests_in_flight(self) -> int:
        """Requests in this app: admitted and not yet closed, a response body still
        being relayed included. Not `Backend.in_flight` (requests holding one
        backend's slot), nor the edge's busy connections (which also count responses
        the app is done with but the client has not read yet)."""
        return self.budget.requests_in_flight

    def record_refusal(self, refusal: EdgeRefusal) -> None:
        """A request the edge parser refused (400, 413, 431, ...): counted and logged
        like any other, though no app code ran for it."""
        now = self.clock()
        self.metrics.observe_request("", refusal.method, refusal.status, 0.0)
        if self.access_log is not None:
            self.access_log.write(*edge_refusal_record(refusal, now), now)

    def _log(
        self, request: Request, outcome: Outcome, result: Iterable[bytes] | None = None
    ) -> Iterable[bytes]:
        if self.access_log is not None:
            self.access_log.write(request, outcome, self.clock())
        return result or ()

    # -- the attempt loop ------------------------------------------------------

    def _no_route(
        self, request: Request, outcome: Outcome, start_response: StartResponse
    ) -> Iterable[bytes]:
        """404: no route takes this host and path (nginx answers a request no server
        block takes from its default server; pyproxy has no default to fall back on)."""
        self.metrics.count_error("", "no_route")
        path = request.target.partition("?")[0]
        why = f"no route for {request_host(request.host)}{path}"
        return self.own_answers.answer(request, outcome, start_response, 404, why)

    def _attempts(
        self,
        runtime: Runtime,
        pool: Pool,
        target: str,
        request: Request,
        outcome: Outcome,
        headers: dict[str, str],
        start_response: StartResponse,
        admission: Admission,
    ) -> Iterable[bytes]:
        """Try `pool`'s backends (sending `target`) until one answers or the retry rules
        of the pool say stop. Retries stay inside the pool."""
        config = runtime.config
        deadline = request.started + config.timeouts.total if config.timeouts.total else None
        tried: list[Backend] = []
        while True:
            lease = self.choice.lease(pool, request, outcome, tried, admission)
            if lease is None and self.holder.runtime is not runtime:
                # A reload or an admin change replaced this snapshot's backends while the
                # request waited: it goes where the new snapshot routes it (a reload may
                # have moved its route and dropped this pool with its backends).
                runtime = self.holder.runtime
                pool, target = self._rerouted(runtime, request, outcome, pool, target)
                lease = self.choice.lease(pool, request, outcome, tried, admission)
            if lease is None:
                if outcome.explanation is not None:
                    outcome.explanation.none_available(pool, tried, self.clock())
                return self.own_answers.no_backend(pool, request, outcome, start_response)
            backend = lease.backend
            tried.append(backend)
            outcome.attempts += 1
            outcome.backend_name = backend.name
            attempt_started = self.clock()
            response, failure = try_backend(
                self.context, runtime, lease, request, headers, deadline, pool, target
            )
            outcome.upstream_seconds = self.clock() - attempt_started
            if failure is None:
                return self.relay.start(request, outcome, start_response, admission)
            if not failure.backend_at_fault:
                admission.end_attempt()
                return self._not_sent(request, outcome, start_response, failure)
            self.metrics.count_error(backend.name, failure.reason, pool.name)
            left = None if deadline is None else deadline - self.clock()
            why_not = why_not_retry(pool, request, outcome.attempts, failure, left, admission)
            if outcome.explanation is not None:
                verdict = "retry" if why_not is None else f"no retry: {why_not}"
                outcome.explanation.outcome(f"{failure.status} {failure.detail}, {verdict}")
            if why_not is not None:
                outcome.detail = why_not
                if response is not None:  # a backend's own answer beats one pyproxy makes up
                    return self.relay.start(request, outcome, start_response, admission)
                admission.end_attempt()
                answer = self.own_answers.failed(request, outcome, start_response, failure)
                outcome.detail = f"{failure.detail}; no retry: {why_not}"  # for the access log
                return answer
            self.metrics.count_retry(backend.name, pool.name)
            admission.end_attempt()  # discards the failed response, if any
            backoff = pool.config.retries.backoff
            if backoff:
                pause = backoff * self.context.rng.uniform(0.5, 1.5)
                left = math.inf if deadline is None else deadline - self.clock()
                self.context.sleep(max(0.0, min(pause, left)))

    def _rerouted(
        self, runtime: Runtime, request: Request, outcome: Outcome, pool: Pool, target: str
    ) -> tuple[Pool, str]:
        """The pool and upstream target the new snapshot `runtime` gives the request;
        the old ones (and so their 503) when no route of it takes the request. A route
        that now sends it to another pool counts it too: that pool's backends see it."""
        route = runtime.routes.match(request.host, request.target)
        if route is None:
            return pool, target
        if route.pool != pool.name:
            self.metrics.count_route(route.name, route.pool)
        outcome.pool_name = route.pool
        return runtime.pools[route.pool], route.upstream_path(request.target)

    def _not_sent(
        self,
        request: Request,
        outcome: Outcome,
        start_response: StartResponse,
        failure: Failure,
    ) -> Iterable[bytes]:
        """The attempt never reached the backend, through no fault of the backend's (the
        request cannot be written as HTTP/1.1, or the deadline ran out first): no
        verdict, no count against it, no retry (another backend would fare no better)."""
        if failure.reason == "deadline_exceeded":  # the error is still the attempt's
            self.metrics.count_error(outcome.backend_name, failure.reason, outcome.pool_name)
        else:
            outcome.backend_name = ""  # no backend saw it
            if failure.status >= 500:  # pyproxy could not build its own request: a bug
                log.error("request %s not forwarded: %s", request.request_id, failure.detail)
        return self.own_answers.failed(request, outcome, start_response, failure)

