"""The status page: `render_status()` directly, then in a real headless Chromium.

The direct tests put backends in every state a Backend can be in (health up, down
and unknown, circuit open, full, drained, rate bucket empty) on a fake clock and
read the page back cell by cell. The browser tests run a real Service with a dead
backend among live ones, load `GET /admin/status` in Chromium (`--dump-dom`, then
`--screenshot`) and check what a person would see.

Chromium is a Debian package (`apt-get update && apt-get install -y chromium`); the
CI script installs it. Without it the browser tests fail with that instruction:
they never skip silently.
"""

from __future__ import annotations

import dataclasses
import html.parser
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from backends import closed_port, wait_for
from conftest import FakeClock
from prometheus_client import CollectorRegistry

from pyproxy.config.load import parse_config
from pyproxy.config.schema import (
    Address,
    AdminConfig,
    BackendConfig,
    CircuitBreakerConfig,
    Config,
    HealthCheckConfig,
    Rate,
    RateLimitConfig,
    StickyConfig,
)
from pyproxy.ops.statuspage import CONTENT_TYPE, HEADERS, ago, render_status
from pyproxy.process.service import Service
from pyproxy.runtime.admin_changes import AdminChanges, BackendOverride
from pyproxy.runtime.snapshot import Runtime, build_runtime

HOSTILE = "<script>alert('x')</script>\"&"
HOSTILE_PREFIX = "/\"><script>alert('x')</script>&"  # a valid path prefix: printable ASCII


class PageReader(html.parser.HTMLParser):
    """Collects the text of each `<tr data-backend>` row, cell by cell, and the whole text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.text: list[str] = []
        self._row: str | None = None
        self.tags: list[str] = []
        self.pool_of: dict[str, str] = {}  # backend row -> the data-pool section it is in
        self.pools: list[str] = []  # the pool sections, in page order
        self.routes: dict[str, list[str]] = {}  # route row -> its cells
        self._section: str | None = None
        self._cells: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag == "section":
            self._section = attributes.get("data-pool")
            if self._section is not None:
                self.pools.append(self._section)
        elif tag == "tr":
            self._cells = None
            if (name := attributes.get("data-backend")) is not None:
                self._cells = self.rows[name] = []
                if self._section is not None:
                    self.pool_of[name] = self._section
            elif (name := attributes.get("data-route")) is not None:
                self._cells = self.routes[name] = []
        elif tag == "td" and self._cells is not None:
            self._cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._cells = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cells:
            self._cells[-1] = (self._cells[-1] + " " + data.strip()).strip()

    def section_text(self, page: str, pool: str) -> str:
        """The whitespace-normalised text of one pool's section of `page`."""
        start = page.index(f'<section data-pool="{pool}">')
        inner = read_page(page[start : page.index("</section>", start)])
        return " ".join(" ".join(inner.text).split())


def read_page(page: bytes | str) -> PageReader:
    reader = PageReader()
    reader.feed(page.decode() if isinstance(page, bytes) else page)
    return reader


def render(runtime: Runtime, now: float, **kw: Any) -> bytes:
    options: dict[str, Any] = {
        "now_monotonic": now, "started_at": now - 3725, "last_reload": None,
        "instance_name": "pyproxy-test",
    }  # fmt: skip
    options.update(kw)
    return render_status(runtime, **options)


# -- the function -------------------------------------------------------------------


def test_hostile_names_and_probe_details_are_escaped() -> None:
    clock = FakeClock()
    config = Config(
        backends=(
            BackendConfig("http://127.0.0.1:9001", HOSTILE),
            BackendConfig("http://127.0.0.1:9002", '"><img src=x onerror=alert(1)>'),
        )
    )
    runtime, _ = build_runtime(config, clock=clock)
    runtime.backends[0].health.record(False, "<b>bold</b> & broken", at=999.0)
    page = render(runtime, clock.now, instance_name="<i>inst</i>").decode()

    assert "<script" not in page.lower()
    assert "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;&amp;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; broken" in page
    # The parsed page shows exactly what the operator typed, as text.
    reader = read_page(page)
    assert set(reader.rows) == {HOSTILE, '"><img src=x onerror=alert(1)>'}
    assert reader.rows[HOSTILE][0].startswith(HOSTILE)
    assert reader.tags.count("img") == 0


