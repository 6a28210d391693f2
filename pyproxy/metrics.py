"""Metrics: every Prometheus series of SPEC §9, on a registry the caller injects.

One registry per process (and one per test): prometheus-client refuses to register
the same name twice in a registry ("Duplicated timeseries"). Label children are
cached in plain dicts because `metric.labels(...)` takes a lock and builds a tuple
on every call, which the hot path would pay per request.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# Upstream latency from ~1 ms to a minute; roughly doubling so quantiles stay honest.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# RFC 9110 §9 methods (case-sensitive). Any other token a client sends is counted as
# "other": a label value taken verbatim from a request is unbounded cardinality, a
# memory and scrape-size attack (the bug of client_golang's promhttp, CVE-2022-21698).
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)


class Metrics:
    """The proxy's instruments. `Metrics()` makes its own fresh registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # SPEC §9 lists the series exactly; *_created gauges would double their number.
        # (A process-wide switch, read at collection time: one pyproxy per process.)
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "proxy_requests_total",
            "Requests answered, by backend, method and status code",
            ["backend", "method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "proxy_request_duration_seconds",
            "Time from request received to response headers sent, by backend",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            # reason: errors.Failure.reason, or no_backend, rate_limited,
            # client_disconnected, rate_limit_store (SPEC §9)
            "proxy_errors_total", "Failures, by backend and reason", ["backend", "reason"],
            registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "proxy_retries_total", "Retries, by the backend whose attempt failed", ["backend"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("proxy_in_flight_requests", "Requests being served now", registry=r)
        self.backend_in_flight = Gauge(
            "proxy_backend_in_flight", "Requests in flight per backend", ["backend"], registry=r
        )
        self.backend_up = Gauge(
            "proxy_backend_up", "1 when the backend's health is up", ["backend"], registry=r
        )
        self.circuit_state = Gauge(
            "proxy_circuit_state", "0 closed, 1 half-open, 2 open", ["backend"], registry=r
        )
        self.circuit_opens = Counter(
            "proxy_circuit_opens_total", "Times the circuit opened", ["backend"], registry=r
        )
        self.rate_limited = Counter(
            "proxy_rate_limited_total", "Requests refused by a rate limit", ["scope"], registry=r
        )
        self.reloads = Counter(
            "proxy_config_reloads_total", "Config reloads, by result", ["result"], registry=r
        )
        self.last_reload_ok = Gauge(
            "proxy_config_last_reload_successful", "1 if the last reload succeeded", registry=r
        )
        self.last_reload_ok.set(1)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- hot path ------------------------------------------------------------

    def observe_request(self, backend: str, method: str, code: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        self._child(self.requests, backend, method, str(code)).inc()
        self._child(self.duration, backend).observe(seconds)

    def count_error(self, backend: str, reason: str) -> None:
        self._child(self.errors, backend, reason).inc()

    def count_retry(self, backend: str) -> None:
        self._child(self.retries, backend).inc()

    # -- state changes -------------------------------------------------------

    def set_backend_state(
        self, backend: str, up: bool, circuit_value: int, in_flight: int | None = None
    ) -> None:
        """Publish a backend's gauges. Called on transitions and at each scrape, for
        backends that are still configured only, so a removed one stays removed."""
        self._child(self.backend_up, backend).set(1 if up else 0)
        self._child(self.circuit_state, backend).set(circuit_value)
        if in_flight is not None:
            self._child(self.backend_in_flight, backend).set(in_flight)

    def forget_backend(self, backend: str) -> None:
        """SPEC §9: gauges of a removed backend are removed (counters stay: they are history)."""
        for gauge in (self.backend_in_flight, self.backend_up, self.circuit_state):
            with contextlib.suppress(KeyError):  # never observed: nothing to remove
                gauge.remove(backend)
            self._children.pop((id(gauge), backend), None)

    def reload_result(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        self.last_reload_ok.set(1 if ok else 0)
