"""Explain a decision: why this request went where it went.

Send `X-PyProxy-Explain: 1` from a local or trusted client and the response carries
`X-PyProxy-Explain`, one compact line:

    strategy=round_robin; #1 app2 by round_robin, skipped app1 (health down),
    app3 (circuit open, reopens in 12s) -> 502 connection refused, retry;
    #2 app3 by retry (random among untried) -> 200

It names the candidates left out and why (down, circuit open until when, at
max_connections, rate bucket empty, already tried), what chose the backend (the
strategy, a sticky cookie, client-address hashing, or the retry rule), and each
attempt's outcome. It is a learning tool: watch the breaker, health checks and
retries make their decisions. For anyone else the header is ignored, because the
answer describes the pool's state to whoever asks.

"Client" is the real client: the address left after walking X-Forwarded-For through
`trusted_proxies` (headers.client_address), never the TCP peer. A trusted load
balancer is trusted to say who the client is, not to vouch for every client it
forwards: asking through it from the internet gets no answer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from pyproxy.config.schema import Network
from pyproxy.headers import is_trusted
from pyproxy.policy.routes import Route
from pyproxy.pool.backend import Backend
from pyproxy.pool.breaker import CircuitState
from pyproxy.runtime.pools import Pool

REQUEST_HEADER = "HTTP_X_PYPROXY_EXPLAIN"
RESPONSE_HEADER = "X-PyProxy-Explain"
MAX_LENGTH = 4000  # keep the header well under common 8 KiB header limits


def wants_explanation(flag: str | None, client: str, trusted: Sequence[Network]) -> bool:
    """True when the request asks for an explanation and its client is loopback or in
    `trusted_proxies`. `client` is the real client address (after X-Forwarded-For
    was walked through the trusted proxies), never the TCP peer."""
    if flag is None or flag.strip() not in ("1", "true", "yes"):
        return False
    try:
        if ipaddress.ip_address(client).is_loopback:
            return True
    except ValueError:
        return False
    return is_trusted(client, trusted)


def why_excluded(pool: Pool, backend: Backend, tried: Sequence[Backend], now: float) -> str:
    """Why `backend` is not a candidate, in a few words; "" when it is one."""
    if backend in tried:
        return "already tried"
    reason = pool.why_unavailable(backend)
    if reason is None:
        return "backup, not needed" if backend.config.backup else ""
    breaker = backend.breaker
    if breaker.state is CircuitState.OPEN and breaker.reopens_at is not None:
        return f"{reason}, reopens in {max(0.0, breaker.reopens_at - now):.0f}s"
    return reason


class Explanation:
    """Collects the decisions of one request; `header()` renders them."""

    def __init__(self, route: Route, pool: Pool, *, name_route: bool = True) -> None:
        sticky = pool.config.sticky.mode
        self.parts = [f"strategy={pool.config.strategy}"]
        if sticky != "none":
            self.parts[0] += f" sticky={sticky}"
        if name_route:  # a v1 file has one pool and one catch-all: nothing to tell
            self.parts.insert(0, f"route={route.name} pool={pool.name}")
        self.attempts = 0

    def chose(
        self,
        pool: Pool,
        backend: Backend,
        rule: str,
        tried: Sequence[Backend],
        now: float,
    ) -> None:
        self.attempts += 1
        skipped = [
            f"{other.name} ({why})"
            for other in pool.backends
            if other is not backend and (why := why_excluded(pool, other, tried, now))
        ]
        line = f"#{self.attempts} {backend.name} by {rule}"
        if skipped:
            line += ", skipped " + ", ".join(skipped)
        self.parts.append(line)

    def none_available(self, pool: Pool, tried: Sequence[Backend], now: float) -> None:
        skipped = [
            f"{b.name} ({why_excluded(pool, b, tried, now) or 'lost a race for its last slot'})"
            for b in pool.backends
        ]
        self.parts.append("no backend available: " + (", ".join(skipped) or "none configured"))

    def outcome(self, text: str) -> None:
        """The result of the latest attempt (recorded once)."""
        if len(self.parts) > 1 and " -> " not in self.parts[-1]:
            self.parts[-1] += f" -> {text}"

    def header(self) -> tuple[str, str]:
        value = "; ".join(self.parts)
        # Header values must stay on one line of latin-1 (RFC 9110 §5.5).
        value = value.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace").decode()
        if len(value) > MAX_LENGTH:
            value = value[: MAX_LENGTH - 3] + "..."
        return RESPONSE_HEADER, value
