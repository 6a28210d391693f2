"""Config reload (docs/reload.md): the watcher, SIGHUP and `POST /admin/reload`.

A real Service is started from a YAML file in tmp_path (listeners on port 0), the
file is changed the ways editors and Kubernetes change files, and the result is read
from the admin listener: `/admin/backends` and the reload metrics on `/metrics`.
Every wait polls with a deadline; the only fixed waits are the windows in which a
test shows that something does *not* happen. See docs/reload.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from backends import EchoBackend, closed_port, free_ports, wait_for
from conftest import (
    admin_backends,
    admin_reload,
    metric_value,
    replace_file,
    served_by,
    spawn_pyproxy,
)
from conftest import backend_config as cfg

from pyproxy.config.schema import BackendConfig
from pyproxy.process.service import Service
from pyproxy.runtime import sources

TOKEN = "reload-test-token"
# Longer than the watcher's debounce (0.25 s) several times over: the window in which
# a change that must be ignored would have been applied.
QUIET_WINDOW = 1.0


def document(backends: list[BackendConfig], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "health_check": {"enabled": False},
        "circuit_breaker": {"enabled": False},
        "retries": {"max_retries": 0},
        "timeouts": {"connect": "1s", "read": "5s", "total": "10s"},
        "access_log": {"enabled": False},
        "backends": [dataclasses.asdict(b) for b in backends],
    }
    doc.update(extra)
    return doc


def write_in_place(path: Path, text: str) -> None:
    """What `echo > file` does: truncate and write into the same inode."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_config(path: Path, backends: list[BackendConfig], **extra: Any) -> None:
    replace_file(path, yaml.safe_dump(document(backends, **extra)))


def reload_metrics(service: Service) -> tuple[float, float, float]:
    """(successes, failures, last_reload_successful) as /metrics shows them."""
    successes = metric_value(service, "proxy_config_reloads_total", result="success") or 0.0
    failures = metric_value(service, "proxy_config_reloads_total", result="failure") or 0.0
    gauge = metric_value(service, "proxy_config_last_reload_successful")
    return successes, failures, -1.0 if gauge is None else gauge


# -- the watcher ----------------------------------------------------------------------


@pytest.mark.parametrize("write", [replace_file, write_in_place], ids=["rename", "in-place"])
def test_a_file_change_reloads(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
    write: Callable[[Path, str], None],
) -> None:
    app1, app2, app3 = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1), cfg(app2)])
    service = start_service(path)
    assert reload_metrics(service) == (0, 0, 1)

    write(path, yaml.safe_dump(document([cfg(app1, weight=3), cfg(app3)])))
    assert wait_for(lambda: list(admin_backends(service)) == ["app1", "app3"], timeout=5)
    assert admin_backends(service)["app1"]["weight"] == 3
    assert wait_for(lambda: reload_metrics(service) == (1, 0, 1), timeout=5)
    assert set(served_by(http, service, 4)) == {"app1", "app3"}

    # The watcher keeps working after the first change (a rename does not deafen it).
    write(path, yaml.safe_dump(document([cfg(app2)])))
    assert wait_for(lambda: list(admin_backends(service)) == ["app2"], timeout=5)
    assert wait_for(lambda: reload_metrics(service) == (2, 0, 1), timeout=5)


