"""Rules for what the admin API adds: which pool an added backend joins, and names
that clash between the config file and the admin's additions.

Backend names label metrics and address remove-backend and set-backend, so they must
stay unique across the file and the admin's additions. Which side wins depends on
when the clash is found: on reload the running admin changes win (the file is
refused, the old config stays); at start the file wins (the clashing addition from
the state file is dropped, with a warning), because a process must be able to start.
"""

from __future__ import annotations

import dataclasses
import logging

from pyproxy.config.schema import BackendConfig, Config
from pyproxy.runtime.admin_changes import AdminChanges

log = logging.getLogger(__name__)


def pool_for_added(config: Config, pool: str | None) -> str:
    """The pool an admin-added backend goes to: the one named, or the only one.
    ValueError (a 400 for the admin API) when it is unknown or must be named."""
    names = [p.name for p in config.pools]
    if pool is None:
        if len(names) > 1:
            raise ValueError(f"'pool' is required: there are pools {', '.join(names)}")
        return names[0]
    if pool not in names:
        raise ValueError(f"unknown pool {pool!r} (pools: {', '.join(names)})")
    return pool


def _clashes(config: Config, admin: AdminChanges) -> list[tuple[int, BackendConfig, BackendConfig]]:
    """(index, file backend, admin-added backend) sharing a name but not a URL: names
    label metrics and address remove-backend, so they must stay unique."""
    added = {b.name: b for b in admin.added}
    return [
        (index, backend, added[backend.name])
        for index, backend in enumerate(config.backends)
        if backend.name in added
        and backend.url != added[backend.name].url
        and backend.url not in admin.removed_urls
    ]


def name_clashes(config: Config, admin: AdminChanges) -> list[str]:
    """On reload the running admin changes win: the clashing file is refused."""
    return [
        f"backends[{index}].name: {backend.name!r} is already used by the backend "
        f"{added.url} added through the admin API"
        for index, backend, added in _clashes(config, admin)
    ]


def drop_name_clashes(config: Config, admin: AdminChanges) -> AdminChanges:
    """At start the file wins: clashing admin-added backends are dropped, with a warning."""
    dropped = set()
    for _, backend, added in _clashes(config, admin):
        log.warning(
            "admin state: dropped added backend %s (%s): the config file now names %s so",
            added.name, added.url, backend.url,
        )  # fmt: skip
        dropped.add(added.url)
    kept = dataclasses.replace(admin, added=tuple(b for b in admin.added if b.url not in dropped))
    running = {b.url for b, _ in kept.desired(config)}
    for url, override in kept.overrides.items():
        if url not in running:
            log.warning("admin state: dropped the override of %s (%s): it is not in the "
                        "running set", url, override.describe())  # fmt: skip
    return kept.overrides_only_for(running)
