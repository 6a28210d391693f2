"""Route matching through the real proxy: every rule and its boundary, on real sockets.

tests/test_routes.py proves the matcher on strings; this file sends the bytes a client
would send (raw targets included) to a running pyproxy and reads, from the echo
backend that got the request, which pool it reached and which target it was sent.
The rules:

- `host` is compared case-insensitively with the port ignored; `*.example.com` takes
  exactly one more label (Caddy's rule); an absolute-form target's authority is the
  host, whatever Host says (RFC 9112, 3.2.2); an HTTP/1.0 request without Host has
  only host-less routes to go to.
- `path_prefix` is compared with the raw path, never percent-decoded, on a segment
  boundary (`/v1` takes `/v1`, `/v1/`, `/v1/x`, `/v1?q=1`, never `/v1x`).
- Routes are tried in file order and the first that matches wins; no match is a 404.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from backends import EchoBackend, wait_for
from conftest import (
    ProxyFactory,
    admin_reload,
    metric_samples,
    metric_value,
    replace_file,
    run_to_end,
)
from rawhttp import exchange, request_bytes

from pyproxy.config.load import parse_config
from pyproxy.process.service import Service

WAIT = 10.0  # generous bound for anything that happens in the background

# Each pool has one echo backend named after it, so X-Backend names the pool reached.
MATCHING_ROUTES: list[dict[str, Any]] = [
    {
        "name": "api",
        "match": {"host": "api.example.com", "path_prefix": "/v1"},
        "pool": "api",
        "strip_prefix": True,
    },
    {"name": "a-only", "match": {"host": "a.example.com", "path_prefix": "/only-a"}, "pool": "a"},
    {"name": "sites", "match": {"host": "*.example.com"}, "pool": "web"},
    {"name": "loopback6", "match": {"host": "[::1]"}, "pool": "v6"},
    {"name": "static", "match": {"path_prefix": "/static"}, "pool": "static"},
]  # no catch-all: a request none of these takes is a 404


def start_routed(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    pools: list[str],
    routes: list[dict[str, Any]],
) -> tuple[Service, dict[str, EchoBackend]]:
    """A proxy with one echo backend per pool (named after it) and these routes,
    parsed as the file would be, on the test listeners."""
    backends = {pool: make_echo_backend(pool) for pool in pools}
    parsed = parse_config(
        {
            "health_check": {"enabled": False},
            "circuit_breaker": {"enabled": False},
            "retries": {"max_retries": 0},
            "pools": {
                pool: {"backends": [{"url": b.url, "name": pool}]} for pool, b in backends.items()
            },
            "routes": routes,
        },
        env={},
    )
    proxy = make_proxy(
        parsed.backends,
        declared_pools=parsed.declared_pools,
        declared_routes=parsed.declared_routes,
    )
    return proxy, backends


@pytest.fixture
def routed(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> tuple[Service, dict[str, EchoBackend]]:
    return start_routed(
        make_proxy, make_echo_backend, ["api", "a", "web", "v6", "static"], MATCHING_ROUTES
    )


def every_received(backends: dict[str, EchoBackend]) -> list[tuple[str, str]]:
    """(pool, target) of every request any backend received, pool by pool."""
    return [(pool, r.target) for pool, b in backends.items() for r in b.requests()]


# (request line target, Host header or None, pool that must get it or None for a 404,
#  the target that pool's backend must receive)
CASES = [
    # path_prefix on a segment boundary, with strip_prefix on the api route
    ("/v1", "api.example.com", "api", "/"),
    ("/v1/", "api.example.com", "api", "/"),
    ("/v1/x", "api.example.com", "api", "/x"),
    ("/v1/users", "api.example.com", "api", "/users"),
    ("/v1?q=1", "api.example.com", "api", "/?q=1"),
    ("/v1?x=1", "api.example.com", "api", "/?x=1"),
    ("/v1/users?id=7&x=/v1", "api.example.com", "api", "/users?id=7&x=/v1"),
    # not under /v1: the next route (the wildcard) takes them, unrewritten
    ("/v1x", "api.example.com", "web", "/v1x"),
    ("/v1%2Fx", "api.example.com", "web", "/v1%2Fx"),  # never percent-decoded
    ("/V1/x", "api.example.com", "web", "/V1/x"),  # paths are case-sensitive
    # host: case-insensitive, port ignored, the final dot of a FQDN ignored
    ("/only-a/x", "A.EXAMPLE.COM:8080", "a", "/only-a/x"),
    ("/only-a/x", "b.example.com", "web", "/only-a/x"),
    ("/v1/x", "API.EXAMPLE.COM:8080", "api", "/x"),
    ("/v1/x", "api.example.com.", "api", "/x"),
    # *.example.com: exactly one more label
    ("/", "a.example.com", "web", "/"),
    ("/", "example.com", None, ""),
    ("/", "a.b.example.com", None, ""),
    ("/", "aexample.com", None, ""),
    # both host and path_prefix given: both must match
    ("/v1/x", "other.org", None, ""),
    # an IPv6 literal, with and without a port
    ("/a", "[::1]:8080", "v6", "/a"),
    ("/a", "[::1]", "v6", "/a"),
    # a host-less route takes any host, on its path
    ("/static/app.js", "other.org", "static", "/static/app.js"),
    ("/staticx", "other.org", None, ""),
]


def assert_routed(
    proxy: Service,
    backends: dict[str, EchoBackend],
    target: str,
    host: str,
    pool: str | None,
    upstream: str,
) -> None:
    """One GET of `target` with `host`: it reaches `pool`'s backend as `upstream`, or
    (pool None) no route takes it: a 404 counted as no_route, and no backend saw it."""
    response = exchange(proxy.proxy_url, request_bytes("GET", target, host=host))
    if pool is None:
        assert response.status == 404, response.body
        assert every_received(backends) == []
        assert metric_value(proxy, "proxy_errors_total", reason="no_route") == 1
    else:
        assert response.status == 200, response.body
        assert response.header("X-Backend") == pool
        assert every_received(backends) == [(pool, upstream)]


@pytest.mark.parametrize(("target", "host", "pool", "upstream"), CASES)
def test_each_request_reaches_the_pool_of_the_first_matching_route(
    routed: tuple[Service, dict[str, EchoBackend]],
    target: str,
    host: str,
    pool: str | None,
    upstream: str,
) -> None:
    assert_routed(*routed, target, host, pool, upstream)


ABSOLUTE_CASES = [
    # the target's authority wins over Host, in both directions
    ("http://api.example.com/v1/x", "other.org", "api", "/x"),
    ("http://other.org/v1/x", "api.example.com", None, ""),
    ("http://API.Example.COM:8080/v1?x=1", "other.org", "api", "/?x=1"),
    ("HTTP://api.example.com/v1/users", "other.org", "api", "/users"),
    # an empty path is "/" (RFC 9110, 4.2.3), which is not under /v1
    ("http://api.example.com", "other.org", "web", "/"),
    ("http://api.example.com?q=1", "other.org", "web", "/?q=1"),
    ("http://[::1]:8080/a", "api.example.com", "v6", "/a"),
    ("http://a.b.example.com/", "a.example.com", None, ""),
]


@pytest.mark.parametrize(("target", "host", "pool", "upstream"), ABSOLUTE_CASES)
def test_an_absolute_form_targets_authority_is_the_host_routes_see(
    routed: tuple[Service, dict[str, EchoBackend]],
    target: str,
    host: str,
    pool: str | None,
    upstream: str,
) -> None:
    assert_routed(*routed, target, host, pool, upstream)


def test_http_1_0_without_host_reaches_only_host_less_routes(
    routed: tuple[Service, dict[str, EchoBackend]],
) -> None:
    proxy, backends = routed
    no_host = request_bytes("GET", "/static/a.css", host=None, version="HTTP/1.0")
    response = exchange(proxy.proxy_url, no_host)
    assert response.status == 200, response.body
    assert response.header("X-Backend") == "static"
    assert every_received(backends) == [("static", "/static/a.css")]

    # The api route needs host api.example.com: a request without one is not its.
    response = exchange(
        proxy.proxy_url, request_bytes("GET", "/v1/x", host=None, version="HTTP/1.0")
    )
    assert response.status == 404, response.body
    assert every_received(backends) == [("static", "/static/a.css")]


def test_first_match_in_file_order_wins_whatever_the_kind_of_route(
    make_proxy: ProxyFactory, make_echo_backend: Callable[[str], EchoBackend]
) -> None:
    routes: list[dict[str, Any]] = [
        {"name": "wild-a", "match": {"host": "*.example.com", "path_prefix": "/a"}, "pool": "p1"},
        {"name": "exact", "match": {"host": "h.example.com"}, "pool": "p2"},
        {"name": "path-a", "match": {"path_prefix": "/a"}, "pool": "p3"},
        {"name": "all", "pool": "p4"},
        {"name": "never", "match": {"host": "h.example.com"}, "pool": "p5"},  # shadowed
    ]
    proxy, backends = start_routed(
        make_proxy, make_echo_backend, ["p1", "p2", "p3", "p4", "p5"], routes
    )
    expected = [
        ("h.example.com", "/a/b", "p1"),  # the wildcard is earlier than the exact host
        ("h.example.com", "/b", "p2"),
        ("other.org", "/a", "p3"),
        ("other.org", "/ab", "p4"),
        ("x.example.com", "/b", "p4"),
        ("H.Example.Com:1", "/c", "p2"),
    ]
    for host, target, pool in expected:
        response = exchange(proxy.proxy_url, request_bytes("GET", target, host=host))
        assert (host, target, response.header("X-Backend")) == (host, target, pool)
    assert backends["p5"].requests() == []
    counted = {
        (s.labels["route"], s.labels["pool"]): s.value
        for s in metric_samples(proxy)
        if s.name == "proxy_route_requests_total"
    }
    assert counted == {
        ("wild-a", "p1"): 1,
        ("exact", "p2"): 2,
        ("path-a", "p3"): 1,
        ("all", "p4"): 2,
    }


def test_no_route_is_a_one_line_404_counted_as_no_route(
    routed: tuple[Service, dict[str, EchoBackend]],
) -> None:
    proxy, backends = routed
    for count in (1, 2):
        raw = request_bytes("GET", "/v1/x?secret=1", host="Other.ORG:81")
        response = exchange(proxy.proxy_url, raw)
        assert response.status == 404
        assert response.header("Content-Type") == "text/plain; charset=utf-8"
        assert response.body == b"404 Not Found: no route for other.org/v1/x\n"  # no query
        assert metric_value(proxy, "proxy_errors_total", reason="no_route") == count
    assert every_received(backends) == []
    assert metric_value(
        proxy, "proxy_requests_total", backend="", pool="", method="GET", code="404"
    ) == 2  # fmt: skip
    assert [s for s in metric_samples(proxy) if s.name == "proxy_route_requests_total"] == []


def test_route_requests_are_counted_per_route_and_pool_with_exactly_those_labels(
    routed: tuple[Service, dict[str, EchoBackend]],
) -> None:
    proxy, _ = routed
    sent = [("api.example.com", "/v1/a")] * 3 + [("a.example.com", "/")] * 2
    sent += [("[::1]", "/"), ("other.org", "/static/x"), ("other.org", "/nothing")]
    for host, target in sent:
        exchange(proxy.proxy_url, request_bytes("GET", target, host=host))
    samples = [s for s in metric_samples(proxy) if s.name == "proxy_route_requests_total"]
    assert {frozenset(s.labels.items()): s.value for s in samples} == {
        frozenset({"route": "api", "pool": "api"}.items()): 3,
        frozenset({"route": "sites", "pool": "web"}.items()): 2,
        frozenset({"route": "loopback6", "pool": "v6"}.items()): 1,
        frozenset({"route": "static", "pool": "static"}.items()): 1,
    }


def test_the_explain_header_names_the_route_and_the_pool(
    routed: tuple[Service, dict[str, EchoBackend]],
) -> None:
    proxy, backends = routed
    ask = [("X-PyProxy-Explain", "1")]
    response = exchange(
        proxy.proxy_url, request_bytes("GET", "/v1/x", host="api.example.com", headers=ask)
    )
    assert response.status == 200
    explained = response.header("X-PyProxy-Explain") or ""
    assert explained.startswith("route=api pool=api; "), explained
    assert "api" in explained.split("->")[0]
    assert backends["api"].requests()[-1].header("X-PyProxy-Explain") is None

    response = exchange(
        proxy.proxy_url, request_bytes("GET", "/static/a", host="z.org", headers=ask)
    )
    assert (response.header("X-PyProxy-Explain") or "").startswith("route=static pool=static; ")


def test_a_routes_reload_applies_live_without_failing_a_request(
    tmp_path: Path,
    start_service: Callable[[Path], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    """4 clients GET /v1/x on keep-alive connections; halfway, the file sends /v1 to
    another pool (and drops the old one) and POST /admin/reload applies it. No request
    fails, and every request sent after the reload answered goes to the new pool."""
    old, new = make_echo_backend("old1"), make_echo_backend("new1")
    path = tmp_path / "pyproxy.yaml"

    def document(pools: dict[str, EchoBackend]) -> str:
        return yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": "127.0.0.1:0", "token": "secret"},
                "health_check": {"enabled": False},
                "circuit_breaker": {"enabled": False},
                "retries": {"max_retries": 0},
                "pools": {
                    name: {"backends": [{"url": b.url, "name": b.name}]}
                    for name, b in pools.items()
                },
                "routes": [
                    {"name": "v1", "match": {"path_prefix": "/v1"}, "pool": next(iter(pools))}
                ],
            }
        )

    path.write_text(document({"old": old}), encoding="utf-8")
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()  # the admin API's reload is the only one

    clients, least, most = 4, 100, 1000
    reloaded = threading.Event()
    done = [0] * clients
    errors: list[str] = []
    after_reload: list[str] = []  # X-Backend of requests sent after the reload answered

    def client(index: int) -> None:
        with requests.Session() as session:
            session.trust_env = False
            for sent in range(most):
                after = reloaded.is_set()
                try:
                    response = session.get(
                        service.proxy_url + "/v1/x", headers={"Host": "h"}, timeout=WAIT
                    )
                except requests.RequestException as exc:
                    errors.append(repr(exc))
                    continue
                finally:
                    done[index] += 1
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text.strip()}")
                elif after:
                    after_reload.append(response.headers["X-Backend"])
                if sent + 1 >= least and reloaded.is_set():
                    return

    threads = [
        threading.Thread(target=client, args=(i,), name=f"client{i}") for i in range(clients)
    ]
    runner = threading.Thread(target=run_to_end, args=(threads, 60.0), name="load")
    runner.start()
    try:
        assert wait_for(lambda: min(done) >= 20, timeout=WAIT), done
        replace_file(path, document({"new": new}))
        answer = admin_reload(http, service, "secret")
        assert answer.status_code == 200, answer.text
        reloaded.set()
        probe = http.get(service.proxy_url + "/v1/x", headers={"Host": "h"}, timeout=WAIT)
        assert probe.headers["X-Backend"] == "new1"  # the very next request
    finally:
        reloaded.set()
        runner.join(timeout=90.0)
    assert not runner.is_alive()
    assert errors == []
    assert all(count >= least for count in done), done
    assert old.requests() and after_reload and set(after_reload) == {"new1"}
    assert new.requests()[-1].target == "/v1/x"
    assert metric_value(service, "proxy_route_requests_total", route="v1", pool="new") == len(
        new.requests()
    )


def test_a_request_waiting_through_a_reload_that_drops_its_pool_follows_the_new_route(
    tmp_path: Path,
    start_service: Callable[[Path], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
    busy_switching: None,
) -> None:
    """Each reload sends /v1 to the other pool and drops the one it left. A request
    that matched its route just before a swap finds that pool's backends removed;
    it must go where the new routes send it, not answer 503 "old1 removed"."""
    backends = {"old": make_echo_backend("old1"), "new": make_echo_backend("new1")}
    path = tmp_path / "pyproxy.yaml"

    def document(pool: str) -> str:
        backend = backends[pool]
        return yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": "127.0.0.1:0", "token": "secret"},
                "health_check": {"enabled": False},
                "circuit_breaker": {"enabled": False},
                "retries": {"max_retries": 0},
                "pools": {pool: {"backends": [{"url": backend.url, "name": backend.name}]}},
                "routes": [{"name": "v1", "match": {"path_prefix": "/v1"}, "pool": pool}],
            }
        )

    path.write_text(document("old"), encoding="utf-8")
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()  # the admin API's reloads are the only ones
    stop = threading.Event()
    errors: list[str] = []
    answered = [0] * 4

    def client(index: int) -> None:
        with requests.Session() as session:
            session.trust_env = False
            for _ in range(5000):
                if stop.is_set():
                    return
                response = session.get(service.proxy_url + "/v1/x", timeout=WAIT)
                answered[index] += 1
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text.strip()}")

    threads = [threading.Thread(target=client, args=(i,), name=f"client{i}") for i in range(4)]
    runner = threading.Thread(target=run_to_end, args=(threads, 60.0), name="load")
    runner.start()
    try:
        assert wait_for(lambda: min(answered) >= 1, timeout=WAIT), answered
        for reload in range(40):
            replace_file(path, document("new" if reload % 2 == 0 else "old"))
            answer = admin_reload(http, service, "secret")
            assert answer.status_code == 200, answer.text
    finally:
        stop.set()
        runner.join(timeout=90.0)
    assert not runner.is_alive()
    assert errors == []
    assert backends["old"].requests() and backends["new"].requests()
