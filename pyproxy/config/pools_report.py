"""Warnings and reload lines about pools, routes and workers (see `report.py`).

Legal but probably unintended: a pool no route reaches, a route that can never match
because an earlier one takes all its requests, a single pool with no routes written,
and per-process rate limits under several workers.
"""

from __future__ import annotations

from collections.abc import Iterator

from pyproxy.config.schema import Config, PoolConfig, RouteConfig, RouteMatch


def pool_warnings(config: Config) -> list[str]:
    """`"<field.path>: <what and why>"` for each pool/route/worker observation."""
    warnings: list[str] = []
    if config.declared_pools:
        if not config.declared_routes:
            warnings.append(
                f"routes: not set; every request goes to the only pool,"
                f" {config.pools[0].name!r} (write a catch-all `- {{pool: ...}}` to say so)"
            )
        routed = {route.pool for route in config.routes}
        for pool in config.pools:
            if pool.name not in routed:
                warnings.append(f"pools.{pool.name}: no route sends requests here")
            health = pool.health_check
            if (
                health != config.health_check
                and health.enabled
                and health.timeout >= health.interval
            ):
                warnings.append(
                    f"pools.{pool.name}.health_check.timeout: not shorter than the interval;"
                    " probes may overlap the next"
                )
            if not pool.backends:
                warnings.append(
                    f"pools.{pool.name}.backends: empty list; requests routed here answer 503"
                    " until a backend is added through the admin API"
                )
        warnings.extend(_unreachable(config.routes))
    warnings.extend(_worker_warnings(config))
    return warnings


def _unreachable(routes: tuple[RouteConfig, ...]) -> Iterator[str]:
    for later_index, later in enumerate(routes):
        for index, earlier in enumerate(routes[:later_index]):
            if covers(earlier.match, later.match):
                kind = "a catch-all" if earlier.match == RouteMatch() else "same or broader match"
                named = "" if earlier.name == f"routes[{index}]" else f"{earlier.name}, "
                yield (
                    f"routes[{later_index}]: can never match: routes[{index}]"
                    f" ({named}{kind}) comes first and takes all its requests"
                )
                break


def covers(earlier: RouteMatch, later: RouteMatch) -> bool:
    """Whether every request `later` matches is also matched by `earlier`.

    Uses the matching rules of `pyproxy/policy/routes.py` (which the tests compare):
    a host pattern covers itself, and `*.d` covers `x.d`; a path prefix covers every
    prefix it would itself take as a path.
    """
    return _host_covers(earlier.host, later.host) and _prefix_covers(
        earlier.path_prefix, later.path_prefix
    )


def _host_covers(earlier: str | None, later: str | None) -> bool:
    if earlier is None or earlier == later:
        return True
    if later is None or not earlier.startswith("*.") or later.startswith("*."):
        return False
    label, _, parent = later.partition(".")
    return bool(label) and parent == earlier[2:]


def _prefix_covers(earlier: str | None, later: str | None) -> bool:
    if earlier is None:
        return True
    if later is None or not later.startswith(earlier):
        return False
    # `later` itself is a path `later` takes: `earlier` covers it when it takes that path
    # on a segment boundary (and so every path under it).
    return earlier.endswith("/") or later[len(earlier) : len(earlier) + 1] in ("", "/")


def _worker_warnings(config: Config) -> Iterator[str]:
    workers = config.workers
    if workers <= 1:
        return
    limit = config.rate_limit
    if limit.per_client is not None and limit.store == "memory":
        yield (
            f"workers: {workers} processes each keep their own client buckets"
            " (rate_limit.store: memory), so the effective per_client limit is up to"
            f" {workers} times the configured one; share them with store: redis://host:6379/0"
        )
    if any(pool.per_backend_rate is not None for pool in config.pools):
        yield (
            f"workers: {workers} processes each count per_backend limits on their own;"
            f" a backend may get up to {workers} times the configured rate"
        )


def pool_changes(old: Config, new: Config) -> Iterator[str]:
    """Reload lines for pools and routes that came, went or changed."""
    before = {pool.name: pool for pool in old.pools}
    after = {pool.name: pool for pool in new.pools}
    for name in after.keys() - before.keys():
        yield f"pools: added {name} ({_count(after[name])})"
    for name in before.keys() - after.keys():
        yield f"pools: removed {name}"
    for name in sorted(before.keys() & after.keys()):
        if before[name] != after[name]:
            yield f"pools.{name}: changed"
    if old.routes != new.routes:
        yield f"routes: {_show_routes(old.routes)} -> {_show_routes(new.routes)}"


def _count(pool: PoolConfig) -> str:
    return f"{len(pool.backends)} backend(s)"


def _show_routes(routes: tuple[RouteConfig, ...]) -> str:
    """Each route as it matches, `api: host api.example.com path /v1 -> api (strip)`, so
    a change to a match or to strip_prefix shows in the reload line, not only a pool."""
    return "[" + ", ".join(_show_route(route) for route in routes) + "]"


def _show_route(route: RouteConfig) -> str:
    host, prefix = route.match.host, route.match.path_prefix
    matches = " ".join(
        [*([f"host {host}"] if host else []), *([f"path {prefix}"] if prefix else [])]
    )
    strip = " (strip)" if route.strip_prefix else ""
    return f"{route.name}: {matches or 'everything'} -> {route.pool}{strip}"
