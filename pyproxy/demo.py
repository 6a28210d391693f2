"""`--demo`: three small backends in this process and a proxy in front of them.

A newcomer sees balancing (each answer names its backend), health checks (each
backend serves /health, and `/toggle-health` makes it fail), and the admin API,
in one command. The backends are plain WSGI apps on waitress, on ports 9001-9003
when free (the example config.yaml points there), else on ephemeral ports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

from waitress.server import create_server

from pyproxy.config import Address, BackendConfig, Config
from pyproxy.configload import load_config

DEMO_PORTS = (9001, 9002, 9003)


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
    """The running demo backends: `urls` in order app1..app3; `close()` stops them."""

    def __init__(self) -> None:
        self.servers: list[Any] = []
        self.urls: list[str] = []
        for index, port in enumerate(DEMO_PORTS, start=1):
            app = demo_backend_app(f"app{index}")
            try:
                server = create_server(app, host="127.0.0.1", port=port, threads=4)
            except OSError:
                server = create_server(app, host="127.0.0.1", port=0, threads=4)
            self.servers.append(server)
            self.urls.append(f"http://127.0.0.1:{server.effective_port}")
        for index, server in enumerate(self.servers, start=1):
            threading.Thread(
                target=server.run, name=f"pyproxy-demo-app{index}", daemon=True
            ).start()

    def close(self) -> None:
        for server in self.servers:
            server.close()


def start_demo_backends() -> DemoBackends:
    return DemoBackends()


def demo_config(path: str, backends: DemoBackends) -> Config:
    """The config file's settings if it exists, with the demo backends and an admin token."""
    base = load_config(path) if os.path.exists(path) else Config()
    token = base.admin.token or secrets.token_urlsafe(12)
    return dataclasses.replace(
        base,
        backends=tuple(
            BackendConfig(url=url, name=f"app{i}") for i, url in enumerate(backends.urls, start=1)
        ),
        admin=dataclasses.replace(base.admin, token=token),
        listen=base.listen if base.source_path else Address("127.0.0.1", 8080),
    )


def banner(service: Any, backends: DemoBackends) -> str:
    proxy, admin = service.proxy_url, service.admin_url
    token = service.config.admin.token
    lines = [
        "",
        "pyproxy demo is running. Ctrl-C to stop.",
        f"  proxy:        {proxy}",
        f"  admin:        {admin}   (token: {token})",
        f"  backends:     {', '.join(backends.urls)}",
        "",
        "Try:",
        f"  for i in 1 2 3 4 5 6; do curl -s {proxy}/hello; done      # round robin",
        f"  curl -s {admin}/admin/backends                            # state of each backend",
        f"  curl -s {admin}/metrics | grep proxy_requests_total",
        f"  curl -s {backends.urls[0]}/toggle-health                   # make app1 fail its checks",
        f"  curl -s -H 'Authorization: Bearer {token}' -X POST \\\n"
        f'       {admin}/admin/remove-backend -d \'{{"name": "app2"}}\'',
        "",
    ]
    return "\n".join(lines)
