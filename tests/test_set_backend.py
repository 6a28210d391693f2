"""POST /admin/set-backend: an admin weight and drain, at runtime (HAProxy's
`set server <b> weight <n>` and `set server <b> state drain`).

Real sockets throughout: echo backends <- a real pyproxy on port 0 <- a real client.
"No new requests reach it" is read from the echo backend's own record of what
crossed the wire. See docs/admin-api.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from backends import EchoBackend
from conftest import ProxyFactory, admin_backends, admin_get, assert_finished_whole, served_by
from test_admin_api import ADMIN, TOKEN, fetch_in_thread, post, write_config

from pyproxy.config.load import ConfigError, load_config
from pyproxy.config.schema import BackendConfig, Config, StickyConfig
from pyproxy.process.service import Service


def set_backend(http: requests.Session, service: Service, **body: Any) -> requests.Response:
    return post(http, service, "/admin/set-backend", body)


def removed_list(service: Service) -> list[dict[str, str]]:
    removed: list[dict[str, str]] = admin_get(service, "/admin/backends").json()["removed"]
    return removed


# -- answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({}, 'expected a JSON object with "name"'),
        ({"drain": True}, 'expected a JSON object with "name"'),
        ({"name": 7, "drain": True}, 'expected a JSON object with "name"'),
        (["echo"], 'expected a JSON object with "name"'),
        ({"name": "echo", "drain": True, "state": "drain"}, "unknown field(s) state"),
        ({"name": "echo", "weight": -1}, "weight: must be an integer >= 0"),
        ({"name": "echo", "weight": "2"}, "weight: must be an integer >= 0"),
        ({"name": "echo", "weight": 1.5}, "weight: must be an integer >= 0"),
        ({"name": "echo", "weight": True}, "weight: must be an integer >= 0"),
        ({"name": "echo", "drain": "yes"}, "drain: must be true or false"),
        ({"name": "echo", "drain": None}, "drain: must be true or false"),
    ],
)
def test_invalid_changes_are_400_with_the_reason_and_change_nothing(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    body: object,
    why: str,
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    before = admin_backends(service)["echo"]
    response = post(http, service, "/admin/set-backend", body)
    assert response.status_code == 400
    assert why in response.text
    assert admin_backends(service)["echo"] == before


def test_bad_json_is_400_and_an_unknown_backend_is_404(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], admin=ADMIN)
    response = post(http, service, "/admin/set-backend", raw=b'{"name": "echo", "drain": tru')
    assert response.status_code == 400
    assert "invalid JSON" in response.text
    response = set_backend(http, service, name="nobody", drain=True)
    assert response.status_code == 404
    assert "no backend nobody" in response.text


def test_drain_answers_the_new_state_and_the_judge_gives_the_reason(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = make_echo_backend("a"), make_echo_backend("b")
    service = make_proxy([a, b], admin=ADMIN)
    with caplog.at_level(logging.INFO):
        response = set_backend(http, service, name="a", drain=True)
    assert response.status_code == 200
    entry = response.json()
    assert (entry["name"], entry["drain"], entry["available"]) == ("a", True, False)
    assert entry["why_unavailable"] == "drained (admin)"
    assert (entry["weight"], entry["file_weight"], entry["admin_weight"]) == (1, 1, None)
    assert "admin: set backend a" in caplog.text  # logged ...
    assert TOKEN not in caplog.text  # ... never with the token
    assert admin_backends(service)["b"]["drain"] is False
    assert set(served_by(http, service, 4)) == {"b"}


def test_a_drained_backend_gets_no_new_requests_while_its_in_flight_one_finishes(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    leaving, staying = make_echo_backend("leaving"), make_echo_backend("staying")
    service = make_proxy([leaving, staying], admin=ADMIN, strategy="round_robin")
    # Drain "staying" for a moment so the slow request can only start on "leaving".
    assert set_backend(http, service, name="staying", drain=True).status_code == 200
    thread, result = fetch_in_thread(service.proxy_url + "/hold")
    try:
        assert leaving.holding.wait(5)
        assert set_backend(http, service, name="staying", drain=False).status_code == 200
        response = set_backend(http, service, name="leaving", drain=True)
        assert response.status_code == 200
        assert response.json()["in_flight"] == 1
        before = len(leaving.requests())
        assert set(served_by(http, service, 6)) == {"staying"}
        assert len(leaving.requests()) == before  # no new request reached it
    finally:
        leaving.release.set()
    thread.join(10)
    assert_finished_whole(result, "leaving")

    # "drain": false undoes it: the backend takes requests again.
    response = set_backend(http, service, name="leaving", drain=False)
    assert response.status_code == 200
    assert (response.json()["drain"], response.json()["available"]) == (False, True)
    assert set(served_by(http, service, 4)) == {"leaving", "staying"}


def test_sticky_clients_of_a_drained_backend_are_pinned_elsewhere(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    a, b = make_echo_backend("a"), make_echo_backend("b")
    service = make_proxy([a, b], admin=ADMIN, sticky=StickyConfig(mode="cookie"))
    first = http.get(service.proxy_url + "/who", timeout=5)
    pinned = first.headers["X-Backend"]
    other = "b" if pinned == "a" else "a"
    assert set(served_by(http, service, 3)) == {pinned}  # the session sends the cookie back
    assert set_backend(http, service, name=pinned, drain=True).status_code == 200
    moved = http.get(service.proxy_url + "/who", timeout=5)
    assert moved.headers["X-Backend"] == other
    assert "pyproxy_backend=" in moved.headers["Set-Cookie"]  # re-pinned, not left dangling
    assert set(served_by(http, service, 3)) == {other}


# -- weight -----------------------------------------------------------------------------


def test_an_admin_weight_wins_over_the_files_until_cleared(
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    a, b = make_echo_backend("a"), make_echo_backend("b")
    service = make_proxy([a, b], admin=ADMIN, strategy="weighted")
    response = set_backend(http, service, name="a", weight=3)
    assert response.status_code == 200
    entry = response.json()
    assert (entry["weight"], entry["file_weight"], entry["admin_weight"]) == (3, 1, 3)
    assert Counter(served_by(http, service, 8)) == {"a": 6, "b": 2}

    # A drain leaves the weight alone; undoing it brings the admin's weight back.
    assert set_backend(http, service, name="a", drain=True).json()["admin_weight"] == 3
    assert set_backend(http, service, name="a", drain=False).json()["weight"] == 3

    zero = set_backend(http, service, name="a", weight=0).json()
    assert (zero["available"], zero["why_unavailable"]) == (False, "weight 0 (admin)")
    assert set(served_by(http, service, 4)) == {"b"}

    cleared = set_backend(http, service, name="a", weight=None).json()
    assert (cleared["weight"], cleared["file_weight"], cleared["admin_weight"]) == (1, 1, None)
    assert Counter(served_by(http, service, 4)) == {"a": 2, "b": 2}


# -- reloads and restarts ---------------------------------------------------------------


def as_configs(backends: list[EchoBackend]) -> list[BackendConfig]:
    return [BackendConfig(url=b.url, name=b.name) for b in backends]


def test_overrides_survive_a_reload_and_leave_with_their_backend(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Config], Service],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app1, app2, app3 = as_configs(three_backends)
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [app1, app2, app3])
    service = start_service(load_config(str(path)))
    assert set_backend(http, service, name="app1", drain=True).status_code == 200
    assert set_backend(http, service, name="app2", weight=5).status_code == 200

    # A reload that keeps both (and changes app2's file weight) keeps both overrides.
    write_config(path, [app1, dataclasses.replace(app2, weight=2), app3])
    assert post(http, service, "/admin/reload").status_code == 200
    backends = admin_backends(service)
    assert (backends["app1"]["drain"], backends["app1"]["why_unavailable"]) == (
        True,
        "drained (admin)",
    )
    assert (backends["app2"]["weight"], backends["app2"]["file_weight"]) == (5, 2)
    assert set(served_by(http, service, 4)) == {"app2", "app3"}

    # A reload that drops app1 from the file drops its override, and says so.
    write_config(path, [app2, app3])
    with caplog.at_level(logging.INFO):
        assert post(http, service, "/admin/reload").status_code == 200
    assert "app1" in caplog.text and "override" in caplog.text and "dropped" in caplog.text
    assert list(admin_backends(service)) == ["app2", "app3"]

    # Back in the file, it is a fresh backend: not drained.
    write_config(path, [app1, app2, app3])
    assert post(http, service, "/admin/reload").status_code == 200
    backends = admin_backends(service)
    assert backends["app1"]["drain"] is False and backends["app1"]["available"] is True
    assert backends["app2"]["admin_weight"] == 5


def test_overrides_survive_a_restart_with_the_state_file(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Config], Service],
    http: requests.Session,
) -> None:
    path, state = tmp_path / "pyproxy.yaml", tmp_path / "admin.json"
    admin = {"listen": "127.0.0.1:0", "token": TOKEN, "state_file": str(state)}
    write_config(path, as_configs(three_backends), admin=admin)
    first = start_service(load_config(str(path)))
    assert set_backend(http, first, name="app1", drain=True).status_code == 200
    assert set_backend(http, first, name="app2", weight=4).status_code == 200
    saved = json.loads(state.read_text())
    assert sorted(saved["overrides"], key=lambda o: o["url"]) == sorted(
        [
            {"url": three_backends[0].url, "weight": None, "drain": True},
            {"url": three_backends[1].url, "weight": 4, "drain": False},
        ],
        key=lambda o: str(o["url"]),
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    before = {
        n: (b["weight"], b["admin_weight"], b["drain"]) for n, b in admin_backends(first).items()
    }
    first.close()

    second = start_service(load_config(str(path)))
    after = {
        n: (b["weight"], b["admin_weight"], b["drain"]) for n, b in admin_backends(second).items()
    }
    assert after == before
    assert set(served_by(http, second, 6)) == {"app2", "app3"}


def test_a_state_file_from_before_set_backend_still_loads(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Config], Service],
) -> None:
    app1 = three_backends[0]
    path, state = tmp_path / "pyproxy.yaml", tmp_path / "admin.json"
    state.write_text(json.dumps({"added": [], "removed_urls": [app1.url]}))
    admin = {"listen": "127.0.0.1:0", "token": TOKEN, "state_file": str(state)}
    write_config(path, as_configs(three_backends), admin=admin)
    service = start_service(load_config(str(path)))
    backends = admin_backends(service)
    assert list(backends) == ["app2", "app3"]
    assert all(b["drain"] is False and b["admin_weight"] is None for b in backends.values())
    assert removed_list(service) == [{"name": "app1", "url": app1.url, "pool": "default"}]


# -- what an operator sees --------------------------------------------------------------


def test_backends_and_the_status_page_say_why_a_file_backend_is_not_serving(
    make_proxy: ProxyFactory,
    three_backends: list[EchoBackend],
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    service = make_proxy(three_backends, admin=ADMIN)
    extra = make_echo_backend("extra")
    assert post(http, service, "/admin/add-backend", {"url": extra.url, "name": "extra"}).ok
    assert post(http, service, "/admin/remove-backend", {"name": "app1"}).status_code == 200
    assert post(http, service, "/admin/remove-backend", {"name": "extra"}).status_code == 200
    assert set_backend(http, service, name="app2", drain=True).status_code == 200
    assert set_backend(http, service, name="app3", weight=7).status_code == 200

    listing = admin_get(service, "/admin/backends").json()
    assert [b["name"] for b in listing["backends"]] == ["app2", "app3"]  # the v1 shape
    # Only the file's backends: the admin-added one was the admin's own to remove.
    assert listing["removed"] == [{"name": "app1", "url": three_backends[0].url, "pool": "default"}]

    page = admin_get(service, "/admin/status").text
    removed = page.split("Removed by the admin", 1)[1]
    assert 'data-removed="app1"' in removed and three_backends[0].url in removed
    assert "extra" not in removed
    app2_row = page.split('data-backend="app2"', 1)[1].split("</tr>", 1)[0]
    assert "drained (admin)" in app2_row and "no new requests" in app2_row
    app3_row = page.split('data-backend="app3"', 1)[1].split("</tr>", 1)[0]
    assert ">7<" in app3_row and "configured: 1" in app3_row


# -- weights too large for the strategies -------------------------------------------------

HUGE = 10**400  # a valid JSON and YAML integer; float(HUGE) raises OverflowError


def test_a_weight_too_large_to_balance_by_is_refused_everywhere(
    tmp_path: Path,
    make_proxy: ProxyFactory,
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
) -> None:
    # Weighted rendezvous hashing (sticky ip) divides by the weight as a float: a
    # weight past a float's range made every request through that pool fail.
    a, b = make_echo_backend("a"), make_echo_backend("b")
    service = make_proxy([a], admin=ADMIN, sticky=StickyConfig(mode="ip"))
    for weight in (HUGE, 2**32):
        response = set_backend(http, service, name="a", weight=weight)
        assert response.status_code == 400
        assert "weight: must be at most 4294967295" in response.text
        added = post(http, service, "/admin/add-backend", {"url": b.url, "weight": weight})
        assert added.status_code == 400
        assert "weight: must be at most 4294967295" in added.text
    assert set_backend(http, service, name="a", weight=3.0).json()["weight"] == 3  # as the file
    assert set(served_by(http, service, 3)) == {"a"}

    path = tmp_path / "pyproxy.yaml"
    write_config(path, [BackendConfig(url=a.url, name="a", weight=HUGE)])
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert error.value.problems == ["backends[0].weight: must be at most 4294967295"]


def test_a_state_file_with_an_invalid_override_is_ignored_with_the_reason(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Config], Service],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The state file is the admin API's memory: editing it must not be a way around
    # set-backend's rules (a weight past the limit would fail every sticky request).
    path, state = tmp_path / "pyproxy.yaml", tmp_path / "admin.json"
    url = three_backends[0].url
    state.write_text(json.dumps({"overrides": [{"url": url, "weight": HUGE, "drain": True}]}))
    admin = {"listen": "127.0.0.1:0", "token": TOKEN, "state_file": str(state)}
    write_config(path, as_configs(three_backends), admin=admin)
    with caplog.at_level(logging.ERROR):
        service = start_service(load_config(str(path)))
    assert f"override of {url}: weight must be at most 4294967295" in caplog.text
    assert all(b["drain"] is False for b in admin_backends(service).values())
