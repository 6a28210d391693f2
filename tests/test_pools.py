"""Pools and routes in the running proxy: real sockets, two pools of echo backends.

Routes pick a pool by host and path; everything after that (selection, backups,
retries, breaker verdicts, health checks, metric labels) happens inside that pool.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import yaml
from backends import EchoBackend
from conftest import admin_get, metric_value
from prometheus_client import CollectorRegistry
from rawhttp import RawClient

from pyproxy.config.load import load_config, parse_config
from pyproxy.config.schema import Address, AdminConfig, BackendConfig, Config
from pyproxy.observe.metrics import Metrics
from pyproxy.process.service import Service
from pyproxy.runtime.admin_changes import AdminChanges
from pyproxy.runtime.snapshot import RuntimeHolder, build_runtime
from pyproxy.runtime.state_file import load_state, save_state
from pyproxy.runtime.swap import RuntimeSwap

WAIT = 10.0  # generous bound for anything that happens in the background


def entry(backend: EchoBackend | str, name: str | None = None, **extra: Any) -> dict[str, Any]:
    url = backend if isinstance(backend, str) else backend.url
    label = name or (backend if isinstance(backend, str) else backend.name)
    return {"url": url, "name": label, **extra}


def pools_config(pools: dict[str, Any], routes: list[dict[str, Any]], **top: Any) -> Config:
    """A pools file as a dict, parsed like the file would be, on port-0 listeners."""
    data: dict[str, Any] = {
        "health_check": {"enabled": False},
        "circuit_breaker": {"enabled": False},
        "retries": {"max_retries": 0},
        "timeouts": {"connect": "1s", "read": "2s", "total": "10s"},
        **top,
        "pools": pools,
        "routes": routes,
    }
    config = parse_config(data, env={})
    return dataclasses.replace(
        config,
        listen=Address("127.0.0.1", 0),
        admin=AdminConfig(listen=Address("127.0.0.1", 0), token="secret"),
    )


@pytest.fixture
def start_pools() -> Iterator[Callable[[Config], Service]]:
    services: list[Service] = []

    def start(config: Config) -> Service:
        service = Service(config, registry=CollectorRegistry())
        services.append(service)
        service.start()
        return service

    yield start
    for service in services:
        service.close()


def dead_url() -> str:
    """A 127.0.0.1 port nothing listens on (connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def get(
    http: requests.Session, service: Service, path: str, host: str, **headers: str
) -> requests.Response:
    return http.get(service.proxy_url + path, headers={"Host": host, **headers}, timeout=WAIT)


def two_pools(web: list[EchoBackend], api: list[EchoBackend], **top: Any) -> Config:
    return pools_config(
        {
            "web": {"backends": [entry(b) for b in web]},
            "api": {"backends": [entry(b) for b in api]},
        },
        [
            {
                "name": "api",
                "match": {"host": "api.example.com", "path_prefix": "/v1"},
                "pool": "api",
                "strip_prefix": True,
            },
            {"name": "site", "match": {"host": "*.example.com"}, "pool": "web"},
        ],
        **top,
    )


def test_routes_send_each_request_to_its_pool_and_strip_the_prefix(
    start_pools: Callable[[Config], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    web1, web2, api1 = (make_echo_backend(n) for n in ("web1", "web2", "api1"))
    proxy = start_pools(two_pools([web1, web2], [api1]))

    seen = {get(http, proxy, "/", "www.example.com").headers["X-Backend"] for _ in range(4)}
    assert seen == {"web1", "web2"}  # round robin inside the web pool only

    response = get(http, proxy, "/v1/users?id=7", "API.example.com:8080")
    assert response.status_code == 200
    assert response.headers["X-Backend"] == "api1"
    assert api1.received[-1].target == "/users?id=7"
    get(http, proxy, "/v1", "api.example.com")
    assert api1.received[-1].target == "/"
    # Not under /v1 on a segment boundary: the wildcard route takes it, unrewritten.
    response = get(http, proxy, "/v1x", "api.example.com")
    assert response.headers["X-Backend"] in ("web1", "web2")
    assert len(api1.received) == 2

    # An absolute-form target's authority is the host, whatever Host says.
    with RawClient.to(proxy.proxy_url) as client:
        client.send(b"GET http://api.example.com/v1/abs HTTP/1.1\r\nHost: other.org\r\n\r\n")
        raw = client.read_response()
    assert raw.status == 200 and raw.header("X-Backend") == "api1"
    assert api1.received[-1].target == "/abs"


def test_no_route_is_a_404_counted_as_no_route(
    start_pools: Callable[[Config], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    web1, api1 = make_echo_backend("web1"), make_echo_backend("api1")
    proxy = start_pools(two_pools([web1], [api1]))

    response = get(http, proxy, "/a/b?q=1", "Other.ORG")
    assert response.status_code == 404
    assert response.text.strip() == "404 Not Found: no route for other.org/a/b"
    assert not web1.received and not api1.received
    assert metric_value(proxy, "proxy_errors_total", reason="no_route") == 1
    assert metric_value(
        proxy, "proxy_requests_total", backend="", pool="", method="GET", code="404"
    ) == 1  # fmt: skip

    get(http, proxy, "/v1/x", "api.example.com")
    get(http, proxy, "/", "www.example.com")
    get(http, proxy, "/", "www.example.com")
    assert metric_value(proxy, "proxy_route_requests_total", route="api", pool="api") == 1
    assert metric_value(proxy, "proxy_route_requests_total", route="site", pool="web") == 2
    assert metric_value(
        proxy, "proxy_requests_total", backend="api1", pool="api", method="GET", code="200"
    ) == 1  # fmt: skip
    for gauge in ("proxy_backend_up", "proxy_circuit_state", "proxy_backend_in_flight"):
        assert metric_value(proxy, gauge, backend="web1", pool="web") is not None, gauge
        assert metric_value(proxy, gauge, backend="api1", pool="api") is not None, gauge


def test_retries_and_breaker_settings_stay_inside_the_pool(
    start_pools: Callable[[Config], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    """The api pool retries 503 twice and never reaches into the web pool; its breaker
    counts 500 as a failure (its own failure_statuses), the web pool's does not."""
    web1, api1 = make_echo_backend("web1"), make_echo_backend("api1")
    config = pools_config(
        {
            "web": {"backends": [entry(web1)]},
            "api": {
                "backends": [entry(api1)],
                "retries": {"max_retries": 2},
                "circuit_breaker": {
                    "enabled": True,
                    "failure_threshold": 1,
                    "failure_statuses": [500],
                    "open_duration": "60s",
                },
            },
        },
        [{"match": {"path_prefix": "/api"}, "pool": "api", "strip_prefix": True}, {"pool": "web"}],
    )
    proxy = start_pools(config)

    response = get(http, proxy, "/api/status/503", "x")
    assert response.status_code == 503
    assert [r.target for r in api1.received] == ["/status/503"] * 3
    assert not web1.received
    assert metric_value(proxy, "proxy_retries_total", backend="api1", pool="api") == 2

    assert get(http, proxy, "/status/500", "x").status_code == 500  # web: no breaker
    assert get(http, proxy, "/api/status/500", "x").status_code == 500  # opens api1's
    assert get(http, proxy, "/api/", "x").status_code == 503  # no backend in the pool
    assert get(http, proxy, "/", "x").headers["X-Backend"] == "web1"
    assert metric_value(proxy, "proxy_circuit_opens_total", backend="api1", pool="api") == 1


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_backup_serves_only_while_the_others_are_out_and_hands_back(
    start_pools: Callable[[Config], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    """Circuit open on the primary: the backup takes over; the circuit closes again
    after its trial request: the primary serves again."""
    main, spare = make_echo_backend("main"), make_echo_backend("spare")
    config = pools_config(
        {
            "web": {
                "backends": [entry(main), entry(spare, backup=True)],
                "circuit_breaker": {
                    "enabled": True,
                    "failure_threshold": 1,
                    "open_duration": "0.3s",
                },
            },
        },
        [{"pool": "web"}],
    )
    proxy = start_pools(config)
    assert {get(http, proxy, "/", "x").headers["X-Backend"] for _ in range(4)} == {"main"}

    assert get(http, proxy, "/status/503", "x").status_code == 503  # opens main's circuit
    assert get(http, proxy, "/", "x").headers["X-Backend"] == "spare"
    explained = get(http, proxy, "/", "x", **{"X-PyProxy-Explain": "1"})
    assert explained.headers["X-PyProxy-Explain"].startswith(
        "route=routes[0] pool=web; strategy=round_robin; #1 spare by round_robin, skipped main"
    )

    # Once the open period ends, main gets the trial request and takes over again.
    wait_for(lambda: get(http, proxy, "/", "x").headers["X-Backend"] == "main")
    assert {get(http, proxy, "/", "x").headers["X-Backend"] for _ in range(4)} == {"main"}


def test_health_checks_use_each_pools_settings_and_wake_its_backup(
    start_pools: Callable[[Config], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    """The api pool probes /hc (its own setting); the web pool checks nothing. Its
    dead primary goes down by health, and the backup takes the requests."""
    web1, spare = make_echo_backend("web1"), make_echo_backend("spare")
    config = pools_config(
        {
            "web": {"backends": [entry(web1)]},
            "api": {
                "backends": [entry(dead_url(), "gone"), entry(spare, backup=True)],
                "health_check": {
                    "enabled": True,
                    "path": "/hc",
                    "interval": "0.2s",
                    "unhealthy_threshold": 1,
                },
            },
        },
        [{"match": {"host": "api.test"}, "pool": "api"}, {"pool": "web"}],
    )
    proxy = start_pools(config)
    gone = proxy.holder.runtime.find(name="gone")
    assert gone is not None
    wait_for(lambda: not gone.health.up)

    assert get(http, proxy, "/x", "api.test").headers["X-Backend"] == "spare"
    assert any(r.target == "/hc" for r in spare.received)  # probed with the pool's path
    assert get(http, proxy, "/", "www.test").headers["X-Backend"] == "web1"
    assert not [r for r in web1.received if r.target in ("/hc", "/health")]


def test_reload_keeps_a_backend_that_stays_in_its_pool_and_renews_one_that_moves() -> None:
    stay = {"url": "http://127.0.0.1:9101", "name": "stay"}
    move = {"url": "http://127.0.0.1:9102", "name": "move"}
    before = pools_config({"a": {"backends": [stay, move]}, "b": {"backends": []}}, [{"pool": "a"}])
    after = pools_config({"a": {"backends": [stay]}, "b": {"backends": [move]}}, [{"pool": "b"}])
    first, _ = build_runtime(before)
    second, gone = build_runtime(after, previous=first)

    assert second.find(name="stay") is first.find(name="stay")
    assert second.find(name="move") is not first.find(name="move")
    assert gone == [first.find(name="move")]
    assert second.pool_name(second.find(name="move")) == "b"  # type: ignore[arg-type]


def test_add_backend_names_its_pool_when_there_are_several() -> None:
    config = pools_config({"a": {"backends": []}, "b": {"backends": []}}, [{"pool": "a"}])
    runtime, _ = build_runtime(config)
    swap = RuntimeSwap(RuntimeHolder(runtime), Metrics())
    newcomer = BackendConfig(url="http://127.0.0.1:9103", name="new")
    with pytest.raises(ValueError, match="'pool' is required"):
        swap.add_backend(newcomer)
    with pytest.raises(ValueError, match="unknown pool"):
        swap.add_backend(newcomer, "nope")
    added = swap.add_backend(newcomer, "b")
    assert swap.holder.runtime.pool_name(added) == "b"
    assert [b.name for b in swap.holder.runtime.pools["b"].backends] == ["new"]


def test_admin_backends_lists_pools_and_routes(
    start_pools: Callable[[Config], Service],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    web1, api1 = make_echo_backend("web1"), make_echo_backend("api1")
    proxy = start_pools(two_pools([web1], [api1]))
    listing = admin_get(proxy, "/admin/backends").json()
    assert [(b["name"], b["pool"], b["backup"]) for b in listing["backends"]] == [
        ("web1", "web", False),
        ("api1", "api", False),
    ]
    assert listing["pools"] == {"web": {"strategy": "round_robin"},
                                "api": {"strategy": "round_robin"}}  # fmt: skip
    assert listing["routes"][0] == {
        "name": "api",
        "match": {"host": "api.example.com", "path_prefix": "/v1"},
        "pool": "api",
        "strip_prefix": True,
    }
    assert listing["strategy"] == "round_robin"


def parse_file(path: Any) -> Config:
    return load_config(str(path))


def admin_post(service: Service, path: str, payload: dict[str, Any]) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False
        return session.post(
            service.admin_url + path,
            json=payload,
            headers={"Authorization": "Bearer secret"},
            timeout=WAIT,
        )


def test_add_backend_through_the_admin_api_takes_a_pool(
    start_pools: Callable[[Config], Service],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    web1, api1, api2 = (make_echo_backend(n) for n in ("web1", "api1", "api2"))
    proxy = start_pools(two_pools([web1], [api1]))

    missing = admin_post(proxy, "/admin/add-backend", {"url": api2.url, "name": "api2"})
    assert missing.status_code == 400 and "'pool' is required" in missing.text
    unknown = admin_post(proxy, "/admin/add-backend", entry(api2) | {"pool": "nope"})
    assert unknown.status_code == 400 and "unknown pool" in unknown.text

    added = admin_post(proxy, "/admin/add-backend", entry(api2) | {"pool": "api"})
    assert added.status_code == 201, added.text
    assert added.json()["pool"] == "api"
    seen = {get(http, proxy, "/v1/", "api.example.com").headers["X-Backend"] for _ in range(4)}
    assert seen == {"api1", "api2"}
    assert {get(http, proxy, "/", "www.example.com").headers["X-Backend"] for _ in range(3)} == {
        "web1"
    }


def test_a_reload_applies_new_routes_and_keeps_state_of_backends_that_stay(
    tmp_path: Any,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    web1, api1 = make_echo_backend("web1"), make_echo_backend("api1")
    path = tmp_path / "pyproxy.yaml"

    def write(routes: list[dict[str, Any]]) -> None:
        document = {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "health_check": {"enabled": False},
            "pools": {"web": {"backends": [entry(web1)]}, "api": {"backends": [entry(api1)]}},
            "routes": routes,
        }
        path.write_text(yaml.safe_dump(document), encoding="utf-8")

    write([{"name": "all", "pool": "web"}])
    service = Service(parse_file(path), registry=CollectorRegistry())
    service.start()
    try:
        assert service.watcher is not None
        service.watcher.stop()  # the reload below is the only one
        before = service.holder.runtime.find(name="web1")
        assert get(http, service, "/v1/x", "h").headers["X-Backend"] == "web1"
        write([{"name": "api", "match": {"path_prefix": "/v1"}, "pool": "api"},
               {"name": "all", "pool": "web"}])  # fmt: skip
        assert service.reload("test").ok
        assert get(http, service, "/v1/x", "h").headers["X-Backend"] == "api1"
        assert get(http, service, "/", "h").headers["X-Backend"] == "web1"
        assert service.holder.runtime.find(name="web1") is before
        assert metric_value(service, "proxy_route_requests_total", route="api", pool="api") == 1
    finally:
        service.close()


def test_the_pool_of_an_admin_added_backend_survives_a_restart(tmp_path: Any) -> None:
    state = str(tmp_path / "state.json")
    added = BackendConfig(url="http://127.0.0.1:9104", name="kept")
    save_state(state, AdminChanges(added=(added,), added_pools=((added.url, "b"),)))
    restored = load_state(state)
    config = pools_config({"a": {"backends": []}, "b": {"backends": []}}, [{"pool": "a"}])
    runtime, _ = build_runtime(config, admin=restored)
    assert [b.name for b in runtime.pools["b"].backends] == ["kept"]
