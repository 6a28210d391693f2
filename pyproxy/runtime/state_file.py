"""The admin state file: the backends the admin API added or removed, and the weights
and drains it set, kept on disk so they survive restarts (`admin.state_file`;
docs/admin-api.md). A file written before set-backend existed has no "overrides"
and loads as having none.

`save_state` writes after every admin change (RuntimeSwap calls it under the swap
lock), `load_state` reads at start, and `restorable` applies the admin API's own URL
rules to what was read: the file is the admin API's memory, so editing it must not
be a way around them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile

from pyproxy.config.load import ConfigError, parse_backend
from pyproxy.config.schema import Config
from pyproxy.config.values import backend_weight
from pyproxy.pool.urlguard import keep_allowed
from pyproxy.runtime.admin_changes import AdminChanges, BackendOverride

log = logging.getLogger(__name__)


def save_state(path: str, admin: AdminChanges) -> None:
    """Write the admin changes atomically: a crash mid-write leaves the old file whole."""
    payload = {
        "added": [dataclasses.asdict(b) for b in admin.added],
        "removed_urls": sorted(admin.removed_urls),
        "overrides": [
            {"url": url, "weight": override.weight, "drain": override.drain}
            for url, override in sorted(admin.overrides.items())
        ],
        "added_pools": dict(admin.added_pools),  # url -> pool, for added backends
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".pyproxy-state-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)  # atomic on POSIX: readers see the old or the new file
    except OSError as error:
        log.error("admin state file %s not written: %s", path, error)
        with contextlib.suppress(OSError):
            os.unlink(temp)


def load_state(path: str | None) -> AdminChanges:
    """Read the admin changes kept by a previous run; a missing file means none."""
    if not path or not os.path.exists(path):
        return AdminChanges()
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        added = tuple(parse_backend(entry) for entry in payload.get("added", []))
        removed = frozenset(str(url) for url in payload.get("removed_urls", []))
        overrides = dict(_override(entry) for entry in payload.get("overrides", []))
        pools = tuple((str(u), str(p)) for u, p in payload.get("added_pools", {}).items())
    except (OSError, ValueError, ConfigError, AttributeError, TypeError, KeyError) as error:
        log.error("admin state file %s ignored: %s", path, error)
        return AdminChanges()
    log.info("admin state: %d added, %d removed and %d overridden backend(s) restored",
             len(added), len(removed), len(overrides))  # fmt: skip
    return AdminChanges(
        added=added, removed_urls=removed, overrides=overrides, added_pools=pools
    )


def _override(entry: dict[str, object]) -> tuple[str, BackendOverride]:
    """One saved override, checked as set-backend checks it (ValueError if invalid)."""
    url, weight, drain = entry["url"], entry.get("weight"), entry.get("drain", False)
    if not isinstance(url, str) or not isinstance(drain, bool):
        raise ValueError(f"invalid override {entry!r}")
    try:
        return url, BackendOverride(None if weight is None else backend_weight(weight), drain)
    except ValueError as error:
        raise ValueError(f"override of {url}: weight {error}") from None


def restorable(changes: AdminChanges, config: Config) -> AdminChanges:
    """The admin changes read from `admin.state_file`, minus the added backends the
    admin API would refuse (checked against the configured listeners: at start they
    are not bound yet)."""
    own = [
        (config.listen.host, config.listen.port),
        (config.admin.listen.host, config.admin.listen.port),
    ]
    return dataclasses.replace(changes, added=keep_allowed(changes.added, own))