def test_a_kubernetes_style_symlink_swap_reloads(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    # A ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>/.
    # An update writes a new timestamped directory and renames a new ..data over the old.
    app1, app2, _ = three_backends
    volume = tmp_path / "volume"
    (volume / "..v1").mkdir(parents=True)
    (volume / "..v1" / "config.yaml").write_text(yaml.safe_dump(document([cfg(app1)])))
    (volume / "..data").symlink_to("..v1")
    (volume / "config.yaml").symlink_to("..data/config.yaml")
    service = start_service(volume / "config.yaml")
    assert list(admin_backends(service)) == ["app1"]

    (volume / "..v2").mkdir()
    (volume / "..v2" / "config.yaml").write_text(yaml.safe_dump(document([cfg(app2)])))
    (volume / "..data_tmp").symlink_to("..v2")
    os.replace(volume / "..data_tmp", volume / "..data")
    assert wait_for(lambda: list(admin_backends(service)) == ["app2"], timeout=5)
    assert reload_metrics(service) == (1, 0, 1)


def test_invalid_then_valid(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app1, app2, _ = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1)])
    service = start_service(path)
    before = admin_backends(service)

    with caplog.at_level(logging.ERROR, logger="pyproxy.runtime.swap"):
        write_config(path, [cfg(app1, weight=-1), cfg(app2)], strategy="fastest")
        assert wait_for(lambda: reload_metrics(service) == (0, 1, 0), timeout=5)
        # logged with the field paths (the lines may follow the count by a moment)
        assert wait_for(lambda: "is invalid; the running config stays" in caplog.text, 5)
    assert "backends[0].weight" in caplog.text
    assert "strategy" in caplog.text
    assert admin_backends(service) == before  # nothing changed
    assert served_by(http, service, 2) == ["app1", "app1"]

    write_config(path, [cfg(app1), cfg(app2)])
    assert wait_for(lambda: list(admin_backends(service)) == ["app1", "app2"], timeout=5)
    assert wait_for(lambda: reload_metrics(service) == (1, 1, 1), timeout=5)


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    write_in_place(path, "")


def half_written(path: Path) -> None:
    # An in-place write caught halfway: the rest of the document never arrived.
    text = path.read_text()
    write_in_place(path, text[: text.index("url:") + 12])


def not_a_mapping(path: Path) -> None:
    write_in_place(path, "- just\n- a list\n")


def unknown_key(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    doc["treads"] = 4
    replace_file(path, yaml.safe_dump(doc))


@pytest.mark.parametrize(
    "damage",
    [delete, truncate, half_written, not_a_mapping, unknown_key],
    ids=["deleted", "empty", "half-written", "not-a-mapping", "unknown-key"],
)
def test_a_broken_file_changes_nothing(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
    damage: Callable[[Path], None],
) -> None:
    app1, app2, app3 = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1), cfg(app2)])
    service = start_service(path)
    before = admin_backends(service)

    damage(path)
    assert wait_for(lambda: reload_metrics(service) == (0, 1, 0), timeout=5)
    assert admin_backends(service) == before
    assert sorted(set(served_by(http, service, 4))) == ["app1", "app2"]

    write_config(path, [cfg(app3)])  # a good file afterwards is applied
    assert wait_for(lambda: list(admin_backends(service)) == ["app3"], timeout=5)
    assert wait_for(lambda: reload_metrics(service) == (1, 1, 1), timeout=5)


def test_unchanged_content_does_not_reload(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, app2, _ = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1)])
    service = start_service(path)
    text = path.read_text()

    os.utime(path)  # touch
    write_in_place(path, text)  # same bytes, same inode
    replace_file(path, text)  # same bytes, new inode
    (tmp_path / "neighbour.txt").write_text("another file in the directory")
    deadline = time.monotonic() + QUIET_WINDOW
    while time.monotonic() < deadline:
        assert reload_metrics(service) == (0, 0, 1)
        time.sleep(0.05)

    # The watcher is alive: a real change now counts exactly one reload.
    write_config(path, [cfg(app1), cfg(app2)])
    assert wait_for(lambda: reload_metrics(service) == (1, 0, 1), timeout=5)


