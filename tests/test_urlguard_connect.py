"""The SSRF guard where the connection is made (pool/connection.py calls
urlguard.resolve_allowed for every new connection to an admin-added backend), through
real sockets: a real pyproxy on port 0, its health probes, its proxy listener.

Names are answered by a patched `socket.getaddrinfo` (the resolver urllib3 uses), so
a test can change what a name means between two connections, as DNS rebinding does.
Nothing is ever sent to a non-loopback address: the guard refuses before connecting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import requests
from backends import EchoBackend, wait_for
from conftest import ProxyFactory, base_config
from prometheus_client import CollectorRegistry

from pyproxy.config.schema import Address, AdminConfig, HealthCheckConfig
from pyproxy.pool.backend import Backend
from pyproxy.process.service import Service

TOKEN = "t0ken-for-tests"
ADMIN = AdminConfig(listen=Address("127.0.0.1", 0), token=TOKEN)
GUARD_LOG = "pyproxy.pool.urlguard"


def add_backend(http: requests.Session, service: Service, url: str, name: str) -> None:
    response = http.post(
        service.admin_url + "/admin/add-backend",
        json={"url": url, "name": name},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    assert response.status_code == 201, response.text


def added(service: Service, name: str) -> Backend:
    backend = service.holder.runtime.find(name=name)
    assert backend is not None
    return backend


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == GUARD_LOG and r.levelno == logging.WARNING
    ]


def failed_probes(backend: Backend, more: int) -> None:
    """Wait until `more` further probes of `backend` have failed."""
    start = backend.health.fail_streak
    assert wait_for(lambda: backend.health.fail_streak >= start + more, timeout=20), (
        backend.health.fail_streak,
        backend.health.last_result,
    )


def test_a_refused_backend_is_logged_once_per_reason_not_once_per_probe(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    dns: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Probes dial every interval; the refusal holds on each, but the log says what
    changed (as nginx logs an upstream going down, not every failed try)."""
    port = echo_backend.url.rsplit(":", 1)[1]
    dns["probe-rebind.test"] = "127.0.0.1"
    health = HealthCheckConfig(enabled=True, path="/", interval=0.05, timeout=2.0)
    service = make_proxy([], admin=ADMIN, health_check=health)
    caplog.set_level(logging.INFO, logger=GUARD_LOG)
    add_backend(http, service, f"http://probe-rebind.test:{port}", "rebinding")
    backend = added(service, "rebinding")
    assert wait_for(lambda: backend.health.up, timeout=20)

    dns["probe-rebind.test"] = "2852039166"  # now the metadata address, spelled as one number
    failed_probes(backend, 4)
    assert len(refusals(caplog)) == 1, refusals(caplog)
    assert "link-local" in refusals(caplog)[0] and "probe-rebind.test" in refusals(caplog)[0]
    # The probe says it was the guard, not a backend that is down or not listening.
    assert "refused to connect to" in (backend.health.last_result or ""), backend.health.last_result

    dns["probe-rebind.test"] = "0.1.2.3"  # another reason: logged once more
    assert wait_for(lambda: len(refusals(caplog)) == 2, timeout=20), refusals(caplog)
    failed_probes(backend, 4)
    assert len(refusals(caplog)) == 2, refusals(caplog)
    assert "unspecified" in refusals(caplog)[1]

    dns["probe-rebind.test"] = "127.0.0.1"  # allowed again: said once, and forgotten
    assert wait_for(lambda: backend.health.up, timeout=20)
    allowed_again = [r for r in caplog.records if r.name == GUARD_LOG and "allowed" in r.message]
    assert len(allowed_again) == 1, caplog.text
    dns["probe-rebind.test"] = "2852039166"  # the first reason again, after a change: logged
    assert wait_for(lambda: len(refusals(caplog)) == 3, timeout=20), refusals(caplog)
    failed_probes(backend, 3)
    assert len(refusals(caplog)) == 3, refusals(caplog)


@pytest.mark.parametrize("listener", ["proxy", "admin"])
def test_a_name_that_later_resolves_to_an_own_listener_is_refused_at_connect_time(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    http: requests.Session,
    dns: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    listener: str,
) -> None:
    """DNS rebinding onto pyproxy itself: the name passed the admin check, then
    answered 127.0.0.1. Dialling the proxy port would loop; dialling the admin port
    would publish the admin API on the proxy port. Neither is dialled."""
    service = make_proxy([echo_backend], admin=ADMIN)
    server = service.proxy_server if listener == "proxy" else service.admin_server
    port = server.address[1]
    name = f"own-{listener}.test"
    dns[name] = "192.0.2.1"  # TEST-NET-1; nothing is sent while it says this
    add_backend(http, service, f"http://{name}:{port}", "loop")
    assert http.post(
        service.admin_url + "/admin/remove-backend",
        json={"name": "echo"},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    ).ok
    dns[name] = "127.0.0.1"
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        response = http.get(service.proxy_url + "/admin/backends", timeout=5)
    assert response.status_code == 502, response.text
    assert f"{name}:{port}: 127.0.0.1:{port} is one of pyproxy's own listeners" in caplog.text
    assert added(service, "loop").requests_total == 1


def test_a_worker_refuses_to_dial_its_masters_admin_listener(
    make_echo_backend: Callable[[str], EchoBackend],
    http: requests.Session,
    dns: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker's own listeners include its master's admin listener (`also_own`, as
    process/worker.py passes it): the master's admin API must not be reachable through
    a worker's proxy port either. An echo backend stands in for the master's admin."""
    serving, master_admin = make_echo_backend("serving"), make_echo_backend("master-admin")
    port = int(master_admin.url.rsplit(":", 1)[1])
    service = Service(
        base_config([serving], admin=ADMIN),
        registry=CollectorRegistry(),
        also_own=[("127.0.0.1", port)],
    )
    service.start()
    try:
        dns["master.test"] = "192.0.2.1"  # TEST-NET-1; nothing is sent while it says this
        add_backend(http, service, f"http://master.test:{port}", "master")
        dns["master.test"] = "127.0.0.1"
        with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
            answers = {http.get(service.proxy_url + "/", timeout=5).status_code for _ in range(4)}
    finally:
        service.close()
    assert 502 in answers, answers
    assert master_admin.requests() == []
    assert "own listeners" in caplog.text
