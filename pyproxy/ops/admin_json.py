"""The admin API's JSON, both ways: what /admin/backends says about a backend, the pools
and the routes; and how a change's request body is read (bounded, an empty body is an
empty object, a bad one is a ValueError that says why, for a 400).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pyproxy.pool.backend import Backend
from pyproxy.runtime.snapshot import Runtime

MAX_ADMIN_BODY = 64 * 1024  # an admin change is a few fields; more is not a change


def backend_json(runtime: Runtime, backend: Backend) -> dict[str, Any]:
    """One backend as /admin/backends shows it: its facts, and the judge's verdict."""
    why = runtime.why_unavailable(backend)
    return {**dataclasses.asdict(backend.snapshot()), "available": why is None,
            "why_unavailable": why, "pool": runtime.pool_name(backend),
            "backup": backend.config.backup}  # fmt: skip


def pools_json(runtime: Runtime) -> dict[str, Any]:
    """The pools and routes, as /admin/backends shows them next to the backends."""
    pools = {name: {"strategy": pool.config.strategy} for name, pool in runtime.pools.items()}
    routes = [
        {"name": route.name, "pool": route.pool, "strip_prefix": route.strip_prefix,
         "match": {k: v for k, v in dataclasses.asdict(route.match).items() if v is not None}}
        for route in runtime.config.routes
    ]  # fmt: skip
    return {"pools": pools, "routes": routes}


def read_json(environ: dict[str, Any]) -> Any:
    """The request body as JSON; an empty body is an empty object. ValueError says why."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ValueError("invalid Content-Length") from None
    if length > MAX_ADMIN_BODY:
        raise ValueError(f"body larger than {MAX_ADMIN_BODY} bytes")
    raw = environ["wsgi.input"].read(length) if length else b""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"invalid JSON: {error}") from None