def test_backends_that_stay_keep_their_state(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, _, app3 = three_backends
    dead = BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name="dead")
    breaker = {"enabled": True, "failure_threshold": 1, "open_duration": "60s"}
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1), dead], circuit_breaker=breaker)
    service = start_service(path)
    kept_app1 = service.holder.runtime.find(name="app1")
    kept_dead = service.holder.runtime.find(name="dead")

    # Open dead's circuit: round robin sends one of two requests there (502).
    statuses = sorted(http.get(service.proxy_url + "/", timeout=5).status_code for _ in "ab")
    assert statuses == [200, 502]
    assert admin_backends(service)["dead"]["circuit"] == "open"
    # Keep a request in flight on app1.
    held: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: held.update(r=requests.get(service.proxy_url + "/hold", timeout=15))
    )
    thread.start()
    try:
        assert app1.holding.wait(5)
        write_config(path, [cfg(app1, weight=2), dead, cfg(app3)], circuit_breaker=breaker)
        assert wait_for(lambda: "app3" in admin_backends(service), timeout=5)
        state = admin_backends(service)
        assert state["app1"]["weight"] == 2
        assert state["app1"]["in_flight"] == 1
        assert state["app1"]["requests_total"] == 2
        assert state["dead"]["circuit"] == "open"
        assert state["dead"]["failures_total"] == 1
        assert service.holder.runtime.find(name="app1") is kept_app1
        assert service.holder.runtime.find(name="dead") is kept_dead
    finally:
        app1.release.set()
        thread.join(10)
    assert held["r"].status_code == 200
    # The slot is given back in the body iterable's close(), which waitress may call a
    # moment after the client has read the last byte.
    assert wait_for(lambda: admin_backends(service)["app1"]["in_flight"] == 0, 5)


def test_a_removed_backend_finishes_its_in_flight_request(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, app2, _ = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1)])
    service = start_service(path)
    held: dict[str, Any] = {}

    def hold() -> None:
        held["r"] = requests.get(service.proxy_url + "/hold?keep=me", timeout=15)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert app1.holding.wait(5)
        write_config(path, [cfg(app2)])
        assert wait_for(lambda: list(admin_backends(service)) == ["app2"], timeout=5)
        before = len(app1.requests())
        assert served_by(http, service, 3) == ["app2"] * 3
        assert len(app1.requests()) == before
    finally:
        app1.release.set()
        thread.join(10)
    response = held["r"]
    assert response.status_code == 200
    assert len(response.content) == int(response.headers["Content-Length"])
    echoed = json.loads(response.content)
    assert (echoed["backend"], echoed["target"]) == ("app1", "/hold?keep=me")


def test_restart_settings_are_logged_and_ignored(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app1, app2, _ = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1)], threads=4)
    service = start_service(path)
    proxy_url, admin_url = service.proxy_url, service.admin_url
    new_proxy, new_admin = free_ports(2)

    with caplog.at_level(logging.INFO, logger="pyproxy.runtime.swap"):
        write_config(
            path,
            [cfg(app1), cfg(app2)],
            threads=12,
            listen=f"127.0.0.1:{new_proxy}",
            admin={"listen": f"127.0.0.1:{new_admin}", "token": TOKEN},
        )
        assert wait_for(lambda: "app2" in admin_backends(service), timeout=5)
        lines = (
            f"listen: 127.0.0.1:0 -> 127.0.0.1:{new_proxy} (needs a restart)",
            "threads: 4 -> 12 (needs a restart)",
            f"admin.listen: 127.0.0.1:0 -> 127.0.0.1:{new_admin} (needs a restart)",
        )
        # The summary is logged just after the swap: wait for it, not for the swap.
        assert wait_for(lambda: all(line in caplog.text for line in lines), timeout=5), caplog.text
    # The rest of the file was applied; the listeners stayed where they were.
    assert reload_metrics(service) == (1, 0, 1)
    assert (service.proxy_url, service.admin_url) == (proxy_url, admin_url)
    assert service.holder.runtime.config.threads == 4
    assert http.get(proxy_url + "/", timeout=5).status_code == 200
    for port in (new_proxy, new_admin):
        with pytest.raises(requests.ConnectionError):
            http.get(f"http://127.0.0.1:{port}/livez", timeout=2)


# -- POST /admin/reload -----------------------------------------------------------------


