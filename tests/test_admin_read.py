"""Admin reads (and the metric series they expose), over the real admin listener.

Reads need no token. Every figure checked here was caused by traffic the test sent
through the proxy listener, so a counter that is never incremented fails a test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import requests
from backends import RESET, EchoBackend, ScriptedBackend, closed_port, wait_for
from conftest import ProxyFactory, admin_backends, metric_value

from pyproxy.config.schema import Address, AdminConfig, BackendConfig
from pyproxy.process.service import Service

BACKEND_FIELDS = {
    "name": str,
    "url": str,
    "weight": int,
    "source": str,
    "healthy": bool,
    "circuit": str,
    "available": bool,
    "in_flight": int,
    "max_connections": int,
    "requests_total": int,
    "failures_total": int,
    "drain": bool,
    "file_weight": int,
}


# -- probes -------------------------------------------------------------------------------


def test_livez_is_ok(proxy: Service, http: requests.Session) -> None:
    response = http.get(proxy.admin_url + "/livez", timeout=5)

    assert response.status_code == 200
    assert response.text.strip() == "ok"


def test_readyz_is_200_with_an_available_backend(proxy: Service, http: requests.Session) -> None:
    assert http.get(proxy.admin_url + "/readyz", timeout=5).status_code == 200


def test_readyz_is_503_with_no_backends(make_proxy: ProxyFactory, http: requests.Session) -> None:
    proxy = make_proxy([])

    assert http.get(proxy.admin_url + "/readyz", timeout=5).status_code == 503


def test_readyz_is_503_when_every_backend_is_drained(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([BackendConfig(url=echo_backend.url, name="drained", weight=0)])

    assert http.get(proxy.admin_url + "/readyz", timeout=5).status_code == 503


def test_readyz_turns_503_at_once_on_shutdown_while_livez_stays_ok(
    proxy: Service, http: requests.Session
) -> None:
    proxy.request_shutdown()

    assert http.get(proxy.admin_url + "/readyz", timeout=5).status_code == 503
    assert http.get(proxy.admin_url + "/livez", timeout=5).status_code == 200


def test_probes_are_served_on_the_admin_listener_only(
    proxy: Service, echo_backend: EchoBackend, http: requests.Session
) -> None:
    # On the proxy listener, /livez is just a path like any other: it is forwarded.
    response = http.get(proxy.proxy_url + "/livez", timeout=5)

    assert response.headers.get("X-Backend") == "echo"
    assert [r.target for r in echo_backend.requests()] == ["/livez"]


def test_reads_need_no_token_even_when_one_is_configured(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    admin = AdminConfig(listen=Address("127.0.0.1", 0), token="s3cret-token")
    guarded = make_proxy([echo_backend], admin=admin)

    for path in ("/livez", "/readyz", "/metrics", "/admin/backends"):
        assert http.get(guarded.admin_url + path, timeout=5).status_code == 200, path


# -- /metrics -----------------------------------------------------------------------------


def test_metrics_count_requests_by_backend_method_and_code(
    proxy: Service, http: requests.Session
) -> None:
    for _ in range(3):
        assert http.get(proxy.proxy_url + "/a", timeout=5).status_code == 200
    assert http.post(proxy.proxy_url + "/b", data=b"x", timeout=5).status_code == 200
    assert http.get(proxy.proxy_url + "/status/404", timeout=5).status_code == 404

    response = http.get(proxy.admin_url + "/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain")
    get_200 = metric_value(proxy, "proxy_requests_total", backend="echo", method="GET", code="200")
    post_200 = metric_value(
        proxy, "proxy_requests_total", backend="echo", method="POST", code="200"
    )
    get_404 = metric_value(proxy, "proxy_requests_total", backend="echo", method="GET", code="404")
    assert (get_200, post_200, get_404) == (3.0, 1.0, 1.0)
    count = metric_value(proxy, "proxy_request_duration_seconds_count", backend="echo")
    assert count == 5.0


def test_metrics_name_no_backend_with_an_empty_label(
    make_proxy: ProxyFactory, http: requests.Session
) -> None:
    proxy = make_proxy([])
    assert http.get(proxy.proxy_url + "/x", timeout=5).status_code == 503

    assert metric_value(proxy, "proxy_requests_total", backend="", code="503") == 1.0
    assert metric_value(proxy, "proxy_errors_total", backend="", reason="no_backend") == 1.0


def test_metrics_count_a_refused_connection_as_connect_error(
    make_proxy: ProxyFactory, http: requests.Session
) -> None:
    proxy = make_proxy([BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name="gone")])
    assert http.get(proxy.proxy_url + "/x", timeout=5).status_code == 502

    assert metric_value(proxy, "proxy_errors_total", backend="gone", reason="connect_error") == 1.0
    assert metric_value(proxy, "proxy_requests_total", backend="gone", code="502") == 1.0


def test_metrics_show_each_backend_up_and_its_circuit_closed(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    proxy = make_proxy(three_backends)

    for backend in three_backends:
        assert metric_value(proxy, "proxy_backend_up", backend=backend.name) == 1.0
        assert metric_value(proxy, "proxy_circuit_state", backend=backend.name) == 0.0


# -- /admin/backends -----------------------------------------------------------------------


def test_admin_backends_lists_every_backend_with_the_spec_fields(
    make_proxy: ProxyFactory, three_backends: list[EchoBackend], http: requests.Session
) -> None:
    app1, app2, app3 = three_backends
    configs = [
        BackendConfig(url=app1.url, name="app1", weight=3),
        BackendConfig(url=app2.url, name="app2", weight=0),
        BackendConfig(url=app3.url, name="app3", max_connections=7),
    ]
    proxy = make_proxy(configs, strategy="weighted")
    for _ in range(4):
        assert http.get(proxy.proxy_url + "/x", timeout=5).status_code == 200

    response = http.get(proxy.admin_url + "/admin/backends", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    payload = response.json()

    assert payload["strategy"] == "weighted"
    assert payload["removed"] == []  # the admin removed none of the file's backends
    listed = {b["name"]: b for b in payload["backends"]}
    assert list(listed) == ["app1", "app2", "app3"]
    for entry in listed.values():
        for field, kind in BACKEND_FIELDS.items():
            assert isinstance(entry.get(field), kind), (field, entry)
        assert entry["source"] == "config"
        assert entry["circuit"] == "closed"
        assert entry["healthy"] is True
        assert entry["in_flight"] == 0
        assert entry["failures_total"] == 0
        assert entry["drain"] is False
        assert entry["admin_weight"] is None  # no admin override: the weight is the file's
    assert [listed[n]["url"] for n in ("app1", "app2", "app3")] == [app1.url, app2.url, app3.url]
    assert [listed[n]["weight"] for n in ("app1", "app2", "app3")] == [3, 0, 1]
    assert [listed[n]["max_connections"] for n in ("app1", "app2", "app3")] == [0, 0, 7]
    assert [listed[n]["available"] for n in ("app1", "app2", "app3")] == [True, False, True]
    counts = [listed[n]["requests_total"] for n in ("app1", "app2", "app3")]
    assert counts == [len(app1.requests()), 0, len(app3.requests())] == [3, 0, 1]


def test_admin_backends_shows_a_request_in_flight(
    proxy: Service, echo_backend: EchoBackend, http: requests.Session
) -> None:
    def hold() -> None:
        with requests.Session() as session:
            session.trust_env = False
            session.get(proxy.proxy_url + "/hold", timeout=10)

    pinned = threading.Thread(target=hold, name="test-hold", daemon=True)
    pinned.start()
    try:
        assert echo_backend.holding.wait(5)
        entry = admin_backends(proxy)["echo"]
        assert entry["in_flight"] == 1
        assert metric_value(proxy, "proxy_backend_in_flight", backend="echo") == 1.0
    finally:
        echo_backend.release.set()
        pinned.join(timeout=10)
    assert wait_for(lambda: admin_backends(proxy)["echo"]["in_flight"] == 0)


def test_admin_backends_counts_a_failed_request(
    make_proxy: ProxyFactory,
    make_scripted_backend: Callable[..., ScriptedBackend],
    http: requests.Session,
) -> None:
    scripted = make_scripted_backend({"/reset": [RESET]})
    proxy = make_proxy([scripted])
    assert http.get(proxy.proxy_url + "/reset", timeout=5).status_code == 502

    entry = admin_backends(proxy)["scripted"]

    assert (entry["requests_total"], entry["failures_total"]) == (1, 1)
    assert metric_value(proxy, "proxy_errors_total", backend="scripted", reason="reset") == 1.0


@pytest.mark.parametrize("path", ["/nope", "/admin", "/admin/backends/app1"])
def test_unknown_admin_paths_are_404(proxy: Service, http: requests.Session, path: str) -> None:
    assert http.get(proxy.admin_url + path, timeout=5).status_code == 404


def test_answers_that_quote_the_request_are_never_sniffed_as_html(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """The admin listener is opened in browsers (the status page). A 404 quotes the
    path it was asked for; a link to `/<script>...` must not run as a page, whatever
    a browser's content sniffing thinks of the body."""
    service = make_proxy([echo_backend])
    hostile = "/%3Cscript%3Ealert(1)%3C/script%3E"
    for path in (hostile, "/admin/backends", "/metrics", "/livez"):
        response = http.get(service.admin_url + path, timeout=5)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
    response = http.get(service.admin_url + hostile, timeout=5)
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("text/plain")
