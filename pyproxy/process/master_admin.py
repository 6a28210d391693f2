"""The master's admin API: the single pyproxy's routes, answered for all workers.

- changes (add/remove/set-backend, reload): the master applies each to its own copy
  of the config and admin changes first (that copy validates it, keeps the state
  file and is what a replaced worker starts with), then the same request goes to
  every worker; an answer names each worker that did not apply it.
- GET /admin/backends: one worker's answer, each backend with its state in every
  worker (`"workers": {"available": 3, "of": 4, "by_pid": {...}}`).
- GET /metrics: every worker's counters and histograms summed (prometheus-client's
  multiprocess mode), the master's `proxy_worker_restarts_total`, and the
  per-backend gauges of each worker with a `worker` label.
- /livez is the master's own; /readyz is 200 while one worker is ready.
- /admin/status: one worker's page (its health checks are its own), headed by each
  backend's availability in every worker.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pyproxy.ops.admin import STATUS_LINES, AdminApp, Reply, json_reply, text
from pyproxy.process.fanout import Answer, fan_out

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
# What /admin/backends shows of each backend in each worker.
BY_WORKER = ("available", "health", "circuit", "in_flight", "requests_total")
OWN_HEADERS = ("Content-Type", "Content-Length", "X-Content-Type-Options")  # set in __call__
CHANGES = ("/admin/add-backend", "/admin/remove-backend", "/admin/set-backend", "/admin/reload")


class Workers(Protocol):
    token: str  # the bearer token between the master and its workers
    # Held while a change is applied everywhere and while a worker is started, so a
    # worker either starts with a change or is sent it, and changes arrive in order.
    changes_lock: threading.Lock

    def ports(self, *, starting: bool) -> dict[int, int]:
        """{pid: admin port} of the workers serving now; `starting`: and of those
        starting, waiting until they serve."""
        ...

    def metrics_page(self, worker_pages: list[tuple[int, bytes]]) -> bytes: ...


class MasterAdmin:
    def __init__(self, own: AdminApp, workers: Workers) -> None:
        self.own = own  # the master's AdminApp: authorisation, validation, the state file
        self.workers = workers

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if method == "POST" and path in CHANGES:
            with self.workers.changes_lock:
                reply = self.change(environ)
        elif method in ("GET", "HEAD") and path == "/admin/backends":
            reply = self.backends()
        elif method in ("GET", "HEAD") and path == "/metrics":
            reply = self.metrics()
        elif method in ("GET", "HEAD") and path == "/readyz" and not self.own.instance.ready():
            reply = text(503, "shutting down")
        elif method in ("GET", "HEAD") and path == "/readyz":
            reply = self.first_worker(path)
        elif method in ("GET", "HEAD") and path == "/admin/status":
            reply = self.status_page()
        else:
            return self.own(environ, start_response)
        status, content_type, body, extra = reply
        start_response(
            STATUS_LINES.get(status, f"{status} Error"),
            [("Content-Type", content_type), ("Content-Length", str(len(body))),
             ("X-Content-Type-Options", "nosniff"), *extra],
        )  # fmt: skip
        return [body] if method != "HEAD" else []

    def tell_workers(self, path: str) -> list[Answer]:
        """A change the master applied itself (SIGHUP, the file watch): the answers that
        were not ok. The caller holds changes_lock."""
        return [a for a in self._ask_all("POST", path) if not a.ok]

    def _ask_all(self, method: str, path: str, body: bytes = b"") -> list[Answer]:
        headers = {"Authorization": f"Bearer {self.workers.token}"}
        if body:
            headers["Content-Type"] = "application/json"
        # A change must reach the workers still starting too; a read needs only those serving.
        ports = self.workers.ports(starting=method == "POST")
        return fan_out(ports, method, path, body=body, headers=headers)

    def change(self, environ: dict[str, Any]) -> Reply:
        """Applied by the master (which refuses what is invalid), then by every worker."""
        # Read once here (waitress bounds it by limits.max_request_body), replayed to
        # the master's own AdminApp, then sent to each worker.
        length = environ.get("CONTENT_LENGTH") or ""
        raw = environ["wsgi.input"].read(int(length)) if length.isdigit() else b""
        captured: list[Any] = []

        def keep(status: str, headers: list[tuple[str, str]], *args: Any) -> None:
            captured[:] = [int(status.split()[0]), headers]

        environ = {**environ, "wsgi.input": _Body(raw), "CONTENT_LENGTH": str(len(raw))}
        body = b"".join(self.own(environ, keep))
        status, headers = captured
        content_type = dict(headers).get("Content-Type", "application/json")
        extra = [(k, v) for k, v in headers if k not in OWN_HEADERS]  # WWW-Authenticate
        if not 200 <= status < 300:
            return status, content_type, body, extra  # refused in the master: nowhere
        failed = [a for a in self._ask_all("POST", environ["PATH_INFO"], raw) if not a.ok]
        if not failed:
            return status, content_type, body, extra
        for answer in failed:
            log.error("worker %d did not apply %s: %s", answer.pid, environ["PATH_INFO"],
                      answer.problem or answer.body.decode(errors="replace")[:200])  # fmt: skip
        return json_reply(502, {
            "applied_by_master": json.loads(body) if content_type.startswith("application/json")
            else body.decode(errors="replace"),
            "not_applied_by_workers": [
                {"pid": a.pid, "status": a.status,
                 "problem": a.problem or a.body.decode(errors="replace")[:500]} for a in failed
            ],
        })  # fmt: skip

    def backends(self) -> Reply:
        answers = [a for a in self._ask_all("GET", "/admin/backends") if a.ok]
        if not answers:
            return text(503, "503 Service Unavailable: no worker answered")
        views = {a.pid: json.loads(a.body) for a in answers}
        merged = views[answers[0].pid]
        for backend in merged["backends"]:
            by_pid = {}
            for pid, view in views.items():
                same = [b for b in view["backends"] if b["url"] == backend["url"]]
                if same:
                    by_pid[str(pid)] = {k: same[0][k] for k in BY_WORKER}
            available = sum(1 for state in by_pid.values() if state["available"])
            backend["workers"] = {"available": available, "of": len(views), "by_pid": by_pid}
        merged["workers"] = sorted(views)
        return json_reply(200, merged)

    def metrics(self) -> Reply:
        # Each worker sets its in-flight gauge and renders its own backend gauges when
        # scraped: the master reads the worker-local ones from these pages.
        pages = [(a.pid, a.body) for a in self._ask_all("GET", "/metrics") if a.ok]
        body = self.workers.metrics_page(pages)
        return 200, "text/plain; version=0.0.4; charset=utf-8", body, []

    def status_page(self) -> Reply:
        """One worker's page, with each backend's availability in every worker on top."""
        status, content_type, body, extra = self.first_worker("/admin/status")
        listing = self.backends()
        if status != 200 or listing[0] != 200:
            return status, content_type, body, extra
        view = json.loads(listing[2])
        rows = "".join(
            f"<li>{html.escape(b['name'])}: available in {b['workers']['available']}"
            f" of {b['workers']['of']} workers</li>"
            for b in view["backends"]
        )
        section = (f"<section><h2>Workers: {len(view['workers'])}</h2>"
                   f"<p>This page is one worker's view.</p><ul>{rows}</ul></section>")  # fmt: skip
        page = body.replace(b"</header>", b"</header>" + section.encode(), 1)
        return status, content_type, page, extra

    def first_worker(self, path: str) -> Reply:
        answers = self._ask_all("GET", path)
        best = next((a for a in answers if a.ok), answers[0] if answers else None)
        if best is None:
            return text(503, "503 Service Unavailable: no worker serving")
        kind = "text/html; charset=utf-8" if path == "/admin/status" else "text/plain"
        return best.status or 503, kind, best.body, []


class _Body:
    """The request body already read, as wsgi.input for the master's own AdminApp."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        data, self.raw = (self.raw, b"") if size < 0 else (self.raw[:size], self.raw[size:])
        return data