def test_admin_reload_returns_the_summary_or_the_problems(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, app2, app3 = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1), cfg(app2)])
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()  # only the route reloads in this test

    write_config(path, [cfg(app1, weight=5), cfg(app3)], strategy="least_connections")
    response = admin_reload(http, service, TOKEN)
    assert response.status_code == 200
    assert response.json() == {
        "reloaded": True,
        "changes": [
            f"backends: added app3 ({app3.url})",
            f"backends: removed app2 ({app2.url})",
            "backends[app1].weight: 1 -> 5",
            "strategy: round_robin -> least_connections",
        ],
    }
    assert list(admin_backends(service)) == ["app1", "app3"]
    assert reload_metrics(service) == (1, 0, 1)

    response = admin_reload(http, service, TOKEN)  # nothing changed since
    assert response.status_code == 200
    assert response.json() == {"reloaded": True, "changes": []}

    write_config(path, [cfg(app1, weight="heavy")], timeouts={"connect": "soon"})
    response = admin_reload(http, service, TOKEN)
    assert response.status_code == 400
    payload = response.json()
    assert payload["reloaded"] is False
    problems = payload["problems"]
    assert any(p.startswith("backends[0].weight:") for p in problems), problems
    assert any(p.startswith("timeouts.connect:") for p in problems), problems
    assert list(admin_backends(service)) == ["app1", "app3"]
    assert admin_backends(service)["app1"]["weight"] == 5
    assert reload_metrics(service) == (2, 1, 0)

    path.unlink()
    response = admin_reload(http, service, TOKEN)
    assert response.status_code == 400
    assert "cannot read the file" in response.json()["problems"][0]


def test_a_write_landing_as_a_reload_finishes_is_applied(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, app2, app3 = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1)])
    service = start_service(path)
    reload = service.swap.reload
    landed = threading.Event()

    def reload_then_write(trigger: str) -> Any:
        result = reload(trigger)
        if not landed.is_set():
            landed.set()
            write_config(path, [cfg(app3)])  # the next edit lands just now
        return result

    service.swap.reload = reload_then_write  # type: ignore[method-assign]
    write_config(path, [cfg(app2)])
    assert wait_for(landed.is_set, timeout=5)
    assert wait_for(lambda: list(admin_backends(service)) == ["app3"], timeout=3), list(
        admin_backends(service)
    )


def test_overlapping_reloads_end_with_the_newest_file(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGHUP right after an edit, and the next edit lands while that reload is still
    # parsing: whichever reload finishes last must not put the older file back.
    app1, app2, app3 = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1)])
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()  # only the two reloads below run
    real_load = sources.load_config
    loaded, go = threading.Event(), threading.Event()

    def slow_first_load(file: str, *args: Any, **kwargs: Any) -> Any:
        config = real_load(file, *args, **kwargs)
        if not loaded.is_set():
            loaded.set()  # the first reload has read the file ...
            go.wait(5)  # ... and is slow to get on with it
        return config

    monkeypatch.setattr(sources, "load_config", slow_first_load)
    write_config(path, [cfg(app2)])
    first = threading.Thread(target=service.reload, args=("SIGHUP",))
    first.start()
    try:
        assert loaded.wait(5)
        write_config(path, [cfg(app3)])  # the newest file
        second = threading.Thread(target=service.reload, args=("admin API",))
        second.start()
        second.join(1.0)  # the window in which a second reload may overtake the first
    finally:
        go.set()
    first.join(10)
    second.join(10)
    assert list(admin_backends(service)) == ["app3"]


# -- races between a request and a swap --------------------------------------------------
#
# A request reads `holder.runtime` once. These tests put a reload exactly between that
# read and the moment the request picks a backend, by hooking one instance (the
# Runtime the request holds, or a Backend), so the interleaving is certain, not lucky.


def test_a_request_begun_before_a_reload_that_replaced_every_backend_is_served(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, app2, _ = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1)])
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()  # the hook below reloads, at the chosen moment
    write_config(path, [cfg(app2)])
    old = service.holder.runtime.default_pool  # the request's pool in that snapshot
    original = old.candidates
    reloaded = threading.Event()

    def reload_first(*args: Any, **kwargs: Any) -> Any:
        if not reloaded.is_set():
            reloaded.set()
            assert service.reload("test").ok
        return original(*args, **kwargs)

    object.__setattr__(old, "candidates", reload_first)  # this snapshot only
    response = http.get(service.proxy_url + "/", timeout=5)
    assert reloaded.is_set()
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend"] == "app2"


