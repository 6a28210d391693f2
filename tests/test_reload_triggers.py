"""One reload entry: the file watcher, SIGHUP and `POST /admin/reload` have the same
effects, and a change is applied once, whichever trigger saw it first.

A real Service is started from a YAML file in tmp_path (listeners on port 0); the
reloads are counted where an operator counts them, in
`proxy_config_reloads_total` on /metrics. See docs/reload.md.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from backends import EchoBackend, wait_for
from conftest import admin_backends, admin_reload, metric_value, replace_file

from pyproxy.config.schema import BackendConfig
from pyproxy.process.service import Service
from pyproxy.runtime import watcher

TOKEN = "trigger-test-token"


def write_config(path: Path, backends: list[EchoBackend], **extra: Any) -> None:
    """Write the file as editors do: a temp file renamed over the original."""
    document: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "health_check": {"enabled": False},
        "access_log": {"enabled": False},
        "backends": [dataclasses.asdict(BackendConfig(url=b.url, name=b.name)) for b in backends],
    }
    document.update(extra)
    replace_file(path, yaml.safe_dump(document))


def successful_reloads(service: Service) -> float:
    # no sample before the first reload
    return metric_value(service, "proxy_config_reloads_total", result="success") or 0.0


def test_an_admin_reload_of_a_changed_file_applies_it_once(
    tmp_path: Path,
    three_backends: list[EchoBackend],
    start_service: Callable[[Path], Service],
    http: requests.Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app1, app2, app3 = three_backends
    path = tmp_path / "pyproxy.yaml"
    write_config(path, [app1])
    # The watcher hashes the file once its events have settled. Hold it right there
    # until the admin reload has applied the same bytes, so the two interleave in the
    # one order that matters here, every time.
    real_digest = watcher.file_digest
    watcher_checking, admin_done = threading.Event(), threading.Event()

    def held_digest(file: str) -> str | None:
        if threading.current_thread().name == "pyproxy-reload" and not watcher_checking.is_set():
            watcher_checking.set()
            admin_done.wait(10)
        return real_digest(file)

    monkeypatch.setattr(watcher, "file_digest", held_digest)
    service = start_service(path)

    write_config(path, [app1, app2])
    try:
        assert watcher_checking.wait(10), "the watcher did not notice the write"
        response = admin_reload(http, service, TOKEN)
    finally:
        admin_done.set()
    assert response.status_code == 200, response.text
    assert response.json()["changes"] == [f"backends: added app2 ({app2.url})"]

    # The watcher handles one change at a time: once it has applied the next write,
    # its pass over the first one is over, and it must not have reloaded that again.
    write_config(path, [app3])
    assert wait_for(lambda: list(admin_backends(service)) == ["app3"], timeout=10)
    assert successful_reloads(service) == 2  # the admin's, then the watcher's


@pytest.mark.parametrize("trigger", ["SIGHUP", "admin API", "file change"])
def test_every_trigger_reopens_the_access_log(
    tmp_path: Path,
    echo_backend: EchoBackend,
    start_service: Callable[[Path], Service],
    http: requests.Session,
    trigger: str,
) -> None:
    # logrotate moves the file away, then asks for a reload: whichever way the reload
    # comes, the next line goes to a new file at the configured path.
    path, access_log = tmp_path / "pyproxy.yaml", tmp_path / "access.log"
    access = {"enabled": True, "path": str(access_log)}
    write_config(path, [echo_backend], access_log=access)
    service = start_service(path)
    assert http.get(service.proxy_url + "/before", timeout=5).status_code == 200
    assert wait_for(lambda: access_log.exists() and "/before" in access_log.read_text())
    access_log.rename(tmp_path / "access.log.1")

    if trigger == "SIGHUP":
        assert service.reload("SIGHUP").ok  # what the SIGHUP handler calls
    elif trigger == "admin API":
        assert admin_reload(http, service, TOKEN).status_code == 200
    else:
        write_config(path, [echo_backend], access_log=access, strategy="random")
        assert wait_for(lambda: successful_reloads(service) == 1, timeout=10)

    assert http.get(service.proxy_url + "/after", timeout=5).status_code == 200
    assert wait_for(lambda: access_log.exists() and "/after" in access_log.read_text())
    assert "/after" not in (tmp_path / "access.log.1").read_text()
