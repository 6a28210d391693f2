"""The master of `workers: N > 1`: binds, starts N worker processes, supervises them.

    bind the proxy and admin listeners -> start N workers -> supervise -> SIGTERM:
        every worker drains (docs/shutdown.md), the master exits when all have.

Workers are started as new interpreters (`python -m pyproxy.process.worker FD`, fork
then exec), each inheriting a listening socket of its own on the proxy's port
(SO_REUSEPORT: see bind_listeners), so the kernel spreads the connections among
them. fork() alone would copy this process with its threads' locks held by threads
that do not exist in the child (the reason Python 3.12 warns about fork() in a
threaded process); exec starts clean, so a replacement can be started at any time.

The master serves no proxy traffic. It owns the admin listener (process/master_admin.py),
the config watch and SIGHUP, and a copy of the config with the admin changes (and the
state file): a replaced worker starts from that copy. A worker that exits is replaced
after 1 s, doubling to 30 s while replacements keep dying young; a worker that is
merely slow to answer is left alone. See docs/workers.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from pyproxy.config.schema import Config
from pyproxy.edge.server import EdgeServer
from pyproxy.observe.metrics import Metrics
from pyproxy.ops.admin import AdminApp
from pyproxy.process.master_admin import MasterAdmin
from pyproxy.process.sdnotify import Notifier
from pyproxy.process.slots import Slot
from pyproxy.process.worker_gauges import worker_gauges
from pyproxy.runtime.admin_rules import drop_name_clashes
from pyproxy.runtime.snapshot import RuntimeHolder, build_runtime
from pyproxy.runtime.sources import FileSource
from pyproxy.runtime.state_file import load_state, restorable
from pyproxy.runtime.swap import ReloadResult, RuntimeSwap
from pyproxy.runtime.watcher import ConfigWatcher

log = logging.getLogger(__name__)

STARTUP = 20.0  # seconds a starting worker has to serve before changes skip it


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.clock = time.monotonic
        self.started_at = self.clock()
        self.instance_name = f"pyproxy-{secrets.token_hex(4)}"
        self.token = secrets.token_urlsafe(32)  # the workers' admin token; never leaves
        self.changes_lock = threading.Lock()
        self._stopping = threading.Event()
        self.slots = [Slot() for _ in range(config.workers)]
        restored = restorable(load_state(config.admin.state_file), config)
        restored = drop_name_clashes(config, restored)
        runtime, _ = build_runtime(config, admin=restored)
        self.holder = RuntimeHolder(runtime, restored)
        own_metrics = Metrics()  # the master's reload counts are the workers' too: unexposed
        self.swap = RuntimeSwap(self.holder, own_metrics, on_settings=self._publish)
        own = AdminApp(self.holder, own_metrics, self, self.swap, self._own_addresses)
        self.view = MasterAdmin(own, self)
        # systemd hears from the master only: it is the service's main PID
        # (NotifyAccess=main refuses a worker's READY=1).
        self.notifier = Notifier()
        self.listeners = bind_listeners(config.listen.host, config.listen.port, config.workers)
        self.listener = self.listeners[0]  # where the proxy listens (port 0 resolved)
        try:
            self.admin_server = EdgeServer(
                self.view, config.admin.listen.host, config.admin.listen.port,
                threads=4, limits=config.limits, name="admin",
            )  # fmt: skip
        except OSError:
            for listener in self.listeners:
                listener.close()
            raise
        # Private (0700) and removed at exit: the workers' metric files, and the config
        # the master validated last, which a worker's reload applies (worker.py).
        self.run_dir = tempfile.mkdtemp(prefix="pyproxy-")
        self.metrics_dir = os.path.join(self.run_dir, "metrics")
        os.mkdir(self.metrics_dir)
        self.config_file = os.path.join(self.run_dir, "config.pickle")
        self._publish(self.holder.runtime.config)
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=self.metrics_dir)
        self.restarts = Counter(
            "proxy_worker_restarts_total", "Workers replaced after they exited",
            registry=self.registry,
        )  # fmt: skip
        self.watcher: ConfigWatcher | None = None
        # Never written: a worker reading it sees end-of-file when the master is gone
        # (even by SIGKILL) and drains, rather than serve on, orphaned, with no
        # supervisor and no admin API.
        self._alive_r, self._alive_w = os.pipe()

    def _publish(self, config: Config) -> None:
        """Keep the config the master runs now where its workers' reloads read it: a
        reload is validated once, here, and every worker applies exactly that."""
        partial = self.config_file + ".new"
        with open(partial, "wb") as file:
            pickle.dump(config, file)
        os.replace(partial, self.config_file)  # a reader sees the old or the new, whole

    def _own_addresses(self) -> list[tuple[str, int]]:
        """Where this pyproxy listens: add-backend refuses a backend that is itself."""
        host, port = self.listener.getsockname()[:2]
        return [(host, port), self.admin_server.address[:2]]

    # -- what the admin API reads (ops/admin.py's Instance, master_admin's Workers) --

    def ready(self) -> bool:
        return not self._stopping.is_set()

    def requests_in_flight(self) -> int:
        return 0  # the master serves no proxy requests

    def ports(self, *, starting: bool) -> dict[int, int]:
        ports = {}
        for slot in self.slots:
            process = slot.process
            if process is not None and process.poll() is None:
                if starting:  # a change must reach it: wait until it can be told
                    slot.ready.wait(max(0.0, slot.started_at + STARTUP - self.clock()))
                if starting or slot.ready.is_set():
                    ports[process.pid] = slot.port  # 0: not serving yet: "no answer"
        return ports

    def metrics_page(self, worker_pages: list[tuple[int, bytes]]) -> bytes:
        return generate_latest(self.registry) + worker_gauges(worker_pages)

    # -- life --------------------------------------------------------------------

    def serve(self) -> int:
        """Start the workers and supervise them until SIGTERM; 0 if all drained cleanly."""
        with self.changes_lock:
            for slot in self.slots:
                self._start(slot)
        admin = threading.Thread(target=self.admin_server.serve_forever,
                                 name="pyproxy-admin", daemon=True)  # fmt: skip
        admin.start()
        if isinstance(self.swap.source, FileSource):
            self.watcher = ConfigWatcher(self.swap.source, self.reload)
            self.watcher.start()
        host, port = self.listener.getsockname()[:2]
        log.info("master serving on http://%s:%d with %d workers (admin %s:%d)", host, port,
                 len(self.slots), *self.admin_server.address[:2])  # fmt: skip
        self.notifier.ready()
        try:
            while not self._stopping.wait(0.2):
                self._supervise()
            return self._drain()
        finally:
            self.kill_workers()  # whatever ended the loop: no worker outlives the master

    def request_shutdown(self) -> None:
        self._stopping.set()

    def reload(self, trigger: str) -> ReloadResult:
        """Validate the file once, here; then every worker applies it (SIGHUP, the watch)."""
        with self.changes_lock:
            self.notifier.reloading()
            result = self.swap.reload(trigger)
            if result.ok:
                for answer in self.view.tell_workers("/admin/reload"):
                    log.error("reload (%s): worker %d did not apply it: %s", trigger,
                              answer.pid, answer.problem or answer.body[:200])  # fmt: skip
            self.notifier.ready()
            return result

    def _start(self, slot: Slot) -> None:
        """Start a worker in `slot` with the current config and admin changes.
        The caller holds changes_lock, so no change is between this copy and the next."""
        # With the master's admin address: the worker refuses to dial it (urlguard.py).
        served = (self.holder.runtime.config, self.holder.admin, self.token,
                  self.admin_server.address[:2])  # fmt: skip
        listener = self.listeners[self.slots.index(slot)]  # a replacement takes the same
        slot.start(
            listen_fd=listener.fileno(), alive_fd=self._alive_r,
            config_file=self.config_file, metrics_dir=self.metrics_dir,
            served=pickle.dumps(served), now=self.clock(),
        )  # fmt: skip

    def _supervise(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if slot.exited(now):
                assert slot.process is not None
                mark_process_dead(slot.process.pid, self.metrics_dir)  # its live gauges go
            if slot.due(now):
                self.restarts.inc()
                with self.changes_lock:
                    self._start(slot)

    def _drain(self) -> int:
        log.info("shutdown: every worker drains")
        self.notifier.stopping()
        if self.watcher is not None:
            self.watcher.stop()
        # Only workers still running: one that died and awaits its replacement has
        # already been reported, and its old exit code says nothing about this drain.
        processes = [p for p in (s.running() for s in self.slots) if p is not None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for listener in self.listeners:
            listener.close()  # the workers hold their own copies while they drain
        settings = self.config.shutdown
        bound = settings.delay + settings.drain_timeout + 15
        clean = True
        for process in processes:
            try:
                code = process.wait(timeout=bound)
            except subprocess.TimeoutExpired:
                log.error("worker %d did not exit within %gs: killed", process.pid, bound)
                process.kill()
                code = process.wait()
            clean = clean and code == 0
        self.admin_server.close()
        for backend in self.holder.runtime.backends:
            backend.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("shutdown: all workers exited")
        return 0 if clean else 1

    def kill_workers(self) -> None:
        """Second signal (or the master failing): nobody waits for a drain. The run
        directory, which holds the validated config with its secrets, goes too."""
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


# Linux (3.9+) spreads connections over a group of SO_REUSEPORT sockets. macOS and the
# BSDs accept the option but give every connection to one socket of the group
# (FreeBSD balances only with its own SO_REUSEPORT_LB): one shared socket is better.
SPREADS_CONNECTIONS = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker, all on host:port with SO_REUSEPORT, so that the
    kernel spreads new connections evenly over the workers (by a hash of the client's
    address and port), as nginx's `listen ... reuseport` does. Workers sharing one
    socket take connections in a race that one of them keeps winning: with 2 workers
    and wrk's 64 connections, one worker held twice as many as the other and the pair
    reached 1.36x one worker's req/s (scripts/bench_workers.py). Elsewhere than on
    Linux, one socket is shared by all (see SPREADS_CONNECTIONS). A worker's socket
    stays open in the master while the worker is replaced, so connections the kernel
    gives it meanwhile wait in its backlog for the replacement instead of being
    refused."""
    if not SPREADS_CONNECTIONS:
        return [bind(host, port)] * count
    # A port in use is refused first, by a plain bind: sockets with SO_REUSEPORT would
    # otherwise join another process's group on that port (a second pyproxy started by
    # mistake) and silently take half of its connections.
    probe = bind(host, port)
    port = probe.getsockname()[1]  # port 0 is resolved here
    probe.close()
    listeners: list[socket.socket] = []
    try:
        for _ in range(count):
            listeners.append(bind(host, port, reuse_port=True))
    except OSError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket for the proxy, bound here and inherited by a worker."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{host}:{port}: {exc.strerror}") from exc
    return sock
