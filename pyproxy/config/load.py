"""YAML -> `Config`: read the file, expand `${ENV}`, check every field, name every problem.

The schema and its defaults live in `schema.py`; the checkers in `checks.py` and
`values.py`; the tables that tie them together (one line per setting) in
`sections.py`; `pools` and `routes` in `pools.py`. This module reads the top level
and the few rules that relate two fields. Nothing is reported one at a time: `parse_config`
collects every problem, each as `"<field.path>: <message>"`, and raises them together
in one `ConfigError`, so `--check` shows the whole list at once (like `nginx -t`).

`config_warnings` (legal but probably unintended) and `describe_changes` (the human
summary of a reload) live in `report.py` and are re-exported here, so callers
need only this module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import yaml

from pyproxy.config import checks as check
from pyproxy.config import pools, sections, values
from pyproxy.config.report import config_warnings, describe_changes, redact_secrets  # re-exported
from pyproxy.config.schema import STRATEGIES, BackendConfig, Config

ADMIN_TOKEN_ENV = "PYPROXY_ADMIN_TOKEN"
SECTIONS = sections.SECTIONS  # re-exported: the tables by section name
BACKEND = sections.BACKEND


class ConfigError(Exception):
    """An invalid configuration. `problems` has one `"<field.path>: <message>"` per mistake."""

    def __init__(self, problems: list[str]) -> None:
        # Problems reach --check, the reload log and admin answers: a message that
        # echoed a URL must not carry its password there.
        problems = [redact_secrets(problem) for problem in problems]
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_backend(value: Any) -> BackendConfig:
    """One backend entry, as the admin API's add-backend receives it; or `ConfigError`.

    The admin API adds its own refusals (link-local addresses, its own listeners).
    """
    try:
        return sections.backend(value)
    except check.Invalid as error:
        problems = [f"{path.lstrip('.')}: {message}" for path, message in error.problems]
        raise ConfigError(problems) from None
    except ValueError as error:
        raise ConfigError([f"(backend): {error}"]) from None


def _later(value: Any) -> Any:
    """`pools` and `routes` are checked after the top-level sections they inherit from."""
    return value


TOP_LEVEL: dict[str, check.Checker] = {
    "backends": sections.backends,
    "pools": _later,
    "routes": _later,
    "workers": values.workers,
    "listen": values.address,
    "threads": check.integer(minimum=1),
    "strategy": check.one_of(*STRATEGIES),
    "preserve_host": check.boolean,
    "trusted_proxies": values.networks,
    **sections.SECTIONS,
}

_WILDCARD_HOSTS = {"0.0.0.0", "::"}


def _listeners_differ(config: Config) -> list[tuple[str, str]]:
    proxy, admin = config.listen, config.admin.listen
    same_host = proxy.host == admin.host or {proxy.host, admin.host} & _WILDCARD_HOSTS
    if proxy.port == admin.port != 0 and same_host:
        return [(".admin.listen", f"must not be the proxy's own address ({proxy})")]
    return []


def _inherited(data: dict[str, Any]) -> dict[str, Any]:
    """The top-level values pools inherit. A top-level section that is itself invalid
    (reported on its own) gives its defaults, so a pool's own mistakes are still found."""
    defaults = Config()
    top: dict[str, Any] = {}
    for name in (*pools.INHERITED, "rate_limit"):
        try:
            top[name] = check.run(TOP_LEVEL[name], data[name])
        except (KeyError, ValueError):
            top[name] = getattr(defaults, name)
    top["per_backend_rate"] = top.pop("rate_limit").per_backend
    return top


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
    document: dict[str, Any] = check.expand_env(data, env)
    problems = pools.layout_problems(document)
    try:
        fields = check.mapping(document, TOP_LEVEL)
    except check.Invalid as error:
        problems.extend(error.problems)
        fields = {}
    declared: dict[str, Any] = {}
    if "pools" in document:
        found, pool_problems = pools.parse_pools(document["pools"], _inherited(document))
        declared["declared_pools"] = found
        problems.extend(pool_problems)
        if "routes" in document:
            given = document["pools"]
            names = [str(name) for name in given] if isinstance(given, dict) else None
            declared["declared_routes"], route_problems = pools.parse_routes(
                document["routes"], names
            )
            problems.extend(route_problems)
        fields["backends"] = tuple(backend for pool in found for backend in pool.backends)
    if problems:
        raise ConfigError([f"{path.lstrip('.')}: {message}" for path, message in problems])
    fields = {key: value for key, value in fields.items() if key not in ("pools", "routes")}
    config = Config(**fields, **declared, source_path=source_path)
    problems = _listeners_differ(config)
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
        raise ConfigError([f"{path}: the file is empty; it needs `backends:` or `pools:`"])
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
