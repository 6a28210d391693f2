"""YAML -> `Config`: read the file, expand `${ENV}`, check every field, name every problem.

The schema and its defaults live in `config.py`; the checkers in `configcheck.py`.
This module holds the tables that tie them together (one line per setting) and the
few rules that relate two fields. Nothing is reported one at a time: `parse_config`
collects every problem, each as `"<field.path>: <message>"`, and raises them together
in one `ConfigError`, so `--check` shows the whole list at once (like `nginx -t`).

`config_warnings` (legal but probably unintended) and `describe_changes` (the human
summary of a reload) live in `configreport.py` and are re-exported here, so callers
need only this module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import yaml

from pyproxy.config import checks as check
from pyproxy.config import values
from pyproxy.config.report import config_warnings, describe_changes, redact_secrets  # re-exported
from pyproxy.config.schema import (
    STRATEGIES,
    AccessLogConfig,
    AdminConfig,
    BackendConfig,
    ChaosConfig,
    CircuitBreakerConfig,
    Config,
    HealthCheckConfig,
    LimitsConfig,
    RateLimitConfig,
    RetryConfig,
    ShutdownConfig,
    StickyConfig,
    Timeouts,
)

ADMIN_TOKEN_ENV = "PYPROXY_ADMIN_TOKEN"


class ConfigError(Exception):
    """An invalid configuration. `problems` has one `"<field.path>: <message>"` per mistake."""

    def __init__(self, problems: list[str]) -> None:
        # Problems reach --check, the reload log and admin answers: a message that
        # echoed a URL must not carry its password there.
        problems = [redact_secrets(problem) for problem in problems]
        super().__init__("; ".join(problems))
        self.problems = problems


def _open_at_most_max(cb: CircuitBreakerConfig) -> list[tuple[str, str]]:
    if cb.max_open_duration < cb.open_duration:
        return [(".max_open_duration", "must be >= open_duration")]
    return []


# One table per section: key -> checker. A key missing from the YAML keeps the
# dataclass default, so defaults are written once, in config.py.
SECTIONS: dict[str, check.Checker] = {
    "timeouts": check.section(
        Timeouts,
        {"connect": check.duration(), "read": check.duration(), "total": check.duration()},
    ),
    "health_check": check.section(
        HealthCheckConfig,
        {
            "enabled": check.boolean,
            "path": values.url_path,
            "interval": check.duration(positive=True),
            "timeout": check.duration(positive=True),
            "healthy_threshold": check.integer(minimum=1),
            "unhealthy_threshold": check.integer(minimum=1),
            "expected_status": values.status_range,
        },
    ),
    "circuit_breaker": check.section(
        CircuitBreakerConfig,
        {
            "enabled": check.boolean,
            "failure_threshold": check.integer(minimum=1),
            "open_duration": check.duration(positive=True),
            "max_open_duration": check.duration(positive=True),
            "half_open_requests": check.integer(minimum=1),
            "failure_statuses": values.statuses,
        },
        rules=(_open_at_most_max,),
    ),
    "retries": check.section(
        RetryConfig,
        {
            "max_retries": check.integer(minimum=0),
            "retry_on": values.retry_conditions,
            "idempotent_only": check.boolean,
            "max_body": check.size(),
            "backoff": check.duration(),
            "budget_percent": check.number(0, 100),
        },
    ),
    "rate_limit": check.section(
        RateLimitConfig,
        {
            "per_client": check.optional(check.rate),
            "burst": check.optional(check.integer(minimum=1)),
            "client_key": values.client_key,
            "per_backend": check.optional(check.rate),
            "max_clients": check.integer(minimum=1),
            "store": values.store,
        },
    ),
    "sticky": check.section(
        StickyConfig,
        {
            "mode": check.one_of("none", "cookie", "ip"),
            "cookie_name": values.cookie_name,
            "cookie_max_age": check.optional(check.integer(minimum=1)),
        },
    ),
    "chaos": check.section(
        ChaosConfig,
        {
            "error_rate": check.fraction,
            "error_status": check.integer(400, 599),  # an injected *failure*
            "latency": check.duration(),
            "latency_rate": check.fraction,
        },
    ),
    "admin": check.section(
        AdminConfig,
        {
            "listen": values.address,
            "token": check.optional(check.text),
            "state_file": check.optional(check.text),
        },
    ),
    "limits": check.section(
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
    ),
    "shutdown": check.section(
        ShutdownConfig, {"delay": check.duration(), "drain_timeout": check.duration()}
    ),
    "access_log": check.section(
        AccessLogConfig,
        {"enabled": check.boolean, "format": check.one_of("text", "json"), "path": check.text},
    ),
}

BACKEND: dict[str, check.Checker] = {
    "url": values.backend_url,  # -> (normalised url, "host:port")
    "name": values.backend_name,
    "weight": check.integer(minimum=0),
    "max_connections": check.integer(minimum=0),
}


def parse_backend(value: Any) -> BackendConfig:
    """One backend entry, as the admin API's add-backend receives it; or `ConfigError`.

    The admin API adds its own refusals (link-local addresses, its own listeners).
    """
    try:
        return _backend(value)
    except check.Invalid as error:
        problems = [f"{path.lstrip('.')}: {message}" for path, message in error.problems]
        raise ConfigError(problems) from None
    except ValueError as error:
        raise ConfigError([f"(backend): {error}"]) from None


def _backend(value: Any) -> BackendConfig:
    fields = check.mapping(value, BACKEND, required=("url",))
    url, default_name = fields.pop("url")
    return BackendConfig(url=url, name=fields.pop("name", default_name), **fields)


def _backends(value: Any) -> tuple[BackendConfig, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list (write `backends: []` for none)")
    backends: list[BackendConfig] = []
    problems: list[tuple[str, str]] = []
    names: dict[str, int] = {}  # first index of each name / of each scheme + host:port
    urls: dict[tuple[str, str], int] = {}
    for index, item in enumerate(value):
        try:
            backend = check.run(_backend, item)
        except check.Invalid as error:
            problems.extend((f"[{index}]{sub}", message) for sub, message in error.problems)
            continue
        except ValueError as error:
            problems.append((f"[{index}]", str(error)))
            continue
        # http://a and http://a:80 are one backend: compare scheme + host:port.
        identity = (backend.url.split(":", 1)[0], values.backend_url(backend.url)[1])
        if backend.name in names:
            message = f"{backend.name!r} is already used by backends[{names[backend.name]}]"
            problems.append((f"[{index}].name", message))
        if identity in urls:
            message = f"same backend as backends[{urls[identity]}] ({backend.url})"
            problems.append((f"[{index}].url", message))
        names.setdefault(backend.name, index)
        urls.setdefault(identity, index)
        backends.append(backend)
    if problems:
        raise check.Invalid(problems)
    return tuple(backends)


TOP_LEVEL: dict[str, check.Checker] = {
    "backends": _backends,
    "listen": values.address,
    "threads": check.integer(minimum=1),
    "strategy": check.one_of(*STRATEGIES),
    "preserve_host": check.boolean,
    "trusted_proxies": values.networks,
    **SECTIONS,
}

_WILDCARD_HOSTS = {"0.0.0.0", "::"}


def _listeners_differ(config: Config) -> list[tuple[str, str]]:
    proxy, admin = config.listen, config.admin.listen
    same_host = proxy.host == admin.host or {proxy.host, admin.host} & _WILDCARD_HOSTS
    if proxy.port == admin.port != 0 and same_host:
        return [(".admin.listen", f"must not be the proxy's own address ({proxy})")]
    return []


def parse_config(
    data: object, env: Mapping[str, str] | None = None, source_path: str | None = None
) -> Config:
    """Validate a parsed YAML document and build the `Config`, or raise `ConfigError`.

    `env` (default `os.environ`) feeds `${VAR}` expansion and the admin token fallback.
    """
    env = os.environ if env is None else env
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"(top level): must be a mapping of settings, not {kind}"])
    try:
        fields = check.mapping(check.expand_env(data, env), TOP_LEVEL, required=("backends",))
        config = Config(**fields, source_path=source_path)
        problems = _listeners_differ(config)
    except check.Invalid as error:
        problems = error.problems
    if problems:
        raise ConfigError([f"{path.lstrip('.')}: {message}" for path, message in problems])
    if config.admin.token is None and env.get(ADMIN_TOKEN_ENV):
        admin = dataclasses.replace(config.admin, token=env[ADMIN_TOKEN_ENV])
        config = dataclasses.replace(config, admin=admin)
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping.

    Plain PyYAML keeps the last of two `threads:` lines without a word, so the first
    one silently does nothing. (Merge keys `<<:` may still be overridden.)
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # unhashable keys are refused by SafeLoader itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the YAML file at `path`; raise `ConfigError` if unusable."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the file: {error.strerror}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text ({error.reason})"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: invalid YAML{where}: {error.problem}"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: invalid YAML: {error}"]) from None
    if data is None:
        raise ConfigError([f"{path}: the file is empty; it needs at least `backends:`"])
    return parse_config(data, env, source_path=path)


__all__ = [
    "ConfigError",
    "config_warnings",
    "describe_changes",
    "load_config",
    "parse_backend",
    "parse_config",
    "redact_secrets",
]
