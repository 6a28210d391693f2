"""Service: everything one running pyproxy owns, and its life from start to exit.

    build (bind both listeners) -> start (threads) -> serve -> shutdown:
        /readyz turns 503 and responses carry Connection: close at once;
        after `shutdown.delay` the proxy listener closes;
        in-flight requests finish (at most `shutdown.drain_timeout`);
        threads stop, the process exits 0.

Threads: `pyproxy-proxy` and `pyproxy-admin` run the two listeners' event loops
(each with its own waitress worker pool), `pyproxy-health` probes backends,
`pyproxy-reload` watches the config file, `pyproxy-accesslog` writes the log.
The caller's thread waits in `serve()`. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from prometheus_client import CollectorRegistry

from pyproxy.config.schema import Config
from pyproxy.edge.server import EdgeServer
from pyproxy.observe.accesslog import AccessLog
from pyproxy.observe.metrics import Metrics
from pyproxy.ops.admin import AdminApp
from pyproxy.pool.health_checker import HealthChecker
from pyproxy.pool.urlguard import OWN_LISTENERS
from pyproxy.process.sdnotify import Notifier
from pyproxy.proxy.app import ProxyApp
from pyproxy.runtime.admin_changes import AdminChanges
from pyproxy.runtime.admin_rules import drop_name_clashes
from pyproxy.runtime.snapshot import RuntimeHolder, build_runtime
from pyproxy.runtime.sources import ConfigSource, FileSource
from pyproxy.runtime.state_file import load_state, restorable
from pyproxy.runtime.swap import ReloadResult, RuntimeSwap
from pyproxy.runtime.watcher import ConfigWatcher

log = logging.getLogger(__name__)

ADMIN_THREADS = 4  # probes and scrapes are light; a busy proxy pool must not starve them


class Service:
    """One pyproxy instance. Binds its listeners on construction (OSError if a port is
    taken); `start()` starts threads; `serve()` blocks until shutdown completes.

    `source`: where reloads read the config; by default `config.source_path`, watched
    for changes. `--demo` passes a FixedSource: nothing to watch, reloads change nothing.
    """

    def __init__(
        self,
        config: Config,
        *,
        source: ConfigSource | None = None,
        registry: CollectorRegistry | None = None,
        access_log_stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        listen_socket: socket.socket | None = None,
        restored: AdminChanges | None = None,
        also_own: Sequence[tuple[str, int]] = (),
    ) -> None:
        """`listen_socket`, `restored` and `also_own`: a worker process serves the proxy
        socket its master bound, with the admin changes the master keeps, and counts
        the master's admin listener as its own too (process/worker.py)."""
        self.config = config
        self.also_own = tuple(also_own)
        self.clock = clock
        self.metrics = Metrics(registry)
        self.started_at = clock()
        # Unique per instance, so two pyproxies chained on purpose are not a "loop".
        self.instance_name = f"pyproxy-{secrets.token_hex(4)}"
        # A tampered state file must not add what the admin API refuses (urlguard.py).
        if restored is None:
            restored = restorable(load_state(config.admin.state_file), config)
        admin_changes = drop_name_clashes(config, restored)

        def store_error() -> None:
            self.metrics.count_error("", "rate_limit_store")

        runtime, _ = build_runtime(
            config, admin=admin_changes, clock=clock, on_store_error=store_error
        )
        self.holder = RuntimeHolder(runtime, admin_changes, on_store_error=store_error)
        # The per-backend gauges are read from the running backends at each scrape.
        self.metrics.read_backends_from(lambda: self.holder.runtime.members())
        self._access_log_stream = access_log_stream  # kept for rebuilds on reload
        self.access_log = (
            AccessLog(config.access_log, stream=access_log_stream)
            if config.access_log.enabled
            else None
        )
        self.app = ProxyApp(
            self.holder, self.metrics, instance_name=self.instance_name,
            access_log=self.access_log, clock=clock,
        )  # fmt: skip
        self._shutdown_requested = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.notifier = Notifier()  # systemd's $NOTIFY_SOCKET; does nothing without it
        self.proxy_server = EdgeServer(
            self.app, config.listen.host, config.listen.port,
            threads=config.threads, limits=config.limits, name="proxy", sock=listen_socket,
        )  # fmt: skip
        self.proxy_server.on_refused = self.app.record_refusal
        self.watcher: ConfigWatcher | None = None
        self.swap = RuntimeSwap(
            self.holder, self.metrics, source=source,
            on_reload=self._before_reload,
            after_reload=self.notifier.ready,  # over, applied or not: systemd leaves "reloading"
            on_backend_added=lambda: self.health_checker.poke(),
            on_settings=self._apply_settings,
        )  # fmt: skip
        admin_app = AdminApp(self.holder, self.metrics, self, self.swap, self._own_addresses)
        try:
            self.admin_server = EdgeServer(
                admin_app, config.admin.listen.host,
                config.admin.listen.port, threads=ADMIN_THREADS, limits=config.limits,
                name="admin",
            )  # fmt: skip
        except OSError:
            self.proxy_server.close()
            raise
        self.health_checker = HealthChecker(
            backends=lambda: self.holder.runtime.backends,
            settings=lambda: self.holder.runtime.config.health_check,
            settings_for=lambda backend: self.holder.runtime.health_settings(backend),
            # Nothing to publish: the backend gauges are read at each scrape (metrics.py).
            on_transition=lambda backend: None,
            clock=clock,
        )

    def _own_addresses(self) -> list[tuple[str, int]]:
        """Where this pyproxy listens (in a worker, its master's admin listener too):
        no admin-added backend may point here."""
        own = [self.proxy_server.address[:2], self.admin_server.address[:2]]
        return own + list(self.also_own)

    def reload(self, trigger: str) -> ReloadResult:
        """Reload the config (SIGHUP and the watcher call this; the admin API calls
        `swap.reload`, the same entry)."""
        return self.swap.reload(trigger)

    def _before_reload(self) -> None:
        self.notifier.reloading()
        self._reopen_access_log()

    def _reopen_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()  # after logrotate moved the file away

    def _apply_settings(self, config: Config) -> None:
        """Settings that live outside the runtime snapshot: the access log."""
        if config.access_log != self.config.access_log:
            old = self.access_log
            self.access_log = (
                AccessLog(config.access_log, stream=self._access_log_stream)
                if config.access_log.enabled
                else None
            )
            self.app.access_log = self.access_log
            if old is not None:
                old.close()
        self.config = config

    # -- addresses -------------------------------------------------------------

    @property
    def proxy_url(self) -> str:
        host, port = self.proxy_server.address[:2]
        return f"http://{host}:{port}"

    @property
    def admin_url(self) -> str:
        host, port = self.admin_server.address[:2]
        return f"http://{host}:{port}"

    def ready(self) -> bool:
        """False from the moment shutdown starts: /readyz turns 503 at once, so load
        balancers in front stop sending new clients here."""
        return not self._shutdown_requested.is_set()

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        # Known to the connect-time SSRF check from now on: an admin-added backend
        # whose name comes to resolve to one of these is refused (pool/urlguard.py).
        for address in self._own_addresses():
            OWN_LISTENERS.add(address)
        self._spawn("pyproxy-proxy", self.proxy_server.serve_forever)
        self._spawn("pyproxy-admin", self.admin_server.serve_forever)
        self.health_checker.start()
        if isinstance(self.swap.source, FileSource):
            self.watcher = ConfigWatcher(self.swap.source, self.reload)
            self.watcher.start()
        log.info(
            "serving on %s (admin %s), %d backend(s), strategy %s",
            self.proxy_url, self.admin_url, len(self.holder.runtime.backends),
            self.config.strategy,
        )  # fmt: skip
        # Both sockets have listened since __init__: the kernel completes handshakes
        # into their backlogs, and the loops now running accept them.
        self.notifier.ready()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (signal handlers call this; it returns at once)."""
        if not self._shutdown_requested.is_set():
            log.info("shutdown requested: /readyz now answers 503")
            self.notifier.stopping()
        self._shutdown_requested.set()
        self.proxy_server.draining = True

    def serve(self) -> None:
        """Block until a shutdown was requested and has completed."""
        while not self._shutdown_requested.wait(0.5):
            pass
        self._drain()
        self.close()

    def _drain(self) -> None:
        settings = self.config.shutdown
        if settings.delay:
            # Keep serving while load balancers in front notice that /readyz turned 503:
            # they stop sending only after their next health check of this instance.
            log.info("shutdown: serving %.1fs more before closing the listener", settings.delay)
            self._stopped.wait(settings.delay)
        self.proxy_server.stop_accepting()
        deadline = self.clock() + settings.drain_timeout
        while self._unfinished() and self.clock() < deadline:
            self._stopped.wait(0.05)
        left = self._unfinished()
        if left:
            log.warning("shutdown: drain timeout passed with %d request(s) in flight", left)
        else:
            log.info("shutdown: all requests finished")

    def _unfinished(self) -> int:
        """Requests in the app, or responses still being written to their clients."""
        return max(self.requests_in_flight(), self.proxy_server.busy_connections())

    def requests_in_flight(self) -> int:
        return self.app.requests_in_flight

    def close(self) -> None:
        """Stop everything now (no draining). Safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health_checker.stop()
        if self.watcher is not None:
            self.watcher.stop()
        self.proxy_server.close()
        self.admin_server.close()
        if self._threads:  # started, so its listeners were added
            for address in self._own_addresses():
                OWN_LISTENERS.remove(address)
        for thread in self._threads:
            thread.join(timeout=2)
        if self.access_log is not None:
            self.access_log.close()
        for backend in self.holder.runtime.backends:
            backend.close()