def test_a_backend_picked_just_before_its_removal_still_serves_the_request(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, app2, _ = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1), cfg(app2)], strategy="round_robin")
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()
    leaving = service.holder.runtime.find(name="app1")
    assert leaving is not None
    original = leaving.try_acquire
    removed = threading.Event()

    def remove_first() -> bool:
        # The request chose app1 from its snapshot; now a reload takes app1 out and,
        # with nothing in flight, closes its pool at once.
        if not removed.is_set():
            removed.set()
            write_config(path, [cfg(app2)], strategy="round_robin")
            assert service.reload("test").ok
        return original()

    leaving.try_acquire = remove_first  # type: ignore[method-assign]
    statuses = [http.get(service.proxy_url + "/", timeout=5).status_code for _ in range(2)]
    assert removed.is_set()
    assert statuses == [200, 200]


# -- reload under traffic ---------------------------------------------------------------


def test_reload_under_steady_traffic_fails_no_request(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
) -> None:
    app1, app2, app3 = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [cfg(app1), cfg(app2)])
    service = start_service(path)
    # Reloads go through the admin route, which returns once the reload is complete:
    # back-to-back writes through the watcher can lose one (the race of
    # test_a_write_landing_as_a_reload_finishes_is_applied), and that is not this test.
    assert service.watcher is not None
    service.watcher.stop()
    stop = threading.Event()
    outcomes: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            session.trust_env = False
            deadline = time.monotonic() + 30
            while not stop.is_set() and len(outcomes) < 5000 and time.monotonic() < deadline:
                try:
                    response = session.get(service.proxy_url + "/steady", timeout=5)
                    ok = response.status_code == 200 and json.loads(response.content)
                    outcomes.append("ok" if ok else f"{response.status_code} {response.text}")
                except (requests.RequestException, ValueError) as error:
                    outcomes.append(repr(error))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    steps: list[tuple[list[BackendConfig], dict[str, Any]]] = [
        ([cfg(app2), cfg(app3)], {}),
        ([cfg(app1, weight=3), cfg(app3)], {"strategy": "weighted"}),
        ([cfg(app1)], {"strategy": "least_connections"}),
        ([cfg(app1), cfg(app2), cfg(app3)], {"strategy": "random"}),
        ([cfg(app3)], {}),
        ([cfg(app2), cfg(app3)], {}),
        ([cfg(app2), cfg(app1)], {}),
    ]
    # Consecutive sets share a backend: replacing the whole set at once is the race of
    # test_a_request_begun_before_a_reload_that_replaced_every_backend_is_served.
    try:
        for wanted, extra in steps:
            write_config(path, wanted, **extra)
            assert admin_reload(http, service, TOKEN).status_code == 200
            assert list(admin_backends(service)) == [b.name for b in wanted]
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    failures = [o for o in outcomes if o != "ok"]
    assert failures == []
    assert len(outcomes) >= 30  # the traffic really overlapped the reloads
    assert reload_metrics(service) == (len(steps), 0, 1)


# -- SIGHUP -----------------------------------------------------------------------------


def test_sighup_reloads_and_sigterm_exits_0(
    tmp_path: Path, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    # The file lives outside the watched directory (config.yaml is a symlink to it), so
    # an in-place edit makes no event the watcher sees: only SIGHUP can apply it.
    app1, app2, _ = three_backends
    proxy_port, admin_port = free_ports(2)
    extra = {"listen": f"127.0.0.1:{proxy_port}"}
    extra["admin"] = {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN}  # type: ignore[assignment]
    real = tmp_path / "elsewhere" / "real.yaml"
    real.parent.mkdir()
    real.write_text(yaml.safe_dump(document([cfg(app1)], **extra)))
    link = tmp_path / "etc" / "pyproxy.yaml"
    link.parent.mkdir()
    link.symlink_to(real)
    admin_url = f"http://127.0.0.1:{admin_port}"
    log_path = tmp_path / "stderr.log"

    def names() -> list[str]:
        try:
            return list(admin_backends(admin_url))
        except requests.ConnectionError:
            return []

    with open(log_path, "wb") as log_file:
        process = spawn_pyproxy(link, log_file)
    try:
        assert wait_for(lambda: names() == ["app1"], timeout=15), log_path.read_text()
        write_in_place(real, yaml.safe_dump(document([cfg(app1), cfg(app2)], **extra)))
        process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: names() == ["app1", "app2"], timeout=5), log_path.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    log = log_path.read_text()
    assert f"reload (SIGHUP): backends: added app2 ({app2.url})" in log
    assert "Traceback" not in log


