"""`Config` -> YAML: the effective configuration, every default filled in (`--dump-config`).

What `nginx -T` does for nginx: show what the process would run with, not what the
file says. The output is a config file itself: each value is written in a syntax the
loader accepts (addresses as `host:port`, rates as `100/minute`, durations as
seconds, sizes as bytes, status ranges as `200-399`), so a dump of a config without
secrets loads back to the same `Config`.

Secrets are written as exactly `***`: the admin token (from the file or from
$PYPROXY_ADMIN_TOKEN) whole, and wherever else its text appears; the password part of
every URL (`redact_secrets`: `redis://:***@cache:6379/0`). A dump is meant to be
pasted into a ticket.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import yaml

from pyproxy.config.report import redact_secrets
from pyproxy.config.schema import Config

SECRET = "***"
# Dotted paths whose value is a secret as a whole (URLs carry theirs in the user info).
WHOLE_SECRETS = frozenset({"admin.token"})
_NOT_SETTINGS = frozenset({"source_path"})  # where the config came from, not a setting


def config_as_dict(config: Config) -> dict[str, Any]:
    """Plain YAML-writable data for `config`, in the schema's field order.

    A file with pools is written back as `pools` and `routes` (each pool's sections
    as merged, so complete), a v1 file as `backends`: the form each was written in.
    """
    token = config.admin.token
    data = _section(config, "", token)
    pools, routes = data.pop("declared_pools"), data.pop("declared_routes")
    if not config.declared_pools:
        return data
    del data["backends"]  # every pool's backends, listed again: the pools hold them
    data["pools"] = {pool.pop("name"): _pool_as_written(pool) for pool in pools}
    data["routes"] = [_route_as_written(route) for route in routes]
    return data


def _pool_as_written(pool: dict[str, Any]) -> dict[str, Any]:
    # A pool's own per-backend rate is written where the file has it.
    rate = pool.pop("per_backend_rate")
    if rate is not None:
        pool["rate_limit"] = {"per_backend": rate}
    return pool


def _route_as_written(route: dict[str, Any]) -> dict[str, Any]:
    match = {key: value for key, value in route.pop("match").items() if value is not None}
    if match:  # no match at all is a catch-all
        route["match"] = match
    return route


def dump_config(config: Config) -> str:
    """The YAML text of `config_as_dict(config)`."""
    return yaml.safe_dump(
        config_as_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def _section(section: Any, prefix: str, token: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for field in dataclasses.fields(section):
        path = prefix + field.name
        if path in _NOT_SETTINGS:
            continue
        value = getattr(section, field.name)
        if path in WHOLE_SECRETS and value is not None:
            data[field.name] = SECRET
        elif field.name == "expected_status":  # an inclusive status range
            low, high = value
            data[field.name] = f"{low}-{high}"
        else:
            data[field.name] = _value(value, path, token)
    return data


def _value(value: Any, path: str, token: str | None) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _hide(value, token)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Address and Rate have a written form of their own (`__str__`); a section has not.
        if "__str__" in vars(type(value)):
            return str(value)
        return _section(value, path + ".", token)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, frozenset):  # unordered: sorted so two dumps compare equal
        items = (_value(item, path, token) for item in value)
        return sorted(items, key=lambda item: (type(item).__name__, item))
    if isinstance(value, tuple | list):
        return [_value(item, f"{path}[{index}]", token) for index, item in enumerate(value)]
    return _hide(str(value), token)  # a type added later: its text, never a Python repr


def _hide(text: str, token: str | None) -> str:
    text = redact_secrets(text)
    return text.replace(token, SECRET) if token else text
