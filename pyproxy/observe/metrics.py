"""Metrics: every series pyproxy exposes (docs/metrics.md), on an injected registry.

One registry per process (and one per test): prometheus-client refuses to register
the same name twice in a registry ("Duplicated timeseries"). Label children are
cached in plain dicts because `metric.labels(...)` takes a lock and builds a tuple
on every call, which the hot path would pay per request.

The per-backend gauges are not stored at all: `BackendGauges` reads them from the
running backends at each scrape. A stored gauge is a copy of a fact, and a copy
outlives its backend: a rename or removal that forgets to delete it leaves a
"circuit open" series that never clears. Read at scrape time, a backend that left
the running set is simply not in the answer. (Prometheus's guidance for values that
already live elsewhere is a custom collector: prometheus.io/docs/instrumenting/writing_exporters.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pyproxy.pool.backend import Backend

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
        # docs/metrics.md lists the series exactly; *_created gauges would double their number.
        # (A process-wide switch, read at collection time: one pyproxy per process.)
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "proxy_requests_total",
            "Requests answered, by backend (and its pool), method and status code",
            ["backend", "pool", "method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "proxy_request_duration_seconds",
            "Time from request received to response headers sent, by backend",
            ["backend", "pool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            # reason: errors.Failure.reason, or no_backend, rate_limited,
            # client_disconnected, rate_limit_store (the table in docs/metrics.md)
            "proxy_errors_total", "Failures, by backend (and pool) and reason",
            ["backend", "pool", "reason"],
            registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "proxy_retries_total", "Retries, by the backend whose attempt failed",
            ["backend", "pool"],
            registry=r,
        )  # fmt: skip
        # multiprocess_mode: how a master adds up its workers' values (workers: N; only
        # read when PROMETHEUS_MULTIPROC_DIR is set, see docs/workers.md).
        self.in_flight = Gauge(
            "proxy_in_flight_requests", "Requests being served now", registry=r,
            multiprocess_mode="livesum",  # the workers' requests now, together
        )  # fmt: skip
        # proxy_backend_up, proxy_circuit_state, proxy_backend_in_flight
        self.backend_gauges = BackendGauges()
        r.register(self.backend_gauges)
        self.circuit_opens = Counter(
            "proxy_circuit_opens_total", "Times the circuit opened", ["backend", "pool"],
            registry=r,
        )  # fmt: skip
        self.route_requests = Counter(
            "proxy_route_requests_total", "Requests a route sent to its pool", ["route", "pool"],
            registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "proxy_rate_limited_total", "Requests refused by a rate limit", ["scope"], registry=r
        )
        self.reloads = Counter(
            "proxy_config_reloads_total", "Config reloads, by result", ["result"], registry=r
        )
        self.last_reload_ok = Gauge(
            "proxy_config_last_reload_successful", "1 if the last reload succeeded", registry=r,
            multiprocess_mode="livemin",  # 0 as long as one live worker's last reload failed
        )
        self.last_reload_ok.set(1)
        self._children: dict[tuple[Any, ...], Any] = {}
        # (backend, pool, method, code) -> its requests counter and duration histogram
        # children: one look-up per request for both, keyed by the status as an int
        # (observe_request 2.1 -> 1.45 us). Bounded as the labels are: backends, pools,
        # KNOWN_METHODS + "other", three-digit codes.
        self._request_children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- hot path ------------------------------------------------------------

    # `pool` is the backend's pool; for a request that reached no backend, "" (with
    # backend "") or the pool its route chose.

    def observe_request(
        self, backend: str, method: str, code: int, seconds: float, pool: str = ""
    ) -> None:
        method = method if method in KNOWN_METHODS else "other"
        key = (backend, pool, method, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self._child(self.requests, backend, pool, method, str(code)),
                self._child(self.duration, backend, pool),
            )
        requests, duration = children
        requests.inc()
        duration.observe(seconds)

    def count_error(self, backend: str, reason: str, pool: str = "") -> None:
        self._child(self.errors, backend, pool, reason).inc()

    def count_retry(self, backend: str, pool: str = "") -> None:
        self._child(self.retries, backend, pool).inc()

    def count_route(self, route: str, pool: str) -> None:
        self._child(self.route_requests, route, pool).inc()

    def count_circuit_open(self, backend: str, pool: str) -> None:
        self._child(self.circuit_opens, backend, pool).inc()

    # -- state changes -------------------------------------------------------

    def read_backends_from(self, backends: Callable[[], Iterable[tuple[str, Backend]]]) -> None:
        """Say where the running backends are, as (pool name, backend); their gauges are
        read there at each scrape."""
        self.backend_gauges.backends = backends

    def reload_result(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        self.last_reload_ok.set(1 if ok else 0)


class BackendGauges(Collector):
    """The per-backend gauges, read from the running backends at scrape time.

    Only the backends `backends()` returns now are exposed: one that was removed or
    renamed (by a reload or the admin API) leaves the scrape with the snapshot that
    dropped it, whatever path it left by. The hot path pays nothing: the facts are
    counters `Backend` keeps anyway.
    """

    def __init__(self) -> None:
        # (pool name, backend) pairs; none until told where
        self.backends: Callable[[], Iterable[tuple[str, Backend]]] = tuple

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # The names only, so the registry can refuse a duplicate at registration.
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up, circuit, in_flight = families = self._families()
        for pool, backend in self.backends():
            labels = [backend.name, pool]
            up.add_metric(labels, 1 if backend.health.up else 0)
            circuit.add_metric(labels, backend.breaker.state.gauge_value)
            in_flight.add_metric(labels, backend.in_flight)
        return iter(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "proxy_backend_up", "1 when the backend's health is up", labels=["backend", "pool"]
            ),
            GaugeMetricFamily(
                "proxy_circuit_state", "0 closed, 1 half-open, 2 open", labels=["backend", "pool"]
            ),
            GaugeMetricFamily(
                "proxy_backend_in_flight",
                "Requests in flight per backend",
                labels=["backend", "pool"],
            ),
        )
