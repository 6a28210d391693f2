"""`pools:` and `routes:`: several named groups of backends, and which requests go where.

A pool's sections (`health_check`, `circuit_breaker`, `retries`, `sticky`, and
`rate_limit.per_backend`) are merged field by field over the top-level ones, so a
pool writes only what differs. Problems carry full field paths
(`pools.web.health_check.path`, `routes[2].pool`) and are all collected in one pass.

Two rules relate the two lists:
- A route must name a pool of the file (`routes[2].pool: unknown pool 'apii'`).
- `pools` without `routes` is fine with exactly one pool (everything goes to it, and
  `--check` warns); with several it is an error, since any choice of ours would be a
  guess about where traffic should go.
"""

from __future__ import annotations

import difflib
from typing import Any

from pyproxy.config import checks as check
from pyproxy.config import sections, values
from pyproxy.config.schema import STRATEGIES, BackendConfig, PoolConfig, RouteConfig, RouteMatch

Problems = list[tuple[str, str]]

# The pool settings that default to the top-level section of the same name.
INHERITED = ("strategy", "health_check", "circuit_breaker", "retries", "sticky")

_MATCH = check.section(
    RouteMatch,
    {
        "host": check.optional(values.host_pattern),
        "path_prefix": check.optional(values.path_prefix),
    },
)

ROUTE: dict[str, check.Checker] = {
    "name": values.route_name,
    "match": _MATCH,
    "pool": check.text,
    "strip_prefix": check.boolean,
}


def _pool_rate_limit(value: Any) -> Any:
    if isinstance(value, dict) and set(value) - {"per_backend"}:
        others = ", ".join(sorted(map(str, set(value) - {"per_backend"})))
        # A client's limit is the proxy's, whatever pool it asks for.
        raise ValueError(f"only per_backend may be set per pool, not {others}")
    return check.mapping(value, {"per_backend": check.optional(check.rate)})


def _pool(name: str, value: Any, top: dict[str, Any]) -> PoolConfig:
    """One entry of `pools:`; `top` holds the top-level values it inherits."""
    table: dict[str, check.Checker] = {
        "strategy": check.one_of(*STRATEGIES),
        "backends": lambda items: sections.backends(items, where=f"pools.{name}.backends"),
        "rate_limit": _pool_rate_limit,
    }
    for key in INHERITED[1:]:
        table[key] = sections.overlay(key, top[key])
    fields = check.mapping(value, table, required=("backends",))
    rate = fields.pop("rate_limit", {}).get("per_backend", top["per_backend_rate"])
    inherited = {key: fields.pop(key, top[key]) for key in INHERITED}
    return PoolConfig(name=name, per_backend_rate=rate, **inherited, **fields)


def _checked_pool(name: str, item: Any, top: dict[str, Any]) -> PoolConfig:
    if isinstance(item, check.Unresolved):
        raise ValueError(item.message)
    return _pool(name, item, top)


def parse_pools(value: Any, top: dict[str, Any]) -> tuple[tuple[PoolConfig, ...], Problems]:
    """Every valid pool, and the problems of the others (paths start ".pools")."""
    if isinstance(value, check.Unresolved):
        return (), [(".pools", value.message)]
    if not isinstance(value, dict) or not value:
        return (), [(".pools", "must be a mapping of pool names to pools (pools: {web: ...})")]
    pools: list[PoolConfig] = []
    problems: Problems = []
    members: dict[str, tuple[BackendConfig, ...]] = {}  # also of pools with other mistakes
    for name, item in value.items():
        try:
            values.pool_name(name)
            members[name] = _backends_alone(name, item)
            pools.append(_checked_pool(name, item, top))
        except check.Invalid as error:
            problems.extend((f".pools.{name}{sub}", message) for sub, message in error.problems)
        except ValueError as error:
            problems.append((f".pools.{name}", str(error)))
    problems.extend(_names_across_pools(members))
    return tuple(pools), problems


def _backends_alone(name: str, item: Any) -> tuple[BackendConfig, ...]:
    """The pool's backends if they are valid, whatever the rest of the pool holds."""
    try:
        return sections.backends(item["backends"], where=f"pools.{name}.backends")
    except (TypeError, KeyError, ValueError):
        return ()  # reported with the pool


def _names_across_pools(members: dict[str, tuple[BackendConfig, ...]]) -> Problems:
    """Backend names are unique across pools: metrics and the admin API key by name."""
    owner: dict[str, str] = {}
    problems: Problems = []
    for pool, backends in members.items():
        for index, backend in enumerate(backends):
            first = owner.setdefault(backend.name, pool)
            if first != pool:
                where = f".pools.{pool}.backends[{index}].name"
                problems.append((where, f"{backend.name!r} is already used in pools.{first}"))
    return problems


def parse_routes(
    value: Any, pool_names: list[str] | None
) -> tuple[tuple[RouteConfig, ...], Problems]:
    """Every valid route, and the problems of the others (paths start ".routes").

    `pool_names` None: `pools` itself is unreadable (and reported), so routes are not
    told their pool is unknown on top of it.
    """
    if isinstance(value, check.Unresolved):
        return (), [(".routes", value.message)]
    if not isinstance(value, list) or not value:
        return (), [(".routes", "must be a list of at least one route (- {pool: <name>})")]
    routes: list[RouteConfig] = []
    problems: Problems = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(value):
        where = f".routes[{index}]"
        try:
            fields = check.run(lambda item: check.mapping(item, ROUTE, required=("pool",)), item)
        except check.Invalid as error:
            problems.extend((f"{where}{sub}", message) for sub, message in error.problems)
            continue
        except ValueError as error:
            problems.append((where, str(error)))
            continue
        route = RouteConfig(**{"name": f"routes[{index}]", **fields})
        problems.extend(_route_problems(route, where, pool_names))
        if route.name in first_index:
            message = f"{route.name!r} is already used by routes[{first_index[route.name]}]"
            problems.append((f"{where}.name", message))
        first_index.setdefault(route.name, index)
        routes.append(route)
    return tuple(routes), problems


def _route_problems(route: RouteConfig, where: str, pool_names: list[str] | None) -> Problems:
    problems: Problems = []
    if pool_names is not None and route.pool not in pool_names:
        close = difflib.get_close_matches(route.pool, pool_names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append((f"{where}.pool", f"unknown pool {route.pool!r}{hint}"))
    if route.strip_prefix and route.match.path_prefix is None:
        problems.append((f"{where}.strip_prefix", "needs match.path_prefix (what to strip)"))
    return problems


def layout_problems(data: dict[str, Any]) -> Problems:
    """Which of the two file forms this is, and whether it is whole."""
    has = {key for key in ("backends", "pools", "routes") if key in data}
    if {"backends", "pools"} <= has:
        return [
            (
                ".backends",
                "a file has either top-level backends (one pool) or pools, not both;"
                " move these backends into a pool",
            )
        ]
    if not has:
        return [(".backends", "is required (or pools + routes)")]
    if "routes" in has and "pools" not in has:
        message = "needs pools (with top-level backends, every request goes to them)"
        return [(".routes", message)]
    pools = data.get("pools")
    if has == {"pools"} and isinstance(pools, dict) and len(pools) > 1:
        example = next(iter(pools))
        return [
            (
                ".routes",
                f"is required with more than one pool: say which requests go where,"
                f" e.g. `routes: [{{match: {{host: ...}}, pool: ...}}, {{pool: {example}}}]`",
            )
        ]
    return []
