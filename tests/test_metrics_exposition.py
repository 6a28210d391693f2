"""What /metrics exposes (docs/metrics.md), checked the way Prometheus will read it.

A real proxy sees real traffic and real faults (a refused port, a backend that
answers 503, one that sends garbage, one that resets, one that never answers), and
a backend that goes down. The scrape is parsed with prometheus_client's own parser
and checked against the documented table name by name: type, label names, label values from a
bounded set (never a path, an address or whatever method a client made up), values
that moved as the faults dictate, gauges of removed backends gone. `promtool check
metrics` (Debian package `prometheus`) lints the same text.

The deploy kit's Grafana dashboard is checked here too: it must query only documented
series, and each of its PromQL expressions must parse (`promtool check rules`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from backends import CLOSE, HANG, KEEP, RESET, EchoBackend, closed_port, response, send, wait_for
from conftest import base_config
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pyproxy.config.schema import (
    BackendConfig,
    CircuitBreakerConfig,
    HealthCheckConfig,
    RetryConfig,
    Timeouts,
)
from pyproxy.process.service import Service

ROOT = Path(__file__).resolve().parent.parent

# The documented series (docs/metrics.md), as a table: name -> (type, label names).
DOCUMENTED: dict[str, tuple[str, frozenset[str]]] = {
    "proxy_requests_total": ("counter", frozenset({"backend", "pool", "method", "code"})),
    "proxy_request_duration_seconds": ("histogram", frozenset({"backend", "pool"})),
    "proxy_errors_total": ("counter", frozenset({"backend", "pool", "reason"})),
    "proxy_retries_total": ("counter", frozenset({"backend", "pool"})),
    "proxy_in_flight_requests": ("gauge", frozenset()),
    "proxy_backend_in_flight": ("gauge", frozenset({"backend", "pool"})),
    "proxy_backend_up": ("gauge", frozenset({"backend", "pool"})),
    "proxy_circuit_state": ("gauge", frozenset({"backend", "pool"})),
    "proxy_circuit_opens_total": ("counter", frozenset({"backend", "pool"})),
    "proxy_rate_limited_total": ("counter", frozenset({"scope"})),
    "proxy_route_requests_total": ("counter", frozenset({"route", "pool"})),
    "proxy_config_reloads_total": ("counter", frozenset({"result"})),
    "proxy_config_last_reload_successful": ("gauge", frozenset()),
}
REASONS = frozenset(
    {
        "connect_error",
        "timeout",
        "reset",
        "bad_response",
        "upstream_status",
        "chaos",
        "no_backend",
        "rate_limited",
        "deadline_exceeded",
        "client_disconnected",
        "rate_limit_store",
        "no_route",
    }
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Every value a label may take besides backend names (docs/metrics.md).
BOUNDED = {
    "reason": REASONS,
    "scope": frozenset({"client", "backend"}),
    "result": frozenset({"success", "failure"}),
}
FAULTY = ("flaky", "refused", "garbage", "resetter", "silent")


# -- scraping ---------------------------------------------------------------------


def scrape(service: Service) -> str:
    answer = requests.get(service.admin_url + "/metrics", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    return answer.text


def families(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """Exposed name (as docs/metrics.md writes it) -> (type, samples)."""
    out: dict[str, tuple[str, list[Sample]]] = {}
    for family in text_string_to_metric_families(text):
        # The parser drops "_total" from a counter's family name; the docs keep it.
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = (family.type, list(family.samples))
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample `name{labels}`, None if absent. Labels left out
    match anything (a backend's `pool`), but must leave one sample."""
    found = [
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.items() >= labels.items()
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def series(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of `name`, without `pool` (these tests run a v1 file's one pool)."""
    return [
        {k: v for k, v in s.labels.items() if k != "pool"}
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    ]


def get_many(http: requests.Session, url: str, count: int, method: str = "GET") -> list[int]:
    return [
        http.request(method, f"{url}/item/{i}?user={i}", timeout=10).status_code
        for i in range(count)
    ]


# -- the faulty fleet ---------------------------------------------------------------


@pytest.fixture
def faulty_proxy(
    make_proxy: Any, make_echo_backend: Callable[[str], EchoBackend], make_scripted_backend: Any
) -> Service:
    """One healthy backend and five broken ones, breaker at 2 failures, 1 retry."""
    healthy = make_echo_backend("app1")
    flaky = make_scripted_backend({}, default=[send(response(503, b"busy\n")), KEEP])
    garbage = make_scripted_backend({}, default=[send(b"NOT HTTP AT ALL\r\n\r\n"), CLOSE])
    resetter = make_scripted_backend({}, default=[RESET])
    silent = make_scripted_backend({}, default=[HANG])
    return make_proxy(  # type: ignore[no-any-return]
        [
            healthy,
            BackendConfig(flaky.url, "flaky"),
            BackendConfig(f"http://127.0.0.1:{closed_port()}", "refused"),
            BackendConfig(garbage.url, "garbage"),
            BackendConfig(resetter.url, "resetter"),
            BackendConfig(silent.url, "silent"),
        ],
        timeouts=Timeouts(connect=1.0, read=0.3, total=5.0),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=2, open_duration=600.0),
        retries=RetryConfig(max_retries=1),
    )


@pytest.fixture
def after_faults(faulty_proxy: Service, http: requests.Session) -> str:
    """The scrape after enough traffic that every faulty backend's circuit opened."""
    codes = get_many(http, faulty_proxy.proxy_url, 30)
    assert codes.count(200) >= 15, codes  # the healthy one answers whatever else fails
    assert wait_for(
        lambda: all(
            faulty_proxy.holder.runtime.find(name=n).breaker.state.value == "open" for n in FAULTY
        ),
        timeout=10,
    )
    # Slots are released in each body's close(), a moment after the client's last byte.
    assert wait_for(lambda: faulty_proxy.requests_in_flight() == 0, timeout=5)
    return scrape(faulty_proxy)


def test_every_spec_metric_has_its_name_type_and_labels(after_faults: str) -> None:
    exposed = families(after_faults)
    for name, (kind, labels) in DOCUMENTED.items():
        assert name in exposed, f"{name} is not exposed"
        exposed_kind, samples = exposed[name]
        assert exposed_kind == kind, f"{name} is a {exposed_kind}, docs/metrics.md says {kind}"
        for sample in samples:
            names = set(sample.labels) - ({"le"} if kind == "histogram" else set())
            assert names == labels, f"{sample.name}{sample.labels}: documented: {set(labels)}"
    # Every labelled family that this traffic must have moved has samples to check.
    for name in (
        "proxy_requests_total",
        "proxy_request_duration_seconds",
        "proxy_errors_total",
        "proxy_retries_total",
        "proxy_backend_in_flight",
        "proxy_backend_up",
        "proxy_circuit_state",
        "proxy_circuit_opens_total",
    ):
        assert exposed[name][1], f"{name} has no samples after faults"


def test_no_series_beyond_spec(after_faults: str) -> None:
    """Only the documented families: prometheus_client also exports a `<name>_created` gauge
    per counter and histogram child, doubling the series count for nothing."""
    extra = set(families(after_faults)) - set(DOCUMENTED)
    assert not extra, f"series not documented: {sorted(extra)}"


def test_histogram_is_complete_and_cumulative(after_faults: str) -> None:
    buckets = [
        (float(s["le"]), value(after_faults, "proxy_request_duration_seconds_bucket", **s))
        for s in series(after_faults, "proxy_request_duration_seconds_bucket")
        if s["backend"] == "app1"
    ]
    les = [le for le, _ in buckets]
    assert les == sorted(les) and les[-1] == float("inf")
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    total = value(after_faults, "proxy_request_duration_seconds_count", backend="app1")
    assert counts[-1] == total
    assert total is not None and total >= 15
    assert value(after_faults, "proxy_request_duration_seconds_sum", backend="app1")


def test_faults_move_the_right_series(after_faults: str) -> None:
    def errors(backend: str, reason: str) -> float:
        return value(after_faults, "proxy_errors_total", backend=backend, reason=reason) or 0.0

    assert errors("refused", "connect_error") >= 2
    assert errors("flaky", "upstream_status") >= 2
    assert errors("garbage", "bad_response") >= 2
    assert errors("resetter", "reset") >= 2
    assert errors("silent", "timeout") >= 2
    assert errors("app1", "connect_error") == 0
    for name in FAULTY:
        assert value(after_faults, "proxy_circuit_state", backend=name) == 2.0, name
        assert value(after_faults, "proxy_circuit_opens_total", backend=name) == 1.0, name
        assert value(after_faults, "proxy_backend_in_flight", backend=name) == 0.0, name
    assert value(after_faults, "proxy_circuit_state", backend="app1") == 0.0
    # Which failed attempts get retried depends on the rotation; app1's never fail.
    retried = {s["backend"] for s in series(after_faults, "proxy_retries_total")}
    assert retried and retried <= set(FAULTY), retried
    retries = sum(value(after_faults, "proxy_retries_total", backend=b) or 0 for b in retried)
    assert retries >= 3
    assert value(after_faults, "proxy_backend_up", backend="app1") == 1.0
    assert (
        value(after_faults, "proxy_requests_total", backend="app1", method="GET", code="200") or 0
    ) >= 15
    assert value(after_faults, "proxy_in_flight_requests") == 0.0
    assert value(after_faults, "proxy_config_last_reload_successful") == 1.0


def test_label_values_are_bounded(
    faulty_proxy: Service, after_faults: str, http: requests.Session
) -> None:
    # Made-up methods and odd paths must not create series of their own
    # (unbounded method labels were client_golang's CVE-2022-21698).
    for method in ("FOO", "XQZZY1", "GETX", "get"):
        http.request(method, faulty_proxy.proxy_url + "/weird/path?x=1", timeout=10)
    text = scrape(faulty_proxy)
    runtime = faulty_proxy.holder.runtime
    names = {b.name for b in runtime.backends} | {""}
    pools = set(runtime.pools) | {""}
    routes = {route.name for route in runtime.config.routes}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, got in sample.labels.items():
                where = f"{sample.name}{sample.labels}"
                if label == "backend":
                    assert got in names, where
                elif label == "pool":
                    assert got in pools, where
                elif label == "route":
                    assert got in routes, where
                elif label == "method":
                    assert got in METHODS | {"other"}, where
                elif label == "code":
                    assert re.fullmatch(r"[1-5]\d\d", got), where
                elif label == "le":
                    float(got)
                else:
                    assert got in BOUNDED[label], where
    for leak in ("/item", "/weird", "user=", "127.0.0.1"):
        assert leak not in text, f"{leak!r} leaked into /metrics"


def test_no_backend_is_counted_with_an_empty_backend_label(
    make_proxy: Any, http: requests.Session
) -> None:
    service = make_proxy([])
    assert http.get(service.proxy_url + "/", timeout=5).status_code == 503
    text = scrape(service)
    assert value(text, "proxy_errors_total", backend="", reason="no_backend") == 1.0
    assert value(text, "proxy_requests_total", backend="", method="GET", code="503") == 1.0
    assert value(text, "proxy_request_duration_seconds_count", backend="") == 1.0


def test_a_backend_that_goes_down(
    make_proxy: Any,
    make_echo_backend: Callable[[str], EchoBackend],
    make_scripted_backend: Any,
    http: requests.Session,
) -> None:
    """It shows proxy_backend_up 0, its circuit opens, its errors are counted by reason."""
    # A scripted backend, because its close() also ends kept-alive connections.
    doomed = make_scripted_backend({}, default=[send(response(200, b"ok\n")), KEEP])
    steady = make_echo_backend("steady")
    service = make_proxy(
        [BackendConfig(doomed.url, "doomed"), steady],
        health_check=HealthCheckConfig(
            interval=0.2, timeout=0.5, healthy_threshold=1, unhealthy_threshold=2
        ),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=2, open_duration=600.0),
    )
    assert get_many(http, service.proxy_url, 4) == [200] * 4
    text = scrape(service)
    assert value(text, "proxy_backend_up", backend="doomed") == 1.0
    assert value(text, "proxy_circuit_state", backend="doomed") == 0.0
    doomed.close()  # its port now refuses connections, its connections are gone
    codes = get_many(http, service.proxy_url, 4)  # round robin: 2 of them reach doomed
    assert sorted(codes) == [200, 200, 502, 502]
    text = scrape(service)
    assert value(text, "proxy_errors_total", backend="doomed", reason="connect_error") == 2.0
    assert value(text, "proxy_circuit_state", backend="doomed") == 2.0
    assert value(text, "proxy_circuit_opens_total", backend="doomed") == 1.0
    assert value(text, "proxy_requests_total", backend="doomed", method="GET", code="502") == 2.0
    assert wait_for(lambda: value(scrape(service), "proxy_backend_up", backend="doomed") == 0.0)
    assert value(scrape(service), "proxy_backend_up", backend="steady") == 1.0


GAUGES = ("proxy_backend_up", "proxy_circuit_state", "proxy_backend_in_flight")


def test_gauges_of_a_removed_backend_disappear(faulty_proxy: Service, after_faults: str) -> None:
    for gauge in GAUGES:
        assert {"backend": "refused"} in series(after_faults, gauge), gauge
    assert faulty_proxy.swap.remove_backend("refused", None) is not None
    text = scrape(faulty_proxy)
    for gauge in GAUGES:
        assert {"backend": "refused"} not in series(text, gauge), gauge
        assert {"backend": "app1"} in series(text, gauge), gauge
    # Counters are history: they stay.
    assert value(text, "proxy_circuit_opens_total", backend="refused") == 1.0


def test_a_request_in_flight_during_removal_does_not_bring_its_gauge_back(
    make_proxy: Any, make_echo_backend: Callable[[str], EchoBackend], http: requests.Session
) -> None:
    going = make_echo_backend("going")
    service = make_proxy([going])
    answers: list[int] = []
    held = threading.Thread(
        target=lambda: answers.append(http.get(service.proxy_url + "/hold", timeout=10).status_code)
    )
    held.start()
    assert going.holding.wait(5)
    assert value(scrape(service), "proxy_backend_in_flight", backend="going") == 1.0
    service.swap.remove_backend("going", None)
    going.release.set()
    held.join(10)
    assert answers == [200]
    assert wait_for(lambda: service.requests_in_flight() == 0)
    text = scrape(service)
    assert {"backend": "going"} not in series(text, "proxy_backend_in_flight"), (
        "proxy_backend_in_flight{backend=going} came back after removal, value "
        f"{value(text, 'proxy_backend_in_flight', backend='going')}"
    )


# -- every way a backend can leave or be renamed ---------------------------------------
#
# A gauge describes a backend that is running now. Each path below takes a backend
# out of the running set, or gives it a new name; after it, /metrics must show no
# gauge with the old name, and exactly one (with the right value) for the new one.

TOKEN = "metrics-test-token"


def backend_gauges(text: str, backend: str) -> dict[str, float | None]:
    return {gauge: value(text, gauge, backend=backend) for gauge in GAUGES}


def gauge_names(text: str) -> set[str]:
    return {labels["backend"] for gauge in GAUGES for labels in series(text, gauge)}


def write_backends(path: Path, backends: list[dict[str, str]], **extra: Any) -> None:
    document = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "health_check": {"enabled": False},
        "access_log": {"enabled": False},
        "retries": {"max_retries": 0},
        "backends": backends,
        **extra,
    }
    path.write_text(yaml.safe_dump(document))


