"""`--demo`: three small backends in this process and a proxy in front of them.

A newcomer sees balancing (each answer names its backend), health checks (each
backend serves /health, and `/toggle-health` makes it fail), the admin API and the
status page, in one command.

The demo is a world of its own: its settings are built here, in code, and no file is
read or watched (a `config.yaml` in the working directory belongs to someone else).
A reload (SIGHUP, `POST /admin/reload`) re-applies these same settings: it changes
nothing and keeps the admin token the banner printed.

Ports: the backends take 9001-9003 when free (the example config.yaml points there),
the proxy 8080 and the admin listener 8081; whatever is taken falls back to an
ephemeral port. The banner prints the ports actually bound.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

from pyproxy.config.schema import Address, AdminConfig, BackendConfig, Config, LimitsConfig
from pyproxy.edge.server import EdgeServer
from pyproxy.process.service import Service
from pyproxy.runtime.sources import FixedSource

DEMO_PORTS = (9001, 9002, 9003)
PROXY_PORT, ADMIN_PORT = 8080, 8081
HOST = "127.0.0.1"


def demo_backend_app(name: str) -> Callable[..., Iterable[bytes]]:
    state = {"healthy": True}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/health":
            status = "200 OK" if state["healthy"] else "503 Service Unavailable"
            body = b"ok\n" if state["healthy"] else b"unhealthy\n"
        elif path == "/toggle-health":
            state["healthy"] = not state["healthy"]
            status, body = "200 OK", f"{name} healthy={state['healthy']}\n".encode()
        else:
            status = "200 OK"
            body = (
                json.dumps({"backend": name, "path": environ.get("REQUEST_URI", path)}) + "\n"
            ).encode()
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class DemoBackends:
    """The running demo backends: `urls` in order app1..app3; `close()` stops them.

    Each runs on an EdgeServer (waitress with a loop pyproxy controls), not on
    waitress's own `server.run()`: that loop cannot be stopped, only have its sockets
    closed from another thread while it may be about to `select()` on them, which
    then fails with EBADF and kills the loop thread with a traceback (and a closed
    descriptor's number can be reused meanwhile). `EdgeServer.close()` stops the loop
    first and closes the sockets after it has exited.
    """

    def __init__(self, ports: tuple[int, ...] = DEMO_PORTS) -> None:
        """One backend per port (0 = an ephemeral port); a taken port falls back to 0."""
        self.servers: list[EdgeServer] = []
        self.urls: list[str] = []
        self._threads: list[threading.Thread] = []
        for index, port in enumerate(ports, start=1):
            name, app = f"demo-app{index}", demo_backend_app(f"app{index}")
            try:
                server = EdgeServer(app, HOST, port, threads=4, limits=LimitsConfig(), name=name)
            except OSError:
                server = EdgeServer(app, HOST, 0, threads=4, limits=LimitsConfig(), name=name)
            self.servers.append(server)
            self.urls.append(f"http://{HOST}:{server.address[1]}")
            thread = threading.Thread(
                target=server.serve_forever, name=f"pyproxy-{name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for thread in self._threads:
            thread.join(timeout=5)


def demo_config(backends: DemoBackends, port: int, admin_port: int, token: str) -> Config:
    """The demo's settings: defaults, its three backends, and an admin token."""
    return Config(
        backends=tuple(
            BackendConfig(url=url, name=f"app{i}") for i, url in enumerate(backends.urls, start=1)
        ),
        listen=Address(HOST, port),
        admin=AdminConfig(listen=Address(HOST, admin_port), token=token),
    )


def demo_service(backends: DemoBackends) -> Service:
    """The proxy in front of the demo backends, on 8080/8081 if free, else ephemeral
    ports. Its reloads re-apply its own config (FixedSource): nothing to read or watch."""
    token = secrets.token_urlsafe(12)
    config = demo_config(backends, PROXY_PORT, ADMIN_PORT, token)
    try:
        return Service(config, source=FixedSource(config))
    except OSError:
        config = demo_config(backends, 0, 0, token)
        return Service(config, source=FixedSource(config))


def banner(service: Service, backends: DemoBackends) -> str:
    """What is running, where, with which token, and a few commands to try."""
    proxy, admin = service.proxy_url, service.admin_url
    token = service.config.admin.token
    tries = [
        (f"for i in 1 2 3 4 5 6; do curl -s {proxy}/hello; done", "round robin"),
        (f"curl -s {admin}/admin/backends", "state of each backend"),
        (f"curl -s {admin}/metrics | grep proxy_requests_total", "counters"),
        (f"curl -s {backends.urls[0]}/toggle-health", "app1 fails its checks: down in ~15 s"),
        (f"{admin}/admin/status", "the status page: open it in a browser"),
    ]
    width = max(len(command) for command, _ in tries)
    return "\n".join(
        [
            "",
            "pyproxy demo is running. Ctrl-C to stop.",
            f"  proxy:     {proxy}",
            f"  admin:     {admin}   (token: {token})",
            f"  backends:  {', '.join(backends.urls)}",
            "",
            "Try:",
            *(f"  {command:<{width}}   # {note}" for command, note in tries),
            f"  curl -s -H 'Authorization: Bearer {token}' -X POST \\",
            f'       {admin}/admin/remove-backend -d \'{{"name": "app2"}}\'',
            "",
        ]
    )
