"""The admin API: tokens, add/remove/list backends, refused URLs, the state file.

Every test goes through real sockets: echo backends <- a real pyproxy on port 0 <- a
real client on the admin listener. "Receives traffic" and "no new requests reach it"
are read from the echo backends' own records of what crossed the wire.
See docs/admin-api.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from backends import EchoBackend, closed_port, wait_for
from conftest import (
    ProxyFactory,
    admin_backends,
    assert_finished_whole,
    metric_samples,
    replace_file,
    served_by,
)
from prometheus_client import CollectorRegistry

from pyproxy.config.load import ConfigError, load_config
from pyproxy.config.schema import (
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    HealthCheckConfig,
)
from pyproxy.pool import urlguard
from pyproxy.process.service import Service

TOKEN = "t0ken-for-tests"
ADMIN = AdminConfig(listen=Address("127.0.0.1", 0), token=TOKEN)

BACKEND_FIELDS = {
    "name",
    "url",
    "weight",
    "source",
    "healthy",
    "circuit",
    "available",
    "in_flight",
    "max_connections",
    "requests_total",
    "failures_total",
}


def post(
    http: requests.Session,
    service: Service,
    path: str,
    body: object = None,
    token: str | None = TOKEN,
    raw: bytes | None = None,
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    if data:
        headers["Content-Type"] = "application/json"
    return http.post(service.admin_url + path, data=data, headers=headers, timeout=5)


# -- tokens ---------------------------------------------------------------------------

CHANGES = [
    ("/admin/add-backend", {"url": "http://127.0.0.1:9"}),
    ("/admin/remove-backend", {"name": "echo"}),
    ("/admin/reload", {}),
    ("/admin/set-backend", {"name": "echo", "drain": True}),
]
CHANGE_IDS = ["add", "remove", "reload", "set"]


@pytest.mark.parametrize(("path", "body"), CHANGES, ids=CHANGE_IDS)
def test_changes_without_a_configured_token_are_forbidden(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    path: str,
    body: object,
) -> None:
    service = make_proxy([echo_backend])  # base_config: no token
    for token in (None, "anything"):
        response = post(http, service, path, body, token=token)
        assert response.status_code == 403
        assert "admin token not configured" in response.text
    assert list(admin_backends(service)) == ["echo"]  # nothing changed
    assert admin_backends(service)["echo"]["drain"] is False


@pytest.mark.parametrize(("path", "body"), CHANGES, ids=CHANGE_IDS)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", TOKEN],
    ids=["missing", "wrong", "basic", "longer", "empty", "no-scheme"],
)
def test_wrong_or_missing_token_is_401(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    path: str,
    body: object,
    authorization: str | None,
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = http.post(service.admin_url + path, json=body, headers=headers, timeout=5)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert list(admin_backends(service)) == ["echo"]
    assert admin_backends(service)["echo"]["drain"] is False


def test_reads_need_no_token(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    for path in ("/livez", "/readyz", "/metrics", "/admin/backends"):
        assert http.get(service.admin_url + path, timeout=5).status_code == 200, path


def test_token_from_the_environment(
    tmp_path: Path, make_echo_backend: Callable[[str], EchoBackend], http: requests.Session
) -> None:
    backend = make_echo_backend("echo")
    path = tmp_path / "pyproxy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": "127.0.0.1:0"},  # no token in the file
                "health_check": {"enabled": False},
                "access_log": {"enabled": False},
                "backends": [{"url": backend.url, "name": "echo"}],
            }
        )
    )
    config = load_config(str(path), env={"PYPROXY_ADMIN_TOKEN": "from-env"})
    service = Service(config, registry=CollectorRegistry())
    try:
        service.start()
        assert post(http, service, "/admin/reload", token="wrong").status_code == 401
        assert post(http, service, "/admin/reload", token="from-env").status_code == 200
    finally:
        service.close()


def test_the_token_is_never_logged(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    other = EchoBackend("other")
    try:
        with caplog.at_level(logging.DEBUG):
            assert post(http, service, "/admin/add-backend", {"url": other.url}).status_code == 201
            assert post(http, service, "/admin/reload", token=TOKEN + "-wrong").status_code == 401
            body = {"name": other.url.split("//")[1]}
            assert post(http, service, "/admin/remove-backend", body).status_code == 200
        assert "admin: added backend" in caplog.text  # the changes are logged ...
        assert TOKEN not in caplog.text  # ... never the token, right or wrong
    finally:
        other.close()


# -- secrets never come back in an answer ----------------------------------------------

SECRET = "hunter2-s3cret"


def test_add_backend_refusals_do_not_echo_a_password(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    for url in (
        f"http://user:{SECRET}@127.0.0.1:99999",  # port out of range: "invalid URL ..."
        f"ftp://user:{SECRET}@127.0.0.1:21",  # wrong scheme: "must start with ..."
        f"http://user:{SECRET}@127.0.0.1:9",  # user info
        f"http://user:{SECRET}@127.0.0.1:9/path",
    ):
        response = post(http, service, "/admin/add-backend", {"url": url})
        assert response.status_code == 400, (url, response.text)
        assert SECRET not in response.text, response.text
    removed = post(http, service, "/admin/remove-backend", {"url": f"http://u:{SECRET}@h:1"})
    assert removed.status_code == 404
    assert SECRET not in removed.text and "u:***@h:1" in removed.text, removed.text


def test_reload_answers_do_not_echo_a_password_or_the_token(
    tmp_path: Path,
    echo_backend: EchoBackend,
    start_service: Callable[[Config], Service],
    http: requests.Session,
) -> None:
    path = tmp_path / "pyproxy.yaml"
    backends = [BackendConfig(url=echo_backend.url, name="echo")]
    # per_client is null, so the store is not used: only its text changes.
    store = {"store": f"redis://:{SECRET}@127.0.0.1:6379/0"}
    write_config(path, backends, rate_limit=store)
    service = start_service(load_config(str(path)))
    write_config(path, backends, rate_limit={"store": f"redis://:{SECRET}-new@127.0.0.1:6379/0"})
    changed = post(http, service, "/admin/reload")
    assert changed.status_code == 200, changed.text
    # A change to nothing but a password is reported without either value.
    assert changed.json()["changes"] == ["rate_limit.store: changed"]
    # An invalid store URL is quoted back in its problem, and so is the token pasted
    # into the wrong field.
    write_config(
        path,
        backends,
        rate_limit={"store": f"redis://:{SECRET}@127.0.0.1:6379/0?x=1"},
        strategy=TOKEN,
    )
    refused = post(http, service, "/admin/reload")
    assert refused.status_code == 400, refused.text
    problems = " ".join(refused.json()["problems"])
    assert "rate_limit.store" in problems and "redis://:***@127.0.0.1" in problems
    assert SECRET not in refused.text and TOKEN not in refused.text, refused.text


# -- bad requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"url": "http://127.0.0.1:9",}', "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        (b"[1, 2]", '"url"'),
        (b'"http://127.0.0.1:9"', '"url"'),
        (b"{}", '"url"'),
        (b'{"name": "x"}', '"url"'),
        (b'{"url": "http://127.0.0.1:9", "weight": -1}', "weight"),
        (b'{"url": "http://127.0.0.1:9", "weight": "heavy"}', "weight"),
        (b'{"url": "http://127.0.0.1:9", "max_connections": -2}', "max_connections"),
        (b'{"url": "http://127.0.0.1:9", "colour": "red"}', "colour"),
        (b'{"url": "http://127.0.0.1:9", "name": "has space"}', "name"),
        (b'{"url": "http://127.0.0.1:9/path"}', "path"),
        (b'{"url": 42}', "url"),
    ],
)
def test_add_backend_bad_requests_are_400_with_the_reason(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    raw: bytes,
    why: str,
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    response = post(http, service, "/admin/add-backend", raw=raw)
    assert response.status_code == 400
    assert why in response.text
    assert list(admin_backends(service)) == ["echo"]


def test_remove_backend_needs_a_name_or_url(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    for raw in (b"{}", b"[]", b'{"nom": "echo"}'):
        assert post(http, service, "/admin/remove-backend", raw=raw).status_code == 400
    assert post(http, service, "/admin/remove-backend", raw=b"{oops").status_code == 400


def test_unknown_routes_and_methods(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    assert http.get(service.admin_url + "/admin/nothing", timeout=5).status_code == 404
    assert http.get(service.admin_url + "/admin/add-backend", timeout=5).status_code == 405
    assert http.post(service.admin_url + "/admin/backends", timeout=5).status_code == 405


# -- add ------------------------------------------------------------------------------


def test_add_backend_returns_201_with_the_backend_and_it_takes_traffic(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    first, second = make_echo_backend("first"), make_echo_backend("second")
    service = make_proxy([first], admin=ADMIN)
    body = {"url": second.url + "/", "name": "second", "weight": 2, "max_connections": 7}
    response = post(http, service, "/admin/add-backend", body)
    assert response.status_code == 201
    added = response.json()
    assert added.keys() >= BACKEND_FIELDS
    assert added["name"] == "second"
    assert added["url"] == second.url  # normalised: no trailing slash
    assert (added["weight"], added["max_connections"], added["source"]) == (2, 7, "admin")
    assert added["circuit"] == "closed"
    assert added["available"] is True  # health checks off: at once
    backends = admin_backends(service)
    assert backends["first"]["source"] == "config"
    assert backends["second"]["source"] == "admin"
    assert set(served_by(http, service, 4)) == {"first", "second"}


def test_backends_listing_has_every_spec_field(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN, strategy="least_connections")
    http.get(service.proxy_url + "/", timeout=5)
    # The slot is released in the body's close(), a moment after the client's last byte.
    assert wait_for(lambda: service.requests_in_flight() == 0, 5)
    payload = http.get(service.admin_url + "/admin/backends", timeout=5).json()
    assert payload["strategy"] == "least_connections"
    (entry,) = payload["backends"]
    assert entry.keys() >= BACKEND_FIELDS
    assert entry["url"] == echo_backend.url
    assert entry["healthy"] is True
    assert entry["requests_total"] == 1
    assert entry["failures_total"] == 0
    assert entry["in_flight"] == 0


@pytest.mark.parametrize(
    "clash",
    [
        lambda backend: {"url": "http://127.0.0.1:9", "name": "echo"},
        lambda backend: {"url": backend.url, "name": "another-name"},
        lambda backend: {"url": backend.url + "/"},
        lambda backend: {"url": backend.url.replace("http://", "HTTP://")},
    ],
    ids=["name", "url", "url-slash", "url-case"],
)
def test_add_duplicate_is_409(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    clash: Callable[[EchoBackend], dict[str, str]],
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    response = post(http, service, "/admin/add-backend", clash(echo_backend))
    assert response.status_code == 409, response.text
    assert list(admin_backends(service)) == ["echo"]


def test_add_same_backend_with_explicit_default_port_is_409(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    # Nothing listens there; with health checks off no request is sent to it.
    first = post(http, service, "/admin/add-backend", {"url": "http://127.0.0.1", "name": "x1"})
    assert first.status_code == 201
    second = post(http, service, "/admin/add-backend", {"url": "http://127.0.0.1:80"})
    assert second.status_code == 409, second.text


def refused_urls(service: Service) -> list[tuple[str, str]]:
    proxy_port = service.proxy_server.address[1]
    admin_port = service.admin_server.address[1]
    return [
        ("ftp://127.0.0.1:21", "http"),
        ("file:///etc/passwd", "http"),
        ("gopher://127.0.0.1:70", "http"),
        ("http://user:pass@127.0.0.1:9", "user info"),
        ("http://user@127.0.0.1:9", "user info"),
        ("http://169.254.169.254", "link-local"),
        ("http://169.254.169.254:80", "link-local"),
        ("http://2852039166", "link-local"),  # 169.254.169.254 as one number
        ("http://[fe80::1]:80", "link-local"),
        ("http://0.0.0.0:9", "unspecified"),
        ("http://0:9", "unspecified"),
        ("http://[::]:9", "unspecified"),
        (f"http://127.0.0.1:{proxy_port}", "own listeners"),
        (f"http://localhost:{proxy_port}", "own listeners"),
        (f"http://127.0.0.1:{admin_port}", "own listeners"),
        (f"http://localhost:{admin_port}", "own listeners"),
        (f"http://127.0.0.2:{admin_port}", "own listeners"),  # all of 127/8 is this host
        (f"http://[::1]:{proxy_port}", "own listeners"),
    ]


def test_refused_urls_are_400_with_the_reason(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    for url, why in refused_urls(service):
        response = post(http, service, "/admin/add-backend", {"url": url})
        assert response.status_code == 400, (url, response.status_code, response.text)
        assert why in response.text, (url, response.text)
    assert list(admin_backends(service)) == ["echo"]
    assert echo_backend.requests() == []


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:169.254.169.254]",
        "http://[::ffff:a9fe:a9fe]:80",
        "http://[::ffff:0.0.0.0]:9",
        "admin-port",
    ],
    ids=["metadata", "metadata-hex", "unspecified", "own-admin-port"],
)
def test_ipv4_mapped_ipv6_urls_are_refused(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session, url: str
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    if url == "admin-port":
        url = f"http://[::ffff:127.0.0.1]:{service.admin_server.address[1]}"
    response = post(http, service, "/admin/add-backend", {"url": url})
    assert response.status_code == 400, response.text


# Every spelling of a forbidden address the stack would connect to (the unit tests in
# tests/test_urlguard.py check that getaddrinfo really maps each to that address).
SPELLED_FORBIDDEN = [
    ("http://[::169.254.169.254]", "169.254.169.254"),  # IPv4-compatible
    ("http://[64:ff9b::169.254.169.254]", "169.254.169.254"),  # NAT64
    ("http://[64:ff9b::a9fe:a9fe]:80", "169.254.169.254"),
    ("http://[64:ff9b:1::a9fe:a9fe]", "169.254.169.254"),  # NAT64 local use
    ("http://[2002:a9fe:a9fe::1]", "169.254.169.254"),  # 6to4
    ("http://[2001:0:4136:e378:8000:63bf:5601:5601]", "169.254.169.254"),  # Teredo
    ("http://0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("http://0251.0376.0251.0376", "169.254.169.254"),
    ("http://169.254.43518", "169.254.169.254"),
    ("http://0xa9fea9fe", "169.254.169.254"),
    ("http://[fe80::1%25eth0]", "link-local"),
    ("http://[febf::1]", "link-local"),
    ("http://[::ffff:0.1.2.3]:9", "unspecified"),
    ("http://0.1.2.3:9", "unspecified"),
    ("http://[64:ff9b::]:9", "unspecified"),
]


@pytest.mark.parametrize(("url", "why"), SPELLED_FORBIDDEN, ids=[u for u, _ in SPELLED_FORBIDDEN])
def test_every_spelling_of_a_forbidden_address_is_400_with_the_reason(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    url: str,
    why: str,
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    response = post(http, service, "/admin/add-backend", {"url": url, "name": "sneaky"})
    assert response.status_code == 400, (url, response.status_code, response.text)
    assert why in response.text, response.text
    assert list(admin_backends(service)) == ["echo"]


def test_a_name_that_later_resolves_to_metadata_is_refused_at_connect_time(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
    dns: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DNS rebinding: the name passed the admin check, then its answer changed."""
    config_side, rebinding = make_echo_backend("config-side"), make_echo_backend("rebinding")
    port = rebinding.url.rsplit(":", 1)[1]
    dns["rebind.test"] = "127.0.0.1"
    service = make_proxy([config_side], admin=ADMIN)
    body = {"url": f"http://rebind.test:{port}", "name": "rebinding"}
    assert post(http, service, "/admin/add-backend", body).status_code == 201
    assert set(served_by(http, service, 4)) == {"config-side", "rebinding"}
    served = len(rebinding.requests())
    # The name now points at the metadata service (spelled as one number, which
    # getaddrinfo accepts). New connections to it must be refused before any byte.
    dns["rebind.test"] = "2852039166"
    backend = service.holder.runtime.find(name="rebinding")
    assert backend is not None
    # Every request that used it has ended (its connection is back in the pool, idle):
    # only then does closing the idle ones leave none open for the next request.
    assert wait_for(lambda: backend.in_flight == 0)
    pool = backend.pool
    for idle in list(pool.pool.queue):  # type: ignore[union-attr]  # the next request dials
        if idle is not None:
            idle.close()
    with caplog.at_level(logging.WARNING, logger="pyproxy.pool.urlguard"):
        answers = [http.get(service.proxy_url + "/who", timeout=5) for _ in range(4)]
    codes = [answer.status_code for answer in answers]
    assert sorted(codes) == [200, 200, 502, 502], (
        [(answer.status_code, answer.headers.get("X-Backend")) for answer in answers],
        [record.connection for record in rebinding.requests()],
        pool.num_connections,
    )
    assert len(rebinding.requests()) == served
    assert "rebind.test" in caplog.text and "link-local" in caplog.text


