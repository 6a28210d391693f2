"""RuntimeSwap: the only code that replaces the running Runtime.

Three things change what pyproxy runs: a config reload, and adding or removing a
backend through the admin API. All three build a complete new snapshot and swap it
under one lock, so they cannot interleave and lose each other, and no request ever
sees half a change.

`RuntimeSwap.reload` is the one way into a reload: the file watcher, SIGHUP and
`POST /admin/reload` all call it, so each trigger has the same effects. Where the
new config comes from is the `ConfigSource` it was given: the config file
(`FileSource`), or a config built in code that a reload re-applies as it is
(`FixedSource`, for `--demo`), both in sources.py. See docs/reload.md.

Backends the admin API added, removed or overrode (weight, drain) are kept in
`AdminChanges`, which every rebuild applies on top of the file, and (with
`admin.state_file`) on disk (state_file.py), so they survive reloads and restarts.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyproxy.config.load import ConfigError
from pyproxy.config.report import describe_changes, keep_running_values
from pyproxy.config.schema import BackendConfig, Config
from pyproxy.observe.metrics import Metrics
from pyproxy.pool.backend import Backend
from pyproxy.pool.urlguard import url_identity
from pyproxy.runtime.admin_changes import NO_OVERRIDE, AdminChanges, BackendOverride
from pyproxy.runtime.admin_rules import name_clashes, pool_for_added
from pyproxy.runtime.snapshot import RuntimeHolder, build_runtime
from pyproxy.runtime.sources import ConfigSource, FileSource
from pyproxy.runtime.state_file import save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    changes: list[str]  # what changed, when ok
    problems: list[str]  # why nothing changed, when not ok


class Keep(enum.Enum):
    """`set_backend`'s "leave this as it is" (None already means "clear the weight")."""

    KEEP = "keep"


KEEP = Keep.KEEP


def keep_restart_settings(old: Config, new: Config) -> Config:
    """Listeners, the thread count and the edge limits are bound at start: the running
    values stay (the list is `RESTART_NEEDED` in config/report.py, which the summary
    uses too, so what is kept and what is reported cannot drift apart)."""
    return keep_running_values(old, new)