def test_the_page_is_self_contained_and_refreshes_itself() -> None:
    runtime, _ = build_runtime(Config(backends=(BackendConfig("http://127.0.0.1:9001", "a"),)))
    page = render(runtime, 10.0).decode()
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh" content="5">' in page
    assert '<meta charset="utf-8">' in page
    lowered = page.lower()
    for external in ("<script", "<link", "src=", "href=", "@import", "url("):
        assert external not in lowered, external


def states_runtime(clock: FakeClock) -> Runtime:
    """Six backends, each in a different state, on `clock`."""
    config = Config(
        backends=(
            BackendConfig("http://127.0.0.1:9001", "fine", weight=2, max_connections=5),
            BackendConfig("http://127.0.0.1:9002", "sick"),
            BackendConfig("http://127.0.0.1:9003", "tripped"),
            BackendConfig("http://127.0.0.1:9004", "full", max_connections=1),
            BackendConfig("http://127.0.0.1:9005", "drained", weight=0),
        ),
        strategy="least_connections",
        sticky=StickyConfig(mode="cookie"),
        health_check=HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=3),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=2, open_duration=30.0),
    )
    runtime, _ = build_runtime(config, clock=clock)
    fine, sick, tripped, full, _ = runtime.backends
    fine.health.record(True, "200", at=990.0)
    fine.health.record(True, "204", at=995.0)
    for _ in range(2):
        fine.try_acquire()
    fine.release(failed=True)  # 2 requests, 1 failure, 1 in flight
    for at in (996.0, 997.0, 998.0):
        sick.health.record(False, "connect refused", at=at)
    tripped.breaker.record_failure()
    tripped.breaker.record_failure()  # opens at 1000 for 30 s
    full.try_acquire()
    # An admin-added backend: health unknown until its first passing probe.
    added, _ = build_runtime(
        config,
        previous=runtime,
        admin=AdminChanges(added=(BackendConfig("http://127.0.0.1:9006", "newcomer"),)),
        clock=clock,
    )
    return added


def test_every_fact_and_verdict_is_on_the_page() -> None:
    clock = FakeClock()
    runtime = states_runtime(clock)
    clock.now = 1003.4
    page = render(runtime, clock.now, last_reload=(False, 1003.4 - 75))
    reader = read_page(page)
    rows = reader.rows
    assert list(rows) == ["fine", "sick", "tripped", "full", "drained", "newcomer"]
    # Columns: backend, verdict, health, last probe, circuit, in flight, requests,
    # failures, weight, source.
    fine = rows["fine"]
    assert fine[0] == "fine http://127.0.0.1:9001"
    assert fine[1] == "available"
    assert fine[2] == "up streak: 2 pass, 0 fail"
    assert fine[3] == "204 8 s ago"
    assert fine[4] == "closed failures in a row: 0"
    assert fine[5:10] == ["1 / 5", "2", "1", "2", "config"]

    sick = rows["sick"]
    assert sick[1] == "unavailable health down"
    assert sick[2] == "down streak: 0 pass, 3 fail"
    assert sick[3] == "connect refused 5 s ago"

    tripped = rows["tripped"]
    assert tripped[1] == "unavailable circuit open"
    assert tripped[4] == "open reopens in 27 s failures in a row: 2"

    assert rows["full"][1] == "unavailable at max_connections (1)"
    assert rows["full"][5] == "1 / 1"
    assert rows["drained"][1] == "unavailable weight 0 (draining)"
    assert rows["drained"][5] == "0 / ∞"

    newcomer = rows["newcomer"]
    assert newcomer[1] == "unavailable health unknown"
    assert newcomer[2].startswith("unknown")
    assert newcomer[3] == "never probed"
    assert newcomer[9] == "admin"

    text = " ".join(" ".join(reader.text).split())
    assert "1 of 6 backend(s) available" in text
    assert "Strategy least_connections" in text
    assert "Sticky sessions cookie" in text
    assert "Uptime 1 h 2 min" in text
    assert "Last reload failed 1 min 15 s ago" in text


