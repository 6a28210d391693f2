"""ProxyApp: the WSGI app on the proxy listener. admit -> select -> forward -> stream.

Each request reads the runtime snapshot once, then tries backends until one gives
an answer worth relaying or the retry rules say stop. All the judgement lives in
small modules (request, headers, selection, errors, retry, upstream); this file is
the sequence, so it can be read top to bottom as "what happens to a request".
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import urllib3

from pyproxy import upstream
from pyproxy.accesslog import AccessLog
from pyproxy.backend import Backend
from pyproxy.breaker import Permit
from pyproxy.errors import (
    REASONS,
    Failure,
    chaos_failure,
    classify,
    error_body,
    status_failure,
)
from pyproxy.headers import downstream_response_headers, upstream_request_headers
from pyproxy.inbound import AbortResponse
from pyproxy.metrics import Metrics
from pyproxy.request import ALLOWED_METHODS, Inbound
from pyproxy.retry import RetryBudget, retry_verdict
from pyproxy.runtime import Runtime, RuntimeHolder, attempt_timeout

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class ProxyApp:
    """The proxy's WSGI application. `instance_name` goes into Via (loop detection)."""

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
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.instance_name = instance_name
        self.access_log = access_log
        self.clock = clock
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.budget = RetryBudget()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        runtime = self.holder.runtime  # read once: a reload must not change it mid-request
        config = runtime.config
        request = Inbound.from_environ(environ, config.retries.max_body, self.clock())
        refusal = request.refusal(self.instance_name)
        if refusal is not None:
            extra = [("Allow", ALLOWED_METHODS)] if refusal[0] == 405 else []
            return self._answer(request, start_response, *refusal, extra)
        headers, request.client = upstream_request_headers(
            request.headers,
            peer=request.peer,
            scheme=request.scheme,
            host=request.host,
            upstream_host=request.host,
            trusted=config.trusted_proxies,
            request_id=request.request_id,
            instance_name=self.instance_name,
        )
        if request.body_length is not None:
            headers["Content-Length"] = str(request.body_length)
        self.budget.request_started()
        self.metrics.in_flight.inc()
        finished_here = True
        try:
            result = self._forward(runtime, request, headers, start_response)
            finished_here = not isinstance(result, ResponseStream)
            return result
        finally:
            if finished_here:
                self._request_done(request)

    def _request_done(self, request: Inbound) -> None:
        if request.holds_retry_token:
            self.budget.retry_finished()
        self.budget.request_finished()
        self.metrics.in_flight.dec()

    # -- the attempt loop ------------------------------------------------------

    def _forward(
        self,
        runtime: Runtime,
        request: Inbound,
        headers: dict[str, str],
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        config = runtime.config
        deadline = request.started + config.timeouts.total if config.timeouts.total else None
        tried: list[Backend] = []
        failure: Failure | None = None
        while True:
            chosen = self._choose(runtime, request, tried)
            if chosen is None:
                if failure is not None:
                    return self._fail(request, start_response, failure)
                self.metrics.count_error("", "no_backend")
                return self._answer(
                    request, start_response, 503, "no backend available", [("Retry-After", "1")]
                )
            backend, permit = chosen
            tried.append(backend)
            request.attempts += 1
            request.backend_name = backend.name
            response, failure = self._attempt(runtime, backend, permit, request, headers, deadline)
            if failure is None and response is not None:
                return self._relay(backend, request, response, start_response, None)
            assert failure is not None
            self.metrics.count_error(backend.name, failure.reason)
            left = None if deadline is None else deadline - self.clock()
            why_not = retry_verdict(
                failure,
                method=request.method,
                retries_done=request.attempts - 1,
                settings=config.retries,
                body_replayable=request.replayable,
                seconds_left=left,
            )
            if why_not is None and not request.holds_retry_token:
                if self.budget.try_start_retry(config.retries.budget_percent):
                    request.holds_retry_token = True
                else:
                    why_not = "retry budget spent"
            if why_not is not None:
                request.detail = why_not
                if response is not None:  # the client gets the backend's own answer
                    return self._relay(backend, request, response, start_response, failure)
                backend.release(failed=True)
                self.metrics.backend_in_flight_changed(backend.name, -1)
                return self._fail(request, start_response, failure)
            self.metrics.count_retry(backend.name)
            if response is not None:
                upstream.discard(response)
            backend.release(failed=True)
            self.metrics.backend_in_flight_changed(backend.name, -1)
            if config.retries.backoff:
                self.sleep(min(config.retries.backoff * self.rng.uniform(0.5, 1.5), left or 1e9))

    def _choose(
        self, runtime: Runtime, request: Inbound, tried: list[Backend]
    ) -> tuple[Backend, Permit] | None:
        """A backend not yet tried, admitted by its cap and its breaker; the sticky
        rule first, the strategy otherwise."""
        sticky = runtime.sticky
        for _ in range(3):  # another thread may take the last slot between look and admit
            candidates = runtime.candidates(exclude=tried)
            backend = sticky.pinned(candidates, request.cookie, request.client)
            if backend is None:
                backend = runtime.selector.choose(candidates)
                if backend is None:
                    return None
                if sticky.mode == "cookie":
                    request.set_cookie = sticky.set_cookie(backend)
            elif sticky.mode == "cookie":
                request.set_cookie = None  # the client's cookie already says this one
            if not backend.try_acquire():
                continue
            permit = backend.breaker.try_acquire()
            if permit is None:
                backend.release(failed=False)
                continue
            self.metrics.backend_in_flight_changed(backend.name, 1)
            return backend, permit
        return None

    def _attempt(
        self,
        runtime: Runtime,
        backend: Backend,
        permit: Permit,
        request: Inbound,
        headers: dict[str, str],
        deadline: float | None,
    ) -> tuple[urllib3.BaseHTTPResponse | None, Failure | None]:
        """One try against one backend: (response, None) to relay, or a failure with
        the backend's response when it answered a failure status."""
        config = runtime.config
        chaos = config.chaos
        if chaos.latency and self.rng.random() < chaos.latency_rate:
            self.sleep(
                chaos.latency
                if deadline is None
                else max(0.0, min(chaos.latency, deadline - self.clock()))
            )
        if chaos.error_rate and self.rng.random() < chaos.error_rate:
            # Exactly what a backend answering error_status would cause (SPEC §5).
            failed = chaos.error_status in config.circuit_breaker.failure_statuses
            self._judge(backend, permit, failed)
            return None, chaos_failure(chaos.error_status)
        timeout = runtime.default_timeout
        if deadline is not None:
            left = deadline - self.clock()
            if left <= 0:
                self._judge(backend, permit, None)
                return None, Failure("deadline_exceeded", "timeout", 504, "total deadline reached")
            if left < max(config.timeouts.connect, config.timeouts.read) or not (
                config.timeouts.connect and config.timeouts.read
            ):
                timeout = attempt_timeout(
                    min(config.timeouts.connect or left, left),
                    min(config.timeouts.read or left, left),
                )
        if not config.preserve_host:
            headers["Host"] = backend.netloc
        body = request.body
        if request.replayable and isinstance(body, bytes) and not body:
            body = None if request.body_length is None else b""
        try:
            response = upstream.send(
                backend, request.method, request.target, headers, body, timeout
            )
        except Exception as exc:
            failure = classify(exc)
            self._judge(backend, permit, True)
            return None, failure
        broken = upstream.check(response)
        if broken is not None:
            self._judge(backend, permit, True)
            return None, broken
        status = response.status
        failed = status in config.circuit_breaker.failure_statuses
        self._judge(backend, permit, failed)
        if failed or status in config.retries.retry_on:
            return response, status_failure(status)
        return response, None

    def _judge(self, backend: Backend, permit: Permit | None, failed: bool | None) -> None:
        """Tell the breaker how the attempt went (None: no verdict, e.g. never sent);
        log and count only a real transition."""
        breaker = backend.breaker
        if failed is None:
            breaker.release(permit)
            return
        changed = breaker.record_failure(permit) if failed else breaker.record_success(permit)
        if changed:
            state = backend.breaker.state
            log.warning("backend %s: circuit %s", backend.name, state.value)
            if state.value == "open":
                self.metrics.circuit_opens.labels(backend.name).inc()
            self.metrics.set_backend_state(backend.name, backend.health.up, state.gauge_value)

    # -- answers ---------------------------------------------------------------

    def _relay(
        self,
        backend: Backend,
        request: Inbound,
        response: urllib3.BaseHTTPResponse,
        start_response: StartResponse,
        failure: Failure | None,
    ) -> Iterable[bytes]:
        request.status = response.status
        headers = downstream_response_headers(
            response.headers.items(),
            request_id=request.request_id,
            instance_name=self.instance_name,
        )
        if request.set_cookie:
            headers.append(("Set-Cookie", request.set_cookie))
        write = start_response(f"{response.status} {response.reason or ''}".rstrip(), headers)
        # Send the headers now: waitress otherwise waits for the first body byte, and
        # a server-sent event stream may not have one for a while.
        write(b"")
        self.metrics.observe_request(
            backend.name, request.method, response.status, self.clock() - request.started
        )
        failed = failure is not None and failure.reason == "upstream_status"
        return ResponseStream(self, backend, request, upstream.BodyRelay(response), failed)

    def _fail(
        self, request: Inbound, start_response: StartResponse, failure: Failure
    ) -> Iterable[bytes]:
        extra = [("Retry-After", "1")] if failure.status == 503 else []
        return self._answer(request, start_response, failure.status, failure.detail, extra)

    def _answer(
        self,
        request: Inbound,
        start_response: StartResponse,
        status: int,
        why: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> Iterable[bytes]:
        """A response pyproxy produces itself (SPEC §4: short text body + X-Request-ID)."""
        body = error_body(status, why)
        request.status, request.bytes_sent, request.detail = status, len(body), why
        start_response(
            f"{status} {REASONS.get(status, 'Error')}",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("X-Request-ID", request.request_id),
                *(extra or []),
            ],
        )
        self.metrics.observe_request(
            request.backend_name, request.method, status, self.clock() - request.started
        )
        if self.access_log is not None:
            self.access_log.write(request, self.clock())
        return [body]


class ResponseStream:
    """The response body iterable handed to waitress. Its `close()` is where a
    request ends (PEP 3333: the server always calls it), so the backend's in-flight
    slot, the metrics and the access log line are settled there, once."""

    def __init__(
        self,
        app: ProxyApp,
        backend: Backend,
        request: Inbound,
        relay: upstream.BodyRelay,
        failure_status: bool,
    ) -> None:
        self.app, self.backend, self.request, self.relay = app, backend, request, relay
        self.failure_status = failure_status  # relaying an answer the breaker counted as failed
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.relay
        if self.relay.failure is not None:
            failure = self.relay.failure
            self.request.detail = f"backend failed mid-body: {failure.detail}"
            log.warning(
                "backend %s failed mid-response (%s); cutting the client's response short",
                self.backend.name,
                failure.detail,
            )
            self.app.metrics.count_error(self.backend.name, failure.reason)
            self.app._judge(self.backend, None, True)
            # SPEC §4: the client must see the truncation, never a complete short body.
            raise AbortResponse(failure.detail)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        relay, request = self.relay, self.request
        relay.close()
        request.bytes_sent = relay.bytes_sent
        failed = relay.failure is not None or self.failure_status
        if not relay.complete and relay.failure is None:
            request.detail = "client disconnected"
            self.app.metrics.count_error(self.backend.name, "client_disconnected")
        self.backend.release(failed=failed)
        self.app.metrics.backend_in_flight_changed(self.backend.name, -1)
        self.app._request_done(request)
        if self.app.access_log is not None:
            self.app.access_log.write(request, self.app.clock())