class RuntimeSwap:
    """The only code that replaces the running Runtime: reloads and admin changes.

    Every path that changes what pyproxy runs goes through one of its methods (reload,
    add, remove, set a backend), which build a whole new Runtime and swap it into the
    holder under `holder.swap_lock`.

    `source`: where reloads read the config; by default the file the running config
    came from (none: a reload is refused). `on_reload` runs first in every reload and
    `after_reload` last, whatever its outcome (the service reopens its access log and
    tells systemd "reloading", then "ready"). `on_backend_added`
    lets the health checker probe a new backend at once; `on_settings` sees each new
    Config a reload applied.
    """

    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        *,
        source: ConfigSource | None = None,
        on_reload: Callable[[], None] = lambda: None,
        after_reload: Callable[[], None] = lambda: None,
        on_backend_added: Callable[[], None] = lambda: None,
        on_settings: Callable[[Config], None] = lambda config: None,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        path = holder.runtime.config.source_path
        self.source = source if source is not None else FileSource(path) if path else None
        self.on_reload = on_reload
        self.after_reload = after_reload
        self.on_backend_added = on_backend_added
        self.on_settings = on_settings
        self.last_reload: tuple[bool, float] | None = None  # (succeeded, monotonic time)
        # Whole reloads run one at a time (read + validate + swap), so the last one to
        # run read the newest file; admin changes only need swap_lock.
        self._reload_lock = threading.Lock()

    # -- reload ------------------------------------------------------------------

    def reload(self, trigger: str) -> ReloadResult:
        """Read the config from the source; apply it only if it is valid in full.
        `trigger` names the caller in the log: "file change", "SIGHUP", "admin API"."""
        with self._reload_lock:
            self.on_reload()
            try:
                return self._reload(trigger)
            finally:
                self.after_reload()

    def _reload(self, trigger: str) -> ReloadResult:
        if self.source is None:
            return ReloadResult(False, [], ["no config file: pyproxy was started without one"])
        try:
            new = self.source.read()
        except ConfigError as error:
            self.metrics.reload_result(False)
            self.last_reload = (False, time.monotonic())
            for problem in error.problems:
                log.error("reload (%s): %s", trigger, problem)
            log.error(
                "reload (%s): %s is invalid; the running config stays", trigger, self.source.name
            )
            return ReloadResult(False, [], error.problems)
        with self.holder.swap_lock:
            clash = name_clashes(new, self.holder.admin)
            if clash:
                self.metrics.reload_result(False)
                self.last_reload = (False, time.monotonic())
                for problem in clash:
                    log.error("reload (%s): %s", trigger, problem)
                return ReloadResult(False, [], clash)
            old = self.holder.runtime
            changes = describe_changes(old.config, new)
            # Counted just before the swap, so whoever sees the new backends also sees
            # the reload counted (nothing in the swap can fail on a validated config).
            self.metrics.reload_result(True)
            self.last_reload = (True, time.monotonic())
            self._swap(keep_restart_settings(old.config, new), self.holder.admin)
        for line in changes:
            log.info("reload (%s): %s", trigger, line)
        if not changes:
            log.info("reload (%s): no changes", trigger)
        self.on_settings(self.holder.runtime.config)
        return ReloadResult(True, changes, [])

    # -- admin changes -------------------------------------------------------------

    def add_backend(self, backend: BackendConfig, pool: str | None = None) -> Backend:
        """Add a backend (already validated) to `pool` (None: the only pool); raises
        KeyError if its name or URL exists, ValueError if the pool is unknown or must
        be named (more than one pool)."""
        with self.holder.swap_lock:
            runtime = self.holder.runtime
            pool = pool_for_added(runtime.config, pool)
            identity = url_identity(backend.url)
            for existing in runtime.backends:
                if existing.name == backend.name or url_identity(existing.url) == identity:
                    raise KeyError(
                        f"a backend named {existing.name} with url {existing.url} exists"
                    )
            admin = self.holder.admin
            admin = dataclasses.replace(
                admin,
                added=(*admin.added, backend),
                removed_urls=admin.removed_urls - {backend.url},
                added_pools=(
                    *((url, name) for url, name in admin.added_pools if url != backend.url),
                    # the first pool is where an added backend goes anyway
                    *([(backend.url, pool)] if pool != runtime.config.pools[0].name else []),
                ),
            )
            self._swap(runtime.config, admin)
            added = self.holder.runtime.find(url=backend.url)
        assert added is not None
        log.info(
            "admin: added backend %s (%s), weight %d", backend.name, backend.url, backend.weight
        )
        self.on_backend_added()
        return added

    def remove_backend(self, name: str | None, url: str | None) -> Backend | None:
        """Take a backend out: no new requests; in-flight ones finish. None if unknown."""
        with self.holder.swap_lock:
            runtime = self.holder.runtime
            target = runtime.find(name=name, url=url)
            if target is None:
                return None
            admin = self.holder.admin
            admin = dataclasses.replace(
                admin,
                added=tuple(b for b in admin.added if b.url != target.url),
                removed_urls=admin.removed_urls | {target.url},
                added_pools=tuple(p for p in admin.added_pools if p[0] != target.url),
            )
            self._swap(runtime.config, admin)
        log.info("admin: removed backend %s (%s)", target.name, target.url)
        return target

    def set_backend(
        self, name: str, *, weight: int | Keep | None = KEEP, drain: bool | None = None
    ) -> Backend | None:
        """Override a running backend's weight (None: back to the configured one) and
        drain it or undo that; None if there is no backend by that name. Drain stops
        new requests at once (the judge reads it); in-flight ones finish."""
        with self.holder.swap_lock:
            target = self.holder.runtime.find(name=name)
            if target is None:
                return None
            admin = self.holder.admin
            old = admin.overrides.get(target.url, NO_OVERRIDE)
            new = BackendOverride(
                weight=old.weight if weight is KEEP else weight,
                drain=old.drain if drain is None else drain,
            )
            overrides = {url: o for url, o in admin.overrides.items() if url != target.url}
            if not new.is_empty():
                overrides[target.url] = new
            self._swap(self.holder.runtime.config, dataclasses.replace(admin, overrides=overrides))
        log.info("admin: set backend %s (%s): %s (configured weight %d)",
                 target.name, target.url, new.describe(), target.config.weight)  # fmt: skip
        return target

    # -- the swap ------------------------------------------------------------------

    def _swap(self, config: Config, admin: AdminChanges) -> None:
        """Build and install a new runtime. Caller holds `holder.swap_lock`."""
        runtime, gone = build_runtime(
            config,
            previous=self.holder.runtime,
            admin=admin,
            on_store_error=self.holder.on_store_error,
        )
        running = {b.url for b in runtime.backends}
        for backend in gone:
            if backend.url in admin.overrides and backend.url not in running:
                log.info("admin: backend %s (%s) left the running set; its override (%s) "
                         "is dropped", backend.name, backend.url,
                         admin.overrides[backend.url].describe())  # fmt: skip
        admin = admin.overrides_only_for(running)
        self.holder.runtime = runtime
        self.holder.admin = admin
        for backend in gone:
            backend.retire()
            for pool in runtime.pools.values():
                if pool.backend_limiter is not None:
                    pool.backend_limiter.forget(backend.name)
        state_file = config.admin.state_file
        if state_file:
            save_state(state_file, admin)
