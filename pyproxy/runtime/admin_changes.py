"""What the admin API changed: backends added and removed, weights and drains set.

These changes outlive reloads: a reload applies the file, then the admin's changes on
top of it (HAProxy keeps `set server` changes only until a reload; pyproxy keeps them,
and with `admin.state_file` across restarts too, runtime/state_file.py). snapshot.py
builds each new running snapshot from a config and these changes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from pyproxy.config.schema import BackendConfig, Config
from pyproxy.pool.backend import Backend


@dataclass(frozen=True)
class BackendOverride:
    """What POST /admin/set-backend set on one backend (HAProxy's `set server ...
    weight` and `set server ... state drain`): a weight that wins over the configured
    one until cleared (None: the configured weight), and drain."""

    weight: int | None = None
    drain: bool = False

    def is_empty(self) -> bool:
        return self.weight is None and not self.drain

    def describe(self) -> str:
        weight = "configured weight" if self.weight is None else f"weight {self.weight}"
        return f"{weight}, {'drained' if self.drain else 'not drained'}"


NO_OVERRIDE = BackendOverride()


@dataclass(frozen=True)
class AdminChanges:
    """Backends changed through the admin API; they outlive reloads: a reload applies
    the file, and the admin's additions, removals and overrides on top of it.

    `overrides` is keyed by URL, the identity a Backend keeps across reloads; an
    override lasts as long as its backend is in the running set."""

    added: tuple[BackendConfig, ...] = ()
    removed_urls: frozenset[str] = frozenset()
    overrides: Mapping[str, BackendOverride] = field(default_factory=dict)
    # (url, pool) of added backends that went to a named pool; any other goes to the
    # first pool. A pool that a reload dropped sends its added backends there too.
    added_pools: tuple[tuple[str, str], ...] = ()

    def overrides_only_for(self, urls: Collection[str]) -> AdminChanges:
        """These changes without the overrides of backends not in `urls`."""
        kept = {url: o for url, o in self.overrides.items() if url in urls}
        return self if len(kept) == len(self.overrides) else replace(self, overrides=kept)

    def removed_from(self, config: Config) -> list[tuple[BackendConfig, str]]:
        """The file's backends the admin removed, each with the name of its pool."""
        return [
            (backend, pool.name)
            for pool in config.pools
            for backend in pool.backends
            if backend.url in self.removed_urls
        ]

    def desired(self, config: Config) -> list[tuple[BackendConfig, str]]:
        """The running set: the file's backends, minus admin-removed, plus admin-added."""
        return [entry for entries in self.desired_by_pool(config).values() for entry in entries]

    def desired_by_pool(self, config: Config) -> dict[str, list[tuple[BackendConfig, str]]]:
        """The running set of each pool (file order): the file's backends, minus
        admin-removed, plus admin-added."""
        added_urls = {b.url for b in self.added}
        wanted = {
            pool.name: [
                (b, "config")
                for b in pool.backends
                if b.url not in self.removed_urls and b.url not in added_urls
            ]
            for pool in config.pools
        }
        first = config.pools[0].name
        chosen = dict(self.added_pools)
        for backend in self.added:
            pool = chosen.get(backend.url, first)
            wanted.get(pool, wanted[first]).append((backend, "admin"))
        return wanted


def apply_overrides(backends: Iterable[Backend], admin: AdminChanges) -> None:
    """Set (or clear) on each backend what the admin set through set-backend: the one
    place overrides reach the Backends, after every build. Two plain attribute stores
    per backend, so a request reading them never sees a torn value."""
    for backend in backends:
        override = admin.overrides.get(backend.url, NO_OVERRIDE)
        backend.admin_weight = override.weight
        backend.drained = override.drain