def test_the_circuit_reopening_moves_on_the_clock() -> None:
    clock = FakeClock()
    runtime = states_runtime(clock)
    clock.now = 1029.5
    row = read_page(render(runtime, clock.now)).rows["tripped"]
    assert row[4].startswith("open reopens in 1 s")
    clock.now = 1030.0  # the open period is over: trials are let through
    row = read_page(render(runtime, clock.now)).rows["tripped"]
    assert row[4].startswith("half_open")
    assert "reopens" not in row[4]
    assert row[1] == "available"


def test_checks_off_breaker_off_and_no_backends() -> None:
    config = Config(
        backends=(BackendConfig("http://127.0.0.1:9001", "a"),),
        health_check=HealthCheckConfig(enabled=False),
        circuit_breaker=CircuitBreakerConfig(enabled=False),
    )
    runtime, _ = build_runtime(config)
    row = read_page(render(runtime, 5.0)).rows["a"]
    assert row[4] == "off"
    assert row[2] == "not checked"
    assert row[3] == "checks off"
    text = " ".join(read_page(render(runtime, 5.0)).text)
    assert "Health checks off" in " ".join(text.split())

    empty, _ = build_runtime(Config(backends=()))
    page = render(empty, 5.0, last_reload=(True, 4.0)).decode()
    assert "no backends: every request routed here gets 503" in page
    assert "0 of 0 backend(s) available" in page
    assert "succeeded" in page


def test_per_backend_rate_bucket_level_and_empty_bucket_verdict() -> None:
    clock = FakeClock()
    config = Config(
        backends=(
            BackendConfig("http://127.0.0.1:9001", "a"),
            BackendConfig("http://127.0.0.1:9002", "b"),
        ),
        rate_limit=RateLimitConfig(per_backend=Rate(4, 3600.0)),  # refills too slowly to see
    )
    runtime, _ = build_runtime(config, clock=clock)
    limiter = runtime.backend_limiter
    assert limiter is not None
    for _ in range(4):
        assert limiter.take("b")
    reader = read_page(render(runtime, clock.now))
    assert reader.rows["a"][10] == "4.0 / 4"
    assert reader.rows["b"][10] == "0.0 / 4"
    assert reader.rows["b"][1] == "unavailable per-backend rate bucket empty"
    assert "Rate bucket" in " ".join(reader.text)
    # Without a per-backend limit there is no bucket column at all.
    plain, _ = build_runtime(Config(backends=config.backends))
    assert len(read_page(render(plain, 1.0)).rows["a"]) == 10


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59.9, "59 s"), (60, "1 min 0 s"), (3725, "1 h 2 min"),
     (90061, "1 d 1 h"), (-3, "0 s")],
)  # fmt: skip
def test_ago(seconds: float, text: str) -> None:
    assert ago(seconds) == text


# -- a real Service, a real browser ------------------------------------------------


