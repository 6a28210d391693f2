"""What a valid `Config` means to an operator: warnings, and what a reload changed.

`config_warnings` lists settings that are legal but probably not what was meant
(`--check` prints them and still exits 0). `describe_changes` turns two configs into
the lines a reload logs and `POST /admin/reload` returns. Both only read the frozen
dataclasses from `config.py`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterator
from typing import Any

from pyproxy.config.pools_report import pool_changes, pool_warnings
from pyproxy.config.schema import BackendConfig, Config

# Read once, when the process builds its listeners: the sockets, waitress's worker
# pool (`threads`), and the edge server's limits and timeouts (`EdgeServer` copies
# `limits` into waitress's adjustments). A reload keeps the running values and says
# "needs a restart"; everything else is applied live. A section name covers its fields.
# `workers` is the number of processes forked at start.
RESTART_NEEDED = ("listen", "threads", "workers", "admin.listen", "limits")
# Never written to a log or an HTTP answer, not even redacted.
SECRETS = frozenset({"admin.token"})
# Described on their own (backends, pools, routes) or not a setting (source_path).
_NOT_SETTINGS = frozenset({"backends", "declared_pools", "declared_routes", "source_path"})


# A URL's scheme and user info: greedy up to the last "@" of a run without spaces,
# because a password may itself hold an "@" (urlsplit splits the netloc at the last).
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(\S*)@")


def redact_secrets(value: str) -> str:
    """`value` with the credentials of every URL in it shown as `***`.

    `redis://:pw@cache:6379/0` -> `redis://:***@cache:6379/0`, `redis://user:pw@...`
    keeps the user name; user info without a ":" (often a token) is all `***`. Every
    text that may carry a config value on its way to a log, an HTTP answer or the
    status page goes through here (the admin token is never shown at all). Erring on
    the side of hiding: `http://h/?mail=a@b` becomes `http://***@b`.
    """
    if "@" not in value:
        return value  # the common case, and cheap
    return _URL_USERINFO.sub(_hide_userinfo, value)


def _hide_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match.group(2).partition(":")
    shown = f"{user}:***" if colon and not re.search(r"[/?#]", user) else "***"
    return f"{match.group(1)}{shown}@"


def config_warnings(config: Config) -> list[str]:
    """Non-fatal observations, each `"<field.path>: <what and why>"`."""
    warnings = pool_warnings(config)
    v1 = not config.declared_pools  # pool_warnings names each empty pool itself
    if v1 and not config.backends:
        warnings.append(
            "backends: empty list; the proxy answers 503 until a backend is added"
            " through the admin API"
        )
    elif v1 and all(backend.weight == 0 for backend in config.backends):
        warnings.append("backends: every weight is 0 (drain); the proxy answers 503")
    chaos = config.chaos
    if chaos.error_rate or (chaos.latency and chaos.latency_rate):
        warnings.append(
            f"chaos: on (error_rate {chaos.error_rate}, latency {chaos.latency}s at"
            f" {chaos.latency_rate}); requests fail or slow down on purpose"
        )
    admin_host = config.admin.listen.host
    if not _is_loopback(admin_host):
        warnings.append(
            f"admin.listen: {config.admin.listen} is not a loopback address; /metrics,"
            " /admin/backends and the status page are readable by anyone who can reach it"
        )
    if config.admin.token is None:
        warnings.append("admin.token: not set (nor $PYPROXY_ADMIN_TOKEN); admin changes answer 403")
    timeouts = config.timeouts
    if timeouts.total and timeouts.total < max(timeouts.connect, timeouts.read):
        warnings.append(
            f"timeouts.total: {_show(timeouts.total)}s is shorter than connect or read;"
            " the total deadline cuts them short"
        )
    health = config.health_check
    if health.enabled and health.timeout >= health.interval:
        warnings.append(
            "health_check.timeout: not shorter than the interval; probes may overlap the next"
        )
    limit = config.rate_limit
    if limit.per_client is None and limit.burst is not None:
        warnings.append("rate_limit.burst: ignored while per_client is null")
    if limit.store != "memory" and limit.per_client is None:
        warnings.append("rate_limit.store: unused while per_client is null")
    if "_" in limit.client_key.partition(":")[2]:
        # waitress drops request headers whose name contains "_" (a smuggling guard).
        warnings.append(
            f"rate_limit.client_key: {limit.client_key} never arrives (waitress drops header"
            " names containing '_'); every client would be keyed by address"
        )
    return warnings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard: could be reachable from anywhere


def describe_changes(old: Config, new: Config) -> list[str]:
    """Human lines for a reload summary; empty when nothing that matters changed.

    Backends are matched by URL (as the runtime carries their state over), then every
    other setting is compared field by field, so a new field needs no code here.
    """
    lines = list(_backend_changes(old.backends, new.backends))
    if old.declared_pools or new.declared_pools:
        lines.extend(pool_changes(old, new))
    for path, before, after in _differences(old, new, ""):
        if path in SECRETS or _show(before) == _show(after):
            lines.append(f"{path}: changed")  # only a secret differs: nothing to show
        else:
            note = " (needs a restart)" if needs_restart(path) else ""
            lines.append(f"{path}: {_show(before)} -> {_show(after)}{note}")
    return lines


def needs_restart(path: str) -> bool:
    """Whether the setting at dotted `path` only takes effect when the process starts."""
    return any(path == fixed or path.startswith(fixed + ".") for fixed in RESTART_NEEDED)


def keep_running_values(running: Config, new: Config) -> Config:
    """`new` with the settings a reload cannot apply put back to `running`'s values,
    so the running config says what is in effect, not what the file asks for."""
    for path in RESTART_NEEDED:
        new = _with_value(new, running, path.split("."))
    return new


def _with_value(target: Any, source: Any, names: list[str]) -> Any:
    """`target` with the field at `names` (a dotted path, split) taken from `source`."""
    first, rest = names[0], names[1:]
    value = getattr(source, first)
    if rest:
        value = _with_value(getattr(target, first), value, rest)
    return dataclasses.replace(target, **{first: value})


def _backend_changes(
    old: tuple[BackendConfig, ...], new: tuple[BackendConfig, ...]
) -> Iterator[str]:
    before = {backend.url: backend for backend in old}
    after = {backend.url: backend for backend in new}
    for url, backend in after.items():
        if url not in before:
            yield f"backends: added {backend.name} ({url})"
    for url, backend in before.items():
        if url not in after:
            yield f"backends: removed {backend.name} ({url})"
    for url, backend in after.items():
        if url in before:
            for path, was, now in _differences(before[url], backend, ""):
                yield f"backends[{before[url].name}].{path}: {_show(was)} -> {_show(now)}"


def _differences(old: Any, new: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, old, new) for each leaf setting that differs, in field order."""
    for field in dataclasses.fields(old):
        path = prefix + field.name
        before, after = getattr(old, field.name), getattr(new, field.name)
        if path in _NOT_SETTINGS or before == after:
            continue
        if _is_section(before):
            yield from _differences(before, after, path + ".")
        else:
            yield path, before, after


def _is_section(value: Any) -> bool:
    # Address and Rate are dataclasses too, but they are single values with a written
    # form of their own (a __str__); a section is a dataclass without one.
    return dataclasses.is_dataclass(value) and "__str__" not in vars(type(value))


def _show(value: Any) -> str:
    """A value as it would be written in the YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, frozenset):  # unordered: sort so the line is stable
        return "[" + ", ".join(sorted(map(_show, value))) + "]"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(_show, value)) + "]"
    return redact_secrets(str(value))
