"""AdminApp: the WSGI app on the admin listener (docs/admin-api.md).

Reading needs no token: probes, metrics, the backend list. Changing anything needs
`Authorization: Bearer <token>`, compared in constant time. The routes are a table
at the bottom of the class, so the whole API can be seen in one place.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pyproxy.config.load import ConfigError, parse_backend
from pyproxy.config.report import redact_secrets
from pyproxy.config.values import backend_weight
from pyproxy.headers import via_names
from pyproxy.observe.metrics import Metrics
from pyproxy.ops import statuspage
from pyproxy.ops.admin_json import backend_json, pools_json, read_json
from pyproxy.ops.statuspage import render_status
from pyproxy.pool.urlguard import refuse_backend_url
from pyproxy.runtime.snapshot import RuntimeHolder
from pyproxy.runtime.swap import KEEP, RuntimeSwap

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
Reply = tuple[int, str, bytes, list[tuple[str, str]]]

STATUS_LINES = {
    200: "200 OK",
    201: "201 Created",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    413: "413 Content Too Large",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
    508: "508 Loop Detected",
}

SET_BACKEND_FIELDS = {"name", "weight", "drain"}


def _redact(value: str, token: str | None = None) -> str:
    """`value` with the password of any URL in it shown as `***` (redact_secrets), and
    the admin token, if it appears, too. Admin answers quote what they were given (a refused URL, a
    config problem, a reload's changes); a password or the token must never come back
    in one, nor in the logs that copy them.
    """
    value = redact_secrets(value)
    return value.replace(token, "***") if token else value


def text(status: int, body: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    body = _redact(body)
    return status, "text/plain; charset=utf-8", (body + "\n").encode(), headers or []


def json_reply(status: int, payload: object) -> Reply:
    return status, "application/json", json.dumps(payload, indent=1).encode(), []


class Instance(Protocol):
    """What the admin API reads of the running pyproxy, and nothing more (the Service
    provides it). The runtime, the metrics and the swap are handed in on their own."""

    instance_name: str  # this pyproxy's name in Via: a request carrying it is a loop
    started_at: float  # on `clock`, for the status page's uptime

    def clock(self) -> float: ...

    def ready(self) -> bool:
        """False once shutdown started: /readyz answers 503."""
        ...

    def requests_in_flight(self) -> int:
        """Requests in the proxy app now (the in-flight gauge, read at scrape)."""
        ...


class AdminApp:
    """Routes admin requests. `instance.ready()` says whether /readyz may say yes."""

    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        instance: Instance,
        swap: RuntimeSwap,
        own_addresses: Callable[[], list[tuple[str, int]]] = list,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.instance = instance
        self.swap = swap
        self.own_addresses = own_addresses
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any]], Reply]] = {
            ("GET", "/livez"): self.livez,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/metrics"): self.metrics_page,
            ("GET", "/admin/backends"): self.list_backends,
            ("GET", "/admin/status"): self.status_page,
            ("POST", "/admin/add-backend"): self.changes(self.add_backend),
            ("POST", "/admin/remove-backend"): self.changes(self.remove_backend),
            ("POST", "/admin/set-backend"): self.changes(self.set_backend),
            ("POST", "/admin/reload"): self.changes(self.reload),
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        handler = self.routes.get((method, path))
        if self.instance.instance_name in via_names(environ.get("HTTP_VIA")):
            # It came through this pyproxy's own proxy listener: a backend (whose name
            # now resolves here) must not publish the admin API on the proxy port.
            reply = text(508, "508 Loop Detected: this request came through this pyproxy")
        elif handler is None:
            if any(p == path for _, p in self.routes):
                reply = text(405, f"405 Method Not Allowed: {method} {path}")
            else:
                reply = text(404, f"404 Not Found: {path}")
        else:
            try:
                reply = handler(environ)
            except Exception:  # a bug here must not take the admin listener down
                log.exception("admin %s %s failed", method, path)
                reply = text(500, "500 Internal Server Error: see the pyproxy log")
        status, content_type, body, extra = reply
        start_response(
            STATUS_LINES.get(status, f"{status} Error"),
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                # Answers quote their request (a 404 its path): never sniff them as HTML.
                ("X-Content-Type-Options", "nosniff"),
                *extra,
            ],
        )
        return [body] if environ["REQUEST_METHOD"] != "HEAD" else []

    # -- authorisation -----------------------------------------------------------

    def authorize(self, environ: dict[str, Any]) -> Reply | None:
        """None if the request may change things, else the refusal to send."""
        token = self.holder.runtime.config.admin.token
        if not token:
            return text(403, "403 Forbidden: admin token not configured")
        given = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = given.partition(" ")
        # Constant-time comparison: timing must not reveal how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            return text(401, "401 Unauthorized: missing or wrong bearer token",
                        [("WWW-Authenticate", 'Bearer realm="pyproxy-admin"')])  # fmt: skip
        return None

    # -- read-only routes ----------------------------------------------------------

    def livez(self, environ: dict[str, Any]) -> Reply:
        return text(200, "ok")

    def readyz(self, environ: dict[str, Any]) -> Reply:
        if not self.instance.ready():
            return text(503, "shutting down")
        if not self.holder.runtime.candidates():
            return text(503, "no backend available")
        return text(200, "ready")

    def metrics_page(self, environ: dict[str, Any]) -> Reply:
        # Gauges of counts pyproxy keeps anyway are read at scrape time, not updated on
        # every request: the hot path pays nothing for them.
        # (The per-backend gauges are read from the running backends by the registry.)
        self.metrics.in_flight.set(self.instance.requests_in_flight())
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry), []

    def list_backends(self, environ: dict[str, Any]) -> Reply:
        runtime, admin = self.holder.runtime, self.holder.admin
        backends = [backend_json(runtime, backend) for backend in runtime.backends]
        # The file's backends the admin took out: an operator reading the file must
        # see why one of them is not serving.
        removed = [{"name": b.name, "url": b.url, "pool": pool}
                   for b, pool in admin.removed_from(runtime.config)]  # fmt: skip
        return json_reply(200, {"strategy": runtime.default_pool.config.strategy,
                                "backends": backends, "removed": removed,
                                **pools_json(runtime)})  # fmt: skip

    def status_page(self, environ: dict[str, Any]) -> Reply:
        page = render_status(
            self.holder.runtime,
            admin=self.holder.admin,
            now_monotonic=self.instance.clock(),
            started_at=self.instance.started_at,
            last_reload=self.swap.last_reload,
            instance_name=self.instance.instance_name,
        )
        return 200, statuspage.CONTENT_TYPE, page, list(statuspage.HEADERS)

    # -- changes (bearer token required) -----------------------------------------

    def changes(self, handler: Callable[[Any], Reply]) -> Callable[[dict[str, Any]], Reply]:
        """Wrap a change: check the token, then parse the JSON body for the handler."""

        def guarded(environ: dict[str, Any]) -> Reply:
            refusal = self.authorize(environ)
            if refusal is not None:
                log.warning("admin: refused %s %s (%s)", environ["REQUEST_METHOD"],
                            environ.get("PATH_INFO"), refusal[0])  # fmt: skip
                return refusal
            try:
                payload = read_json(environ)
            except ValueError as error:
                return text(400, f"400 Bad Request: {error}")
            return handler(payload)

        return guarded

    def add_backend(self, payload: Any) -> Reply:
        if not isinstance(payload, dict) or "url" not in payload:
            return text(400, '400 Bad Request: expected a JSON object with "url"')
        pool = payload.pop("pool", None)
        if pool is not None and not isinstance(pool, str):
            return text(400, '400 Bad Request: "pool" must be a pool\'s name')
        try:
            backend = parse_backend(payload)
        except ConfigError as error:
            return text(400, "400 Bad Request: " + "; ".join(error.problems))
        why = refuse_backend_url(backend.url, self.own_addresses())
        if why is not None:
            return text(400, f"400 Bad Request: {why}")
        try:
            added = self.swap.add_backend(backend, pool)
        except KeyError as error:
            return text(409, f"409 Conflict: {error.args[0]}")
        except ValueError as error:  # an unknown pool, or none named among several
            return text(400, f"400 Bad Request: {error}")
        return json_reply(201, backend_json(self.holder.runtime, added))

    def remove_backend(self, payload: Any) -> Reply:
        if not isinstance(payload, dict) or not ({"name", "url"} & payload.keys()):
            return text(400, '400 Bad Request: expected a JSON object with "name" or "url"')
        name, url = payload.get("name"), payload.get("url")
        if isinstance(url, str):
            url = url.rstrip("/")
        removed = self.swap.remove_backend(name, url)
        if removed is None:
            return text(404, f"404 Not Found: no backend {name or url}")
        return json_reply(200, {"removed": removed.name, "url": removed.url,
                                "in_flight": removed.in_flight})  # fmt: skip

    def set_backend(self, payload: Any) -> Reply:
        """HAProxy's `set server <b> weight <n>` and `set server <b> state drain|ready`."""
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return text(400, '400 Bad Request: expected a JSON object with "name"')
        unknown = sorted(payload.keys() - SET_BACKEND_FIELDS)
        if unknown:
            return text(400, f"400 Bad Request: unknown field(s) {', '.join(unknown)}; "
                             'expected "name", "weight", "drain"')  # fmt: skip
        weight, drain = payload.get("weight", KEEP), payload.get("drain")
        if weight is not KEEP and weight is not None:
            try:
                weight = backend_weight(weight)  # the file's rule for a weight
            except ValueError as error:
                return text(400, f"400 Bad Request: weight: {error} "
                                 "(or null: back to the configured weight)")  # fmt: skip
        if "drain" in payload and not isinstance(drain, bool):
            return text(400, "400 Bad Request: drain: must be true or false")
        backend = self.swap.set_backend(payload["name"], weight=weight, drain=drain)
        if backend is None:
            return text(404, f"404 Not Found: no backend {payload['name']}")
        return json_reply(200, backend_json(self.holder.runtime, backend))

    def reload(self, payload: Any) -> Reply:
        result = self.swap.reload("admin API")
        token = self.holder.runtime.config.admin.token
        if not result.ok:
            problems = [_redact(line, token) for line in result.problems]
            return json_reply(400, {"reloaded": False, "problems": problems})
        changes = [_redact(line, token) for line in result.changes]
        return json_reply(200, {"reloaded": True, "changes": changes})
