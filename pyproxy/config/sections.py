"""The tables of the config file: one line per setting, naming the checker of its value.

A key missing from the YAML keeps the dataclass default, so defaults are written once,
in `schema.py`. Each section is kept as (dataclass, table, rules) so it can be read two
ways: on its own at the top level (`section`), and inside a pool merged field by field
over the top-level section (`overlay`), where a pool that sets only `path` keeps every
other top-level value.
"""

from __future__ import annotations

from typing import Any

from pyproxy.config import checks as check
from pyproxy.config import values
from pyproxy.config.schema import (
    AccessLogConfig,
    AdminConfig,
    BackendConfig,
    ChaosConfig,
    CircuitBreakerConfig,
    HealthCheckConfig,
    LimitsConfig,
    RateLimitConfig,
    RetryConfig,
    ShutdownConfig,
    StickyConfig,
    Timeouts,
)


def _open_at_most_max(cb: CircuitBreakerConfig) -> list[tuple[str, str]]:
    if cb.max_open_duration < cb.open_duration:
        return [(".max_open_duration", "must be >= open_duration")]
    return []


Table = tuple[type, dict[str, check.Checker], tuple[check.Rule, ...]]

TABLES: dict[str, Table] = {
    "timeouts": (
        Timeouts,
        {"connect": check.duration(), "read": check.duration(), "total": check.duration()},
        (),
    ),
    "health_check": (
        HealthCheckConfig,
        {
            "enabled": check.boolean,
            "path": values.url_path,
            "interval": check.duration(positive=True),
            "timeout": check.duration(positive=True),
            "healthy_threshold": check.integer(minimum=1),
            "unhealthy_threshold": check.integer(minimum=1),
            "expected_status": values.status_range,
            "host": check.optional(values.host_header),
            "port": check.optional(check.integer(1, 65535)),
            "expect_body": check.optional(check.text),
        },
        (),
    ),
    "circuit_breaker": (
        CircuitBreakerConfig,
        {
            "enabled": check.boolean,
            "failure_threshold": check.integer(minimum=1),
            "open_duration": check.duration(positive=True),
            "max_open_duration": check.duration(positive=True),
            "half_open_requests": check.integer(minimum=1),
            "failure_statuses": values.statuses,
        },
        (_open_at_most_max,),
    ),
    "retries": (
        RetryConfig,
        {
            "max_retries": check.integer(minimum=0),
            "retry_on": values.retry_conditions,
            "idempotent_only": check.boolean,
            "max_body": check.size(),
            "backoff": check.duration(),
            "budget_percent": check.number(0, 100),
        },
        (),
    ),
    "rate_limit": (
        RateLimitConfig,
        {
            "per_client": check.optional(check.rate),
            "burst": check.optional(check.integer(minimum=1)),
            "client_key": values.client_key,
            "per_backend": check.optional(check.rate),
            "max_clients": check.integer(minimum=1),
            "store": values.store,
        },
        (),
    ),
    "sticky": (
        StickyConfig,
        {
            "mode": check.one_of("none", "cookie", "ip"),
            "cookie_name": values.cookie_name,
            "cookie_max_age": check.optional(check.integer(minimum=1)),
        },
        (),
    ),
    "chaos": (
        ChaosConfig,
        {
            "error_rate": check.fraction,
            "error_status": check.integer(400, 599),  # an injected *failure*
            "latency": check.duration(),
            "latency_rate": check.fraction,
        },
        (),
    ),
    "admin": (
        AdminConfig,
        {
            "listen": values.address,
            "token": check.optional(check.text),
            "state_file": check.optional(check.text),
        },
        (),
    ),
    "limits": (
        LimitsConfig,
        {
            "max_request_body": check.size(),
            "max_request_header": check.size(minimum=1),
            # 0 would mean "no limit", which is exactly the slowloris hole these close.
            "client_idle_timeout": check.duration(positive=True),
            "header_timeout": check.duration(positive=True),
            "send_timeout": check.duration(positive=True),
            "max_connections": check.integer(minimum=1),
        },
        (),
    ),
    "shutdown": (
        ShutdownConfig,
        {"delay": check.duration(), "drain_timeout": check.duration()},
        (),
    ),
    "access_log": (
        AccessLogConfig,
        {"enabled": check.boolean, "format": check.one_of("text", "json"), "path": check.text},
        (),
    ),
}

SECTIONS: dict[str, check.Checker] = {
    name: check.section(cls, table, rules) for name, (cls, table, rules) in TABLES.items()
}


def overlay(name: str, base: Any) -> check.Checker:
    """A checker for section `name` inside a pool: its keys replace those of `base`."""
    _, table, rules = TABLES[name]
    return check.overlay(base, table, rules)


BACKEND: dict[str, check.Checker] = {
    "url": values.backend_url,  # -> (normalised url, "host:port")
    "name": values.backend_name,
    "weight": values.backend_weight,
    "max_connections": check.integer(minimum=0),
    "backup": check.boolean,
}


def backend(value: Any) -> BackendConfig:
    fields = check.mapping(value, BACKEND, required=("url",))
    url, default_name = fields.pop("url")
    return BackendConfig(url=url, name=fields.pop("name", default_name), **fields)


def backends(value: Any, where: str = "backends") -> tuple[BackendConfig, ...]:
    """A list of backends, names and addresses unique in it; `where` names the list."""
    if not isinstance(value, list):
        raise ValueError("must be a list (write `backends: []` for none)")
    found: list[BackendConfig] = []
    problems: list[tuple[str, str]] = []
    names: dict[str, int] = {}  # first index of each name / of each scheme + host:port
    urls: dict[tuple[str, str], int] = {}
    for index, item in enumerate(value):
        try:
            entry = check.run(backend, item)
        except check.Invalid as error:
            problems.extend((f"[{index}]{sub}", message) for sub, message in error.problems)
            continue
        except ValueError as error:
            problems.append((f"[{index}]", str(error)))
            continue
        # http://a and http://a:80 are one backend: compare scheme + host:port.
        identity = (entry.url.split(":", 1)[0], values.backend_url(entry.url)[1])
        if entry.name in names:
            message = f"{entry.name!r} is already used by {where}[{names[entry.name]}]"
            problems.append((f"[{index}].name", message))
        if identity in urls:
            message = f"same backend as {where}[{urls[identity]}] ({entry.url})"
            problems.append((f"[{index}].url", message))
        names.setdefault(entry.name, index)
        urls.setdefault(identity, index)
        found.append(entry)
    if problems:
        raise check.Invalid(problems)
    return tuple(found)
