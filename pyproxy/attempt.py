"""One attempt: try one chosen backend once, and tell its breaker how it went.

`try_backend()` returns (response, None) for an answer worth relaying, or a Failure
(with the backend's response when it answered a failure status, so that response
can still reach the client if no retry follows). Chaos injection happens here, in
place of the network exchange, so an injected failure takes exactly the path of a
real one (SPEC §5).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import urllib3

from pyproxy import upstream
from pyproxy.backend import Backend
from pyproxy.breaker import CircuitState, Permit
from pyproxy.connection import set_attempt
from pyproxy.errors import Failure, chaos_failure, classify, status_failure
from pyproxy.metrics import Metrics
from pyproxy.request import Inbound
from pyproxy.runtime import Runtime, attempt_timeout

log = logging.getLogger(__name__)

DEADLINE_EXCEEDED = Failure("deadline_exceeded", "timeout", 504, "total deadline reached")


@dataclass(frozen=True)
class Tools:
    """What an attempt needs from outside, injectable for tests."""

    metrics: Metrics
    clock: Callable[[], float]
    rng: random.Random
    sleep: Callable[[float], None]


def judge(tools: Tools, backend: Backend, permit: Permit | None, failed: bool | None) -> None:
    """Tell the breaker how an attempt went (None: no verdict, it was never sent);
    log and count only a real transition."""
    breaker = backend.breaker
    if failed is None:
        breaker.release(permit)
        return
    changed = breaker.record_failure(permit) if failed else breaker.record_success(permit)
    if changed:
        state = breaker.state
        if state is CircuitState.OPEN:
            log.warning(
                "backend %s: circuit open after %d consecutive failures",
                backend.name, breaker.consecutive_failures,
            )  # fmt: skip
            tools.metrics.circuit_opens.labels(backend.name).inc()
        else:
            log.info("backend %s: circuit %s", backend.name, state.value)


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
    tools: Tools,
    runtime: Runtime,
    backend: Backend,
    permit: Permit,
    request: Inbound,
    headers: dict[str, str],
    deadline: float | None,
) -> tuple[urllib3.BaseHTTPResponse | None, Failure | None]:
    config = runtime.config
    chaos = config.chaos
    if chaos.latency and tools.rng.random() < chaos.latency_rate:
        left = None if deadline is None else deadline - tools.clock()
        tools.sleep(chaos.latency if left is None else max(0.0, min(chaos.latency, left)))
        if deadline is not None and tools.clock() >= deadline:
            judge(tools, backend, permit, None)
            return None, DEADLINE_EXCEEDED
    if chaos.error_rate and tools.rng.random() < chaos.error_rate:
        # What a backend answering error_status would cause: same breaker, same retries.
        judge(tools, backend, permit, chaos.error_status in config.circuit_breaker.failure_statuses)
        return None, chaos_failure(chaos.error_status)
    now = tools.clock()
    if deadline is not None and deadline <= now:
        judge(tools, backend, permit, None)
        return None, DEADLINE_EXCEEDED
    timeout = attempt_timeout_for(runtime, deadline, now)
    if not config.preserve_host:
        headers["Host"] = backend.netloc
    set_attempt(request.target, deadline)
    try:
        response = upstream.send(
            backend, request.method, request.target, headers, request.body, timeout
        )
    except Exception as exc:
        expired = deadline is not None and tools.clock() >= deadline
        failure = DEADLINE_EXCEEDED if expired else classify(exc)
        judge(tools, backend, permit, True)
        return None, failure
    finally:
        set_attempt(None, None)
    broken = upstream.check(response)
    if broken is not None:
        judge(tools, backend, permit, True)
        return None, broken
    status = response.status
    failed = status in config.circuit_breaker.failure_statuses
    judge(tools, backend, permit, failed)
    if failed or status in config.retries.retry_on:
        return response, status_failure(status)
    return response, None
