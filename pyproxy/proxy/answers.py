"""OwnAnswers: the responses pyproxy makes itself, in one place.

Each is a short `text/plain` body `<code> <reason>: <why>` with the X-Request-ID, and
for the statuses that invite a retry (429, 503) a `Retry-After` (RFC 9110 §10.2.3).
Each answer is counted in `proxy_requests_total` like a relayed one. Which failure
becomes which status is decided in errors.py; this module only writes the answer.

The 503 for "nothing available" says why, backend by backend
(`no_backend_available_in_pool`), so that an operator meeting it for the first time
(a backend without the default `/health` page, say) sees the cause in the answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from pyproxy.observe.metrics import Metrics
from pyproxy.policy.ratelimit import rate_limit_headers
from pyproxy.pool.backend import Backend
from pyproxy.pool.errors import Failure, error_body, reason_phrase
from pyproxy.proxy.request import Outcome, Request
from pyproxy.runtime.pools import Pool
from pyproxy.runtime.snapshot import Runtime
from pyproxy.wsgi import ExcInfo, StartResponse

Headers = list[tuple[str, str]]

MAX_LISTED = 10  # backends named in a 503 body at most; the rest are counted
MAX_DETAIL = 60  # characters of a probe's detail repeated there (it holds the health path)


def no_backend_available_in_pool(
    pool: str, backends: Sequence[Backend], judge: Callable[[Backend], str | None]
) -> str:
    """One line for the 503 when no backend of `pool` may take the request: each
    backend and why not, in `judge`'s words (the runtime's `why_unavailable`), with
    the last probe's detail for a health verdict:

        no backend available in pool web: web1 health down (404 on /health), web2 circuit open

    The body goes to whoever sent the request, so it names backends only, never their
    URLs or addresses (probe details hold a status, a path or a few fixed words), and
    it stays short however many backends the pool has.
    """
    reasons = []
    for backend in backends[:MAX_LISTED]:
        why = judge(backend)
        if why is None:
            why = "busy"  # available again by now, or it lost a race for its last slot
        elif why.startswith("health") and backend.health.last_result:
            detail = backend.health.last_result
            if len(detail) > MAX_DETAIL:
                detail = detail[: MAX_DETAIL - 3] + "..."
            why = f"{why} ({detail})"
        reasons.append(f"{backend.name} {why}")
    if len(backends) > MAX_LISTED:
        reasons.append(f"and {len(backends) - MAX_LISTED} more")
    return f"no backend available in pool {pool}: " + (", ".join(reasons) or "none configured")


class OwnAnswers:
    """Writes pyproxy's own responses and counts them; `clock` times them."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock

    def answer(
        self,
        request: Request,
        outcome: Outcome,
        start_response: StartResponse,
        status: int,
        why: str,
        extra: Headers | None = None,
        exc_info: ExcInfo | tuple[None, None, None] | None = None,
    ) -> Iterable[bytes]:
        """A response pyproxy produces itself: short text body + X-Request-ID.

        `exc_info` replaces a head the server refused (PEP 3333 allows a second
        start_response call only with it, and only before any output)."""
        body = error_body(status, why)
        outcome.status, outcome.bytes_sent, outcome.detail = status, len(body), why
        start_response(
            f"{status} {reason_phrase(status)}",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("X-Request-ID", request.request_id),
                *(extra or []),
                *([outcome.explanation.header()] if outcome.explanation else []),
            ],
            *([exc_info] if exc_info else []),
        )
        self.metrics.observe_request(
            outcome.backend_name, request.method, status, self.clock() - request.started,
            outcome.pool_name,
        )  # fmt: skip
        return [body]

    def failed(
        self,
        request: Request,
        outcome: Outcome,
        start_response: StartResponse,
        failure: Failure,
        exc_info: ExcInfo | tuple[None, None, None] | None = None,
    ) -> Iterable[bytes]:
        extra = [("Retry-After", "1")] if failure.status == 503 else []
        why = failure.detail
        return self.answer(request, outcome, start_response, failure.status, why, extra, exc_info)

    def no_backend(
        self,
        pool: Pool,
        request: Request,
        outcome: Outcome,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        """503 + Retry-After when nothing in the route's `pool` is available, with no
        upstream attempt; the body says why, backend by backend."""
        backends = pool.backends
        wait = 1.0
        limiter = pool.backend_limiter
        if limiter is not None:
            judge = pool.why_unavailable  # without the bucket: who waits only for a token
            ready = [b for b in backends if judge(b, rate_bucket=False) is None]
            if ready:  # otherwise fine, but every bucket is empty
                self.metrics.rate_limited.labels("backend").inc()
                wait = max(wait, limiter.seconds_until_token(b.name for b in ready))
        self.metrics.count_error("", "no_backend", outcome.pool_name)
        retry_after = [("Retry-After", str(math.ceil(min(wait, 3600.0))))]
        why = no_backend_available_in_pool(pool.name, backends, pool.why_unavailable)
        return self.answer(request, outcome, start_response, 503, why, retry_after)

    def over_client_limit(
        self,
        runtime: Runtime,
        request: Request,
        outcome: Outcome,
        start_response: StartResponse,
    ) -> Iterable[bytes] | None:
        """429 when this client's bucket is empty; None to go on."""
        settings = runtime.config.rate_limit
        assert runtime.client_limiter is not None and settings.per_client is not None
        decision = runtime.client_limiter.check(request.rate_limit_key(settings.client_key))
        if decision.allowed:
            return None
        self.metrics.rate_limited.labels("client").inc()
        self.metrics.count_error("", "rate_limited", outcome.pool_name)
        burst = settings.burst or settings.per_client.count
        extra = rate_limit_headers(decision, settings.per_client, burst)
        return self.answer(request, outcome, start_response, 429, "rate limit exceeded", extra)