def admin_post(service: Service, path: str, body: dict[str, str]) -> requests.Response:
    return requests.post(
        service.admin_url + path,
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )


def test_a_reload_that_renames_a_backend_keeps_no_gauge_of_the_old_name(
    make_proxy: Any, make_echo_backend: Callable[[str], EchoBackend], tmp_path: Path
) -> None:
    """Same URL, new name: the Backend object (and its state) carries over, the old
    name must not."""
    echo = make_echo_backend("echo")
    path = tmp_path / "config.yaml"
    write_backends(path, [{"url": echo.url, "name": "before"}])
    service = make_proxy([BackendConfig(echo.url, "before")], source_path=str(path))
    assert gauge_names(scrape(service)) == {"before"}
    write_backends(path, [{"url": echo.url, "name": "after"}])
    assert service.reload("test").ok
    text = scrape(service)
    assert gauge_names(text) == {"after"}, text
    assert backend_gauges(text, "after") == {
        "proxy_backend_up": 1.0, "proxy_circuit_state": 0.0, "proxy_backend_in_flight": 0.0,
    }  # fmt: skip


def test_a_reload_that_gives_a_name_to_another_url_shows_the_new_backends_state(
    make_proxy: Any,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
    tmp_path: Path,
) -> None:
    """Same name, new URL: the old backend (circuit open) leaves, a new one (closed)
    takes the name. The series must describe the new one, once."""
    echo = make_echo_backend("echo")
    dead = f"http://127.0.0.1:{closed_port()}"
    breaker = {"failure_threshold": 1, "open_duration": 60}
    path = tmp_path / "config.yaml"
    write_backends(path, [{"url": dead, "name": "app"}], circuit_breaker=breaker)
    service = make_proxy(
        [BackendConfig(dead, "app")],
        source_path=str(path),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=1, open_duration=60.0),
    )
    assert http.get(service.proxy_url + "/", timeout=5).status_code == 502
    assert value(scrape(service), "proxy_circuit_state", backend="app") == 2.0
    write_backends(path, [{"url": echo.url, "name": "app"}], circuit_breaker=breaker)
    assert service.reload("test").ok
    text = scrape(service)
    assert gauge_names(text) == {"app"}
    assert series(text, "proxy_circuit_state") == [{"backend": "app"}]
    assert value(text, "proxy_circuit_state", backend="app") == 0.0
    assert http.get(service.proxy_url + "/", timeout=5).status_code == 200