# -- secrets ---------------------------------------------------------------------------


def test_store_passwords_never_reach_the_reload_log_or_answer(
    tmp_path: Path,
    echo_backend: EchoBackend,
    start_service: Callable[[Path], Service],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = closed_port()  # never contacted: no request goes through the limiter here
    limit = {"per_client": "100/minute"}
    path = tmp_path / "pyproxy.yaml"
    store = f"redis://:first-Secret@127.0.0.1:{port}/0"
    write_config(path, [cfg(echo_backend)], rate_limit={**limit, "store": store})
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()  # only the route reloads in this test
    answers = []
    with caplog.at_level(logging.DEBUG):
        # The host and the password change: the host is shown, the password is not.
        store = f"redis://ops:second-Secret@localhost:{port}/1"
        write_config(path, [cfg(echo_backend)], rate_limit={**limit, "store": store})
        answers.append(admin_reload(http, service, TOKEN))
        # Only the password changes: nothing can be shown but that it changed.
        store = f"redis://ops:third-Secret@localhost:{port}/1"
        write_config(path, [cfg(echo_backend)], rate_limit={**limit, "store": store})
        answers.append(admin_reload(http, service, TOKEN))
        # An invalid store: the problem names the field, not the password.
        store = "redis://:fourth-Secret@localhost:99999/0"
        write_config(path, [cfg(echo_backend)], rate_limit={**limit, "store": store})
        answers.append(admin_reload(http, service, TOKEN))
    assert [answer.status_code for answer in answers] == [200, 200, 400]
    assert answers[0].json()["changes"] == [
        f"rate_limit.store: redis://:***@127.0.0.1:{port}/0 -> redis://ops:***@localhost:{port}/1"
    ]
    assert answers[1].json()["changes"] == ["rate_limit.store: changed"]
    problems = answers[2].json()["problems"]
    assert problems[0].startswith("rate_limit.store: must be memory, redis:// or rediss://")
    assert "redis://:***@localhost:99999/0" in problems[0]
    everything = caplog.text + "".join(answer.text for answer in answers)
    assert "rate_limit.store" in caplog.text  # the lines were logged ...
    assert "Secret" not in everything  # ... without a password


# -- what a reload can and cannot apply --------------------------------------------------


def test_limits_need_a_restart_and_the_summary_says_so(
    tmp_path: Path,
    echo_backend: EchoBackend,
    start_service: Callable[[Path], Service],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The edge server reads `limits` once, when it is built: a reload used to list
    `limits.max_request_body: 1000 -> 100` like any applied change."""
    path = tmp_path / "pyproxy.yaml"
    limits = {"max_request_body": 1000, "header_timeout": "10s"}
    write_config(path, [cfg(echo_backend)], limits=limits)
    service = start_service(path)
    assert service.watcher is not None
    service.watcher.stop()  # only the route reloads in this test
    new_limits = {"max_request_body": 100, "header_timeout": "5s"}
    with caplog.at_level(logging.INFO, logger="pyproxy.runtime.swap"):
        write_config(path, [cfg(echo_backend)], limits=new_limits, strategy="random")
        answer = admin_reload(http, service, TOKEN)
    assert answer.status_code == 200
    assert answer.json()["changes"] == [
        "strategy: round_robin -> random",
        "limits.max_request_body: 1000 -> 100 (needs a restart)",
        "limits.header_timeout: 10 -> 5 (needs a restart)",
    ]
    for line in answer.json()["changes"]:
        assert line in caplog.text
    # True to its word: the old limit still holds, and the running config says so.
    assert http.post(service.proxy_url + "/", data=b"x" * 500, timeout=5).status_code == 200
    assert http.post(service.proxy_url + "/", data=b"x" * 1001, timeout=5).status_code == 413
    assert service.holder.runtime.config.limits.max_request_body == 1000
    assert service.holder.runtime.config.strategy == "random"