def chromium() -> str:
    """The Chromium binary, or a loud failure saying how to install it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "chromium is not installed, so the status page cannot be checked in a browser. "
        "Install it with: apt-get update && apt-get install -y chromium "
        "(.ci/run does this on a fresh machine)."
    )


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def page_url(service: Service) -> str:
    """The status page URL of a Service, after checking the route answers HTML."""
    url = service.admin_url + "/admin/status"
    answer = requests.get(url, timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == CONTENT_TYPE
    return url


@pytest.fixture
def live_service(make_proxy: Any, three_backends: list[Any], http: requests.Session) -> Service:
    """Three live echo backends and one whose port refuses connections, health-checked."""
    dead = BackendConfig(f"http://127.0.0.1:{closed_port()}", "dead")
    service: Service = make_proxy(
        [*three_backends, dead],
        health_check=HealthCheckConfig(
            interval=0.2, timeout=0.5, healthy_threshold=1, unhealthy_threshold=1
        ),
    )
    assert wait_for(lambda: service.holder.runtime.find(name="dead").health.state == "down")
    for _ in range(6):
        assert http.get(service.proxy_url + "/hello", timeout=5).status_code == 200
    return service


def test_the_admin_route_serves_the_page(live_service: Service) -> None:
    answer = requests.get(page_url(live_service), timeout=5)
    for name, value in HEADERS:  # no-store, and a CSP that forbids any script
        assert answer.headers.get(name) == value, f"{name}: {answer.headers.get(name)}"
    reader = read_page(answer.text)
    assert set(reader.rows) == {"app1", "app2", "app3", "dead"}
    assert live_service.instance_name in " ".join(reader.text)


def test_chromium_renders_every_backend_with_its_state(
    live_service: Service, tmp_path: Path
) -> None:
    url = page_url(live_service)
    dom = run_chromium(tmp_path, "--dump-dom", url).stdout
    reader = read_page(dom)
    assert set(reader.rows) == {"app1", "app2", "app3", "dead"}, dom[:2000]
    for name in ("app1", "app2", "app3"):
        row = reader.rows[name]
        assert row[0].startswith(name)
        assert row[1] == "available"
        assert row[2].startswith("up")
        assert row[6] == "2"  # round robin: 6 requests over 3 live backends
    dead = reader.rows["dead"]
    assert dead[1] == "unavailable health down"
    assert dead[2].startswith("down")
    assert dead[3].startswith("connection refused")
    assert "3 of 4 backend(s) available" in " ".join(" ".join(reader.text).split())


def test_admin_overrides_and_removals_are_on_the_page() -> None:
    # An operator reading the config file must see why each of its backends is not
    # serving: drained by the admin, its weight overridden, or removed by the admin.
    config = Config(
        backends=(
            BackendConfig("http://127.0.0.1:9001", "drained", weight=2),
            BackendConfig("http://127.0.0.1:9002", "heavier"),
            BackendConfig("http://127.0.0.1:9003", "zeroed", weight=4),
            BackendConfig("http://127.0.0.1:9004", HOSTILE),
        ),
        health_check=HealthCheckConfig(enabled=False),
    )
    admin = AdminChanges(
        removed_urls=frozenset({"http://127.0.0.1:9004"}),
        overrides={
            "http://127.0.0.1:9001": BackendOverride(drain=True),
            "http://127.0.0.1:9002": BackendOverride(weight=5),
            "http://127.0.0.1:9003": BackendOverride(weight=0),
        },
    )
    runtime, _ = build_runtime(config, admin=admin)
    page = render(runtime, 10.0, admin=admin).decode()
    rows = read_page(page).rows
    assert list(rows) == ["drained", "heavier", "zeroed"]
    # Columns: backend, verdict, ..., weight (8), source.
    assert rows["drained"][1] == "unavailable drained (admin)"
    assert rows["drained"][8] == "2 drained no new requests"
    assert rows["heavier"][1] == "available"
    assert rows["heavier"][8] == "5 set by the admin configured: 1"
    assert rows["zeroed"][1] == "unavailable weight 0 (admin)"
    assert rows["zeroed"][8] == "0 set by the admin configured: 4"
    removed = page.split("<h2>Removed by the admin</h2>", 1)[1]
    assert "&lt;script&gt;" in removed and "<script" not in page.lower()
    assert "http://127.0.0.1:9004" in removed and "<td>default</td>" in removed
    # Without admin changes there is no such section.
    plain, _ = build_runtime(config)
    assert "Removed by the admin" not in render(plain, 10.0, admin=AdminChanges()).decode()


# -- pools, routes and backups through real sockets ---------------------------------


def pools_config(pools: dict[str, Any], routes: list[dict[str, Any]]) -> Config:
    """A pools file as a dict, parsed as the file would be, on port-0 listeners; health
    checks fast enough to settle in a test, per pool on top of these."""
    data = {
        "health_check": {"interval": "0.2s", "timeout": "0.5s",
                         "healthy_threshold": 1, "unhealthy_threshold": 1},
        "circuit_breaker": {"enabled": False},
        "retries": {"max_retries": 0},
        "timeouts": {"connect": "1s", "read": "2s", "total": "10s"},
        "pools": pools,
        "routes": routes,
    }  # fmt: skip
    return dataclasses.replace(
        parse_config(data, env={}),
        listen=Address("127.0.0.1", 0),
        admin=AdminConfig(listen=Address("127.0.0.1", 0), token="secret"),
    )


@pytest.fixture
def pools_service(make_echo_backend: Any, http: requests.Session) -> Iterator[Service]:
    """Two pools behind three routes (one with markup in its path prefix). `web`: two
    live backends and a live backup (standing by), one drained by the admin, plus an
    admin-added backend. `api`: a primary whose port refuses connections and a live
    backup, which is therefore serving. One file backend removed by the admin."""
    web1, web2, spare, api_spare, extra, gone = (
        make_echo_backend(n) for n in ("web1", "web2", "spare", "api-spare", "extra", "gone")
    )
    config = pools_config(
        {
            "web": {"backends": [
                {"name": "web1", "url": web1.url}, {"name": "web2", "url": web2.url},
                {"name": "spare", "url": spare.url, "backup": True},
                {"name": "gone", "url": gone.url},
            ]},
            "api": {
                "strategy": "least_connections",
                "health_check": {"path": "/ready"},
                "backends": [
                    {"name": "api-dead", "url": f"http://127.0.0.1:{closed_port()}"},
                    {"name": "api-spare", "url": api_spare.url, "backup": True},
                ],
            },
        },
        [
            {"name": "api", "match": {"host": "api.example.com", "path_prefix": "/v1"},
             "pool": "api", "strip_prefix": True},
            {"name": "site", "match": {"host": "*.example.com"}, "pool": "web"},
            {"name": "odd", "match": {"path_prefix": HOSTILE_PREFIX}, "pool": "web"},
        ],
    )  # fmt: skip
    service = Service(config, registry=CollectorRegistry())
    service.start()
    try:
        admin = requests.Session()
        admin.headers["Authorization"] = "Bearer secret"
        base = service.admin_url + "/admin/"
        # A name with markup never gets in (names label metrics and logs too); the page
        # escapes names all the same (test_hostile_names_and_probe_details_are_escaped).
        refused = admin.post(base + "add-backend", timeout=5,
                             json={"name": HOSTILE, "url": extra.url, "pool": "web"})  # fmt: skip
        assert refused.status_code == 400, refused.text
        added = admin.post(base + "add-backend", timeout=5,
                           json={"name": "extra[2]", "url": extra.url, "pool": "web"})  # fmt: skip
        assert added.status_code == 201, added.text
        drained = admin.post(base + "set-backend", json={"name": "web2", "drain": True}, timeout=5)
        assert drained.status_code == 200, drained.text
        removed = admin.post(base + "remove-backend", json={"name": "gone"}, timeout=5)
        assert removed.status_code == 200, removed.text
        runtime = service.holder.runtime

        def settled() -> bool:
            states = {b.name: b.health.state for b in service.holder.runtime.backends}
            return states.pop("api-dead") == "down" and set(states.values()) == {"up"}

        assert wait_for(settled), {b.name: b.health.state for b in runtime.backends}
        for host, path in [("www.example.com", "/")] * 4 + [("api.example.com", "/v1/x")] * 2:
            answer = http.get(service.proxy_url + path, headers={"Host": host}, timeout=5)
            assert answer.status_code == 200, answer.text
        yield service
    finally:
        service.close()


def test_pools_routes_and_backups_are_on_the_page(pools_service: Service) -> None:
    answer = requests.get(page_url(pools_service), timeout=5)
    for name, value in HEADERS:
        assert answer.headers.get(name) == value, f"{name}: {answer.headers.get(name)}"
    page = answer.text
    reader = read_page(page)
    assert reader.pools == ["web", "api"]  # one section per pool, in file order
    assert reader.pool_of == {"web1": "web", "web2": "web", "spare": "web", "extra[2]": "web",
                              "api-dead": "api", "api-spare": "api"}  # fmt: skip
    # The routes, in the order they are tried.
    assert list(reader.routes) == ["api", "site", "odd"]
    assert reader.routes["api"] == [
        "1", "api", "api.example.com", "/v1", "api", "yes /v1/x → /x upstream"
    ]  # fmt: skip
    assert reader.routes["site"] == ["2", "site", "*.example.com", "any path", "web", "no"]
    assert reader.routes["odd"] == ["3", "odd", "any host", HOSTILE_PREFIX, "web", "no"]

    rows = reader.rows
    # web: primaries serve, so its backup stands by; api's only primary is down, so
    # its backup is serving.
    assert rows["web1"][1] == "available"
    assert rows["web1"][6] == "2"  # 4 requests over web1 and the added backend
    assert rows["spare"][0].startswith("spare backup http://127.0.0.1:")
    assert rows["spare"][1] == "standing by available; a primary is serving"
    assert rows["spare"][6] == "0"
    assert rows["api-dead"][1] == "unavailable health down"
    assert rows["api-spare"][1] == "serving no primary of its pool is available"
    assert rows["api-spare"][6] == "2"
    # The admin's doings: a drain, an added backend, a removed file backend.
    assert rows["web2"][1] == "unavailable drained (admin)"
    assert rows["web2"][8] == "1 drained no new requests"
    assert rows["extra[2]"][9] == "admin"
    removed = page.split("<h2>Removed by the admin</h2>", 1)[1]
    assert '<tr data-removed="gone">' in removed and "<td>web</td>" in removed

    # Each pool's own settings: api's health path and strategy are its own.
    web_text, api_text = (reader.section_text(page, p) for p in ("web", "api"))
    assert "Strategy round_robin" in web_text and "on /health" in web_text
    assert "Strategy least_connections" in api_text
    assert "Health checks every 0.2 s on /ready" in api_text
    assert "serving from backups: no primary is available" in api_text
    assert "Routes here api" in api_text and "Routes here site" in web_text
    text = " ".join(" ".join(reader.text).split())
    assert "4 of 6 backend(s) available in 2 pool(s)" in text
    assert "Serving from backups in pool(s) api: no primary backend is available" in text

    # The file's route prefix is text, never markup.
    assert "<script" not in page.lower()
    assert "/&quot;&gt;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in page
    assert "Routes here site, odd" in web_text


def test_a_pool_with_no_backend_available_is_called_out() -> None:
    config = pools_config(
        {
            "web": {"backends": [{"name": "w", "url": "http://127.0.0.1:9001"}]},
            "api": {"backends": [{"name": "a", "url": "http://127.0.0.1:9002", "weight": 0},
                                 {"name": "b", "url": "http://127.0.0.1:9003",
                                  "backup": True, "weight": 0}]},
        },
        [{"name": "all", "pool": "web"}],
    )  # fmt: skip
    runtime, _ = build_runtime(config)
    runtime.pools["web"].backends[0].health.record(True, "200", at=1.0)
    page = render(runtime, 10.0).decode()
    text = " ".join(" ".join(read_page(page).text).split())
    assert "No backend available in pool(s) api: their requests get 503" in text
    api_text = read_page(page).section_text(page, "api")
    assert "unavailable no backend available: requests get 503" in api_text
    assert "Routes here none (no request comes here)" in api_text
    rows = read_page(page).rows
    assert rows["b"][1] == "unavailable weight 0 (draining)"  # a backup down is just down
    assert read_page(page).routes["all"] == ["1", "all", "any host", "any path", "web", "no"]


def test_chromium_screenshot_of_the_status_page(pools_service: Service, tmp_path: Path) -> None:
    url = page_url(pools_service)
    shot = tmp_path / "status.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1000", url)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (1200, 1000)
    assert len(data) > 20_000, "a blank page compresses to almost nothing"