def test_a_reload_that_drops_a_backend_drops_its_gauges(
    make_proxy: Any, make_echo_backend: Callable[[str], EchoBackend], tmp_path: Path
) -> None:
    keep, drop = make_echo_backend("keep"), make_echo_backend("drop")
    path = tmp_path / "config.yaml"
    write_backends(path, [{"url": keep.url, "name": "keep"}])
    service = make_proxy([keep, drop], source_path=str(path))
    assert gauge_names(scrape(service)) == {"keep", "drop"}
    assert service.reload("test").ok
    assert gauge_names(scrape(service)) == {"keep"}


def test_admin_remove_then_add_under_another_name_keeps_no_gauge_of_the_old_name(
    make_proxy: Any, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    """The admin API's rename: remove, then add the same URL with a new name; then
    add it back under its first name."""
    stay, moving = make_echo_backend("stay"), make_echo_backend("moving")
    admin = dataclasses.replace(base_config().admin, token=TOKEN)
    service = make_proxy([stay, moving], admin=admin)
    assert admin_post(service, "/admin/remove-backend", {"name": "moving"}).status_code == 200
    assert gauge_names(scrape(service)) == {"stay"}
    added = admin_post(service, "/admin/add-backend", {"url": moving.url, "name": "moved"})
    assert added.status_code == 201, added.text
    assert gauge_names(scrape(service)) == {"stay", "moved"}
    assert admin_post(service, "/admin/remove-backend", {"name": "moved"}).status_code == 200
    again = admin_post(service, "/admin/add-backend", {"url": moving.url, "name": "moving"})
    assert again.status_code == 201, again.text
    text = scrape(service)
    assert gauge_names(text) == {"stay", "moving"}
    assert series(text, "proxy_backend_up") == [{"backend": "stay"}, {"backend": "moving"}]


def test_a_breaker_transition_after_a_rename_does_not_bring_the_old_name_back(
    make_proxy: Any,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
    tmp_path: Path,
) -> None:
    """A transition published under the name the backend had when a request began
    must not resurrect that name. Here the circuit opens after the rename."""
    dead = f"http://127.0.0.1:{closed_port()}"
    breaker = {"failure_threshold": 1, "open_duration": 60}
    path = tmp_path / "config.yaml"
    write_backends(path, [{"url": dead, "name": "old"}], circuit_breaker=breaker)
    service = make_proxy(
        [BackendConfig(dead, "old")],
        source_path=str(path),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=1, open_duration=60.0),
    )
    write_backends(path, [{"url": dead, "name": "new"}], circuit_breaker=breaker)
    assert service.reload("test").ok
    assert http.get(service.proxy_url + "/", timeout=5).status_code == 502
    text = scrape(service)
    assert gauge_names(text) == {"new"}, text
    assert value(text, "proxy_circuit_state", backend="new") == 2.0