def test_config_file_backends_are_not_checked_at_connect_time(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    dns: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator wrote it in the file: it is their choice, and their connections
    pay nothing for a check. Here any call of the connect-time check would fail."""
    port = echo_backend.url.rsplit(":", 1)[1]
    dns["operator.test"] = "127.0.0.1"

    def never(host: str, port: int) -> list[str]:
        raise AssertionError(f"a config-file backend was checked: {host}:{port}")

    monkeypatch.setattr(urlguard, "resolve_allowed", never)
    service = make_proxy([BackendConfig(url=f"http://operator.test:{port}", name="operator")])
    assert http.get(service.proxy_url + "/x", timeout=5).status_code == 200
    assert len(echo_backend.requests()) == 1


def test_a_tampered_state_file_cannot_add_a_metadata_backend(
    tmp_path: Path,
    echo_backend: EchoBackend,
    start_service: Callable[[Config], Service],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, state = tmp_path / "pyproxy.yaml", tmp_path / "admin.json"
    write_config(
        path,
        [BackendConfig(url=echo_backend.url, name="echo")],
        admin={"listen": "127.0.0.1:0", "token": TOKEN, "state_file": str(state)},
    )
    entries = [
        {"url": "http://169.254.169.254", "name": "metadata"},
        {"url": "http://[::ffff:a9fe:a9fe]", "name": "mapped"},
        {"url": "http://[64:ff9b::a9fe:a9fe]", "name": "nat64"},
        {"url": "http://2852039166", "name": "decimal"},
        {"url": "http://0.0.0.0:9", "name": "unspecified"},
        {"url": "http://127.0.0.1:9", "name": "fine"},
    ]
    state.write_text(json.dumps({"added": entries, "removed_urls": []}))
    with caplog.at_level(logging.ERROR, logger="pyproxy.pool.urlguard"):
        service = start_service(load_config(str(path)))
    assert list(admin_backends(service)) == ["echo", "fine"]
    for entry in entries[:-1]:
        assert f"skipped backend {entry['name']} " in caplog.text, caplog.text


def test_added_backend_gets_no_traffic_until_its_first_passing_probe(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    old, new = make_echo_backend("old"), make_echo_backend("new")
    old.release.set()  # old answers its probes of /hold at once
    health = HealthCheckConfig(
        enabled=True, path="/hold", interval=0.2, timeout=8.0, healthy_threshold=2
    )
    service = make_proxy([old], admin=ADMIN, health_check=health)
    response = post(http, service, "/admin/add-backend", {"url": new.url, "name": "new"})
    assert response.status_code == 201
    assert response.json()["available"] is False
    assert response.json()["healthy"] is False
    # Its first probe has reached it and hangs there until the test releases it.
    assert new.holding.wait(5)
    assert admin_backends(service)["new"]["available"] is False
    assert set(served_by(http, service, 6)) == {"old"}
    assert {r.target for r in new.requests()} == {"/hold"}  # only probes reached it
    new.release.set()  # the probe passes: one pass is enough from "unknown"
    assert wait_for(lambda: admin_backends(service)["new"]["available"], timeout=5)
    assert set(served_by(http, service, 6)) == {"old", "new"}
    assert "/who" in {r.target for r in new.requests()}


# -- remove ---------------------------------------------------------------------------


def fetch_in_thread(url: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            response = requests.get(url, timeout=15)
            result["status"] = response.status_code
            result["body"] = response.content
            result["headers"] = response.headers
        except requests.RequestException as error:
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_remove_stops_new_traffic_and_lets_in_flight_finish(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    leaving, staying = make_echo_backend("leaving"), make_echo_backend("staying")
    service = make_proxy([leaving], admin=ADMIN)
    thread, result = fetch_in_thread(service.proxy_url + "/hold")
    try:
        assert leaving.holding.wait(5)
        assert post(http, service, "/admin/add-backend", {"url": staying.url}).status_code == 201
        response = post(http, service, "/admin/remove-backend", {"name": "leaving"})
        assert response.status_code == 200
        assert response.json() == {"removed": "leaving", "url": leaving.url, "in_flight": 1}
        assert "leaving" not in admin_backends(service)
        before = len(leaving.requests())
        assert all(name != "leaving" for name in served_by(http, service, 6))
        assert len(leaving.requests()) == before  # no new request reached it
    finally:
        leaving.release.set()
    thread.join(10)
    assert_finished_whole(result, "leaving")


def test_removed_backend_gauges_stay_gone_after_its_in_flight_request(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    leaving, staying = make_echo_backend("leaving"), make_echo_backend("staying")
    service = make_proxy([leaving, staying], admin=ADMIN, strategy="round_robin")
    thread, result = fetch_in_thread(service.proxy_url + "/hold")
    try:
        # round robin picks the first backend first; the branch below is a fallback
        assert wait_for(lambda: leaving.holding.is_set() or staying.holding.is_set(), 5)
        if not leaving.holding.is_set():
            staying.release.set()
            thread.join(10)
            thread, result = fetch_in_thread(service.proxy_url + "/hold")
            assert leaving.holding.wait(5)
        assert post(http, service, "/admin/remove-backend", {"name": "leaving"}).status_code == 200
    finally:
        leaving.release.set()
        staying.release.set()
    thread.join(10)
    assert result.get("status") == 200
    assert wait_for(lambda: service.requests_in_flight() == 0, 5)
    leftovers = [
        sample
        for sample in metric_samples(service)
        if sample.name in ("proxy_backend_in_flight", "proxy_backend_up", "proxy_circuit_state")
        and sample.labels == {"backend": "leaving"}
    ]
    assert leftovers == []


def test_remove_by_url_and_unknown_is_404(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    first, second = make_echo_backend("first"), make_echo_backend("second")
    service = make_proxy([first, second], admin=ADMIN)
    assert post(http, service, "/admin/remove-backend", {"name": "nobody"}).status_code == 404
    assert (
        post(http, service, "/admin/remove-backend", {"url": "http://127.0.0.1:9"}).status_code
        == 404
    )
    response = post(http, service, "/admin/remove-backend", {"url": second.url + "/"})
    assert response.status_code == 200
    assert response.json()["removed"] == "second"
    assert list(admin_backends(service)) == ["first"]
    assert post(http, service, "/admin/remove-backend", {"name": "second"}).status_code == 404


def test_remove_by_url_matches_the_way_add_does(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    # Nothing listens on port 80 here; with health checks off nothing is sent there.
    added = post(http, service, "/admin/add-backend", {"url": "http://127.0.0.1", "name": "p80"})
    assert added.status_code == 201
    # add-backend calls these the same backend (409), so remove-backend must find them
    same_as_p80 = "http://127.0.0.1:80"
    same_as_echo = echo_backend.url.replace("http://", "HTTP://")
    assert post(http, service, "/admin/add-backend", {"url": same_as_p80}).status_code == 409
    assert post(http, service, "/admin/remove-backend", {"url": same_as_p80}).status_code == 200
    assert post(http, service, "/admin/remove-backend", {"url": same_as_echo}).status_code == 200
    assert admin_backends(service) == {}


def test_removing_the_last_backend_makes_readyz_503(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    assert http.get(service.admin_url + "/readyz", timeout=5).status_code == 200
    assert post(http, service, "/admin/remove-backend", {"name": "echo"}).status_code == 200
    assert http.get(service.admin_url + "/readyz", timeout=5).status_code == 503
    response = http.get(service.proxy_url + "/", timeout=5)
    assert response.status_code == 503
    assert "Retry-After" in response.headers


# -- admin changes outlive reloads and restarts ---------------------------------------


def write_config(path: Path, backends: list[BackendConfig], **extra: Any) -> None:
    document: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "health_check": {"enabled": False},
        "circuit_breaker": {"enabled": False},
        "access_log": {"enabled": False},
        "backends": [dataclasses.asdict(b) for b in backends],
    }
    document.update(extra)
    replace_file(path, yaml.safe_dump(document))


def test_admin_changes_survive_a_reload(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    make_echo_backend: Callable[[str], EchoBackend],
    start_service: Callable[[Config], Service],
    http: requests.Session,
) -> None:
    app1, app2, app3 = three_backends
    extra = make_echo_backend("extra")
    path = tmp_path / "pyproxy.yaml"
    as_config = [BackendConfig(url=b.url, name=b.name) for b in (app1, app2, app3)]
    write_config(path, as_config[:2])
    service = start_service(load_config(str(path)))
    assert (
        post(http, service, "/admin/add-backend", {"url": extra.url, "name": "extra"}).status_code
        == 201
    )
    assert post(http, service, "/admin/remove-backend", {"name": "app1"}).status_code == 200
    write_config(path, [as_config[0], dataclasses.replace(as_config[1], weight=4), as_config[2]])
    reply = post(http, service, "/admin/reload")  # the watcher may have got there first
    assert reply.status_code == 200
    backends = admin_backends(service)
    # file (app1, app2, app3) - removed (app1) + added (extra)
    assert list(backends) == ["app2", "app3", "extra"]
    assert backends["app2"]["weight"] == 4
    assert backends["extra"]["source"] == "admin"


def test_state_file_carries_admin_changes_across_a_restart(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    make_echo_backend: Callable[[str], EchoBackend],
    start_service: Callable[[Config], Service],
    http: requests.Session,
) -> None:
    app1, app2, _ = three_backends
    extra = make_echo_backend("extra")
    path, state = tmp_path / "pyproxy.yaml", tmp_path / "state" / "admin.json"
    state.parent.mkdir()
    write_config(
        path,
        [BackendConfig(url=b.url, name=b.name) for b in (app1, app2)],
        admin={"listen": "127.0.0.1:0", "token": TOKEN, "state_file": str(state)},
    )
    first = start_service(load_config(str(path)))
    body = {"url": extra.url, "name": "extra", "weight": 3}
    assert post(http, first, "/admin/add-backend", body).status_code == 201
    assert post(http, first, "/admin/remove-backend", {"name": "app1"}).status_code == 200
    saved = json.loads(state.read_text())
    assert saved["removed_urls"] == [app1.url]
    assert [(b["name"], b["url"], b["weight"]) for b in saved["added"]] == [("extra", extra.url, 3)]
    before = {n: (b["url"], b["weight"], b["source"]) for n, b in admin_backends(first).items()}
    first.close()

    second = start_service(load_config(str(path)))
    after = {n: (b["url"], b["weight"], b["source"]) for n, b in admin_backends(second).items()}
    assert after == before
    assert list(after) == ["app2", "extra"]
    assert set(served_by(http, second, 4)) == {"app2", "extra"}


def test_state_file_is_valid_json_at_every_moment(
    tmp_path: Path,
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    base = make_echo_backend("base")
    state = tmp_path / "admin.json"
    admin = dataclasses.replace(ADMIN, state_file=str(state))
    service = make_proxy([base], admin=admin)
    stop = threading.Event()
    reads: list[int] = []
    broken: list[str] = []

    def reader() -> None:
        while not stop.is_set() and len(reads) < 100_000:
            try:
                text = state.read_text()
            except FileNotFoundError:
                continue  # before the first write
            try:
                json.loads(text)
            except ValueError:
                broken.append(text)
            reads.append(len(text))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for i in range(15):
            url = f"http://127.0.0.1:{closed_port()}"
            body = {"url": url, "name": f"n{i}"}
            assert post(http, service, "/admin/add-backend", body).status_code == 201
            if i % 2:
                assert post(http, service, "/admin/remove-backend", {"url": url}).status_code == 200
    finally:
        stop.set()
        thread.join(5)
    assert broken == []
    assert len(reads) > 15
    assert [p.name for p in tmp_path.iterdir()] == ["admin.json"]  # no temp files left
    assert len(json.loads(state.read_text())["added"]) == 8


def test_a_restart_keeps_names_unique_when_the_file_took_an_admin_added_name(
    tmp_path: Path, start_service: Callable[[Config], Service], http: requests.Session
) -> None:
    # An admin added "shared" (kept in the state file); later someone adds a different
    # backend named "shared" to the file and restarts. The reload path refuses this
    # clash; start must not end up with two backends of one name either. (Refusing to
    # start with a clear error would also do.)
    state = tmp_path / "admin.json"
    admin = {"listen": "127.0.0.1:0", "token": TOKEN, "state_file": str(state)}
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [BackendConfig(url="http://127.0.0.1:9301", name="base")], admin=admin)
    first = start_service(load_config(str(path)))
    body = {"url": "http://127.0.0.1:9302", "name": "shared"}
    assert post(http, first, "/admin/add-backend", body).status_code == 201
    first.close()

    write_config(
        path,
        [
            BackendConfig(url="http://127.0.0.1:9301", name="base"),
            BackendConfig(url="http://127.0.0.1:9303", name="shared"),
        ],
        admin=admin,
    )
    try:
        second = start_service(load_config(str(path)))
    except (ConfigError, ValueError):
        return  # refused to start, with a reason: acceptable
    names = [b.name for b in second.holder.runtime.backends]
    assert len(names) == len(set(names)), names