def test_reloads_are_counted_by_result(
    make_proxy: Any, echo_backend: EchoBackend, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    listen = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}}
    path.write_text(yaml.safe_dump({**listen, "backends": [{"url": echo_backend.url}]}))
    service = make_proxy([echo_backend], source_path=str(path))
    # The file watcher may reload too, so counts are "at least"; the gauge is exact.
    path.write_text(
        yaml.safe_dump({**listen, "backends": [{"url": echo_backend.url, "weight": 2}]})
    )
    assert service.reload("test").ok
    text = scrape(service)
    assert (value(text, "proxy_config_reloads_total", result="success") or 0) >= 1
    assert value(text, "proxy_config_reloads_total", result="failure") is None
    assert value(text, "proxy_config_last_reload_successful") == 1.0
    path.write_text("backends: [{url: 'ftp://nope'}]\n")
    assert not service.reload("test").ok
    text = scrape(service)
    assert (value(text, "proxy_config_reloads_total", result="failure") or 0) >= 1
    assert value(text, "proxy_config_last_reload_successful") == 0.0


# -- promtool -------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed, so the exposition cannot be linted. Install it with: "
            "apt-get update && apt-get install -y prometheus  (.ci/run does this)"
        )
    return path


def test_promtool_check_metrics_passes(after_faults: str) -> None:
    done = subprocess.run(
        [promtool(), "check", "metrics"],
        input=after_faults,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_promtool_rejects_a_broken_exposition() -> None:
    """The check above can fail: promtool does catch what pyproxy could get wrong."""
    broken = '# TYPE proxy_requests counter\nproxy_requests{backend="a"} 1\n'
    done = subprocess.run(
        [promtool(), "check", "metrics"], input=broken, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert 'should have "_total" suffix' in done.stdout + done.stderr


# -- the deploy kit ----------------------------------------------------------------------

METRIC_NAME = re.compile(r"\b(proxy_[a-z_]+)\b")


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads((ROOT / "scripts" / "grafana-dashboard.json").read_text())
    assert dashboard.get("title") and "schemaVersion" in dashboard and dashboard.get("uid")
    assert dashboard.get("panels"), "a Grafana dashboard has panels"
    return dashboard  # type: ignore[no-any-return]


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of every panel target."""
    exprs = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            assert target.get("expr"), f"panel {panel['title']!r} has a target without expr"
            exprs.append(target["expr"])
    return exprs


def allowed_names() -> set[str]:
    names = set(DOCUMENTED)
    for name, (kind, _) in DOCUMENTED.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_dashboard_queries_only_spec_series() -> None:
    exprs = dashboard_exprs()
    variables = [v.get("definition", "") for v in load_dashboard()["templating"]["list"]]
    used = {m for expr in exprs + variables for m in METRIC_NAME.findall(expr)}
    assert used <= allowed_names(), f"not documented: {sorted(used - allowed_names())}"
    labels = {"backend", "method", "code", "reason", "scope", "result", "le", "job", "instance"}
    for expr in exprs:
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels, f"{expr}: unknown label {label}"
    joined = "\n".join(exprs)
    for needed in (
        "proxy_requests_total",
        "proxy_errors_total",
        "proxy_backend_up",
        "proxy_circuit_state",
        "proxy_backend_in_flight",
        "proxy_retries_total",
        "proxy_rate_limited_total",
        "proxy_request_duration_seconds_bucket",
    ):
        assert needed in joined, f"the dashboard has no panel on {needed}"
    for quantile in ("0.5", "0.9", "0.99"):
        assert re.search(rf"histogram_quantile\(\s*{re.escape(quantile)}\s*,", joined), quantile


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every expression, with Grafana's variables filled in, is valid PromQL."""
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1h",
        "$backend": ".*",
        "$job": "pyproxy",
        "$instance": ".*",
    }
    rules = []
    for index, expr in enumerate(dashboard_exprs()):
        for variable, replacement in substitutions.items():
            expr = expr.replace("${" + variable[1:] + "}", replacement)
            expr = expr.replace(variable, replacement)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"pyproxy:dashboard_{index}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrape_config_is_valid() -> None:
    done = subprocess.run(
        [promtool(), "check", "config", "--syntax-only", str(ROOT / "scripts" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((ROOT / "scripts" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pyproxy"].get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in jobs["pyproxy"]["static_configs"] for t in group["targets"]]
    assert "127.0.0.1:8081" in targets  # the default admin listener (admin.listen's default)
