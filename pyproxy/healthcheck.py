"""Active health checks: `HealthChecker` loops; one probe is in healthprobe.py.

The loop probes every backend at start, then each one every
`interval` seconds with ~10% jitter, so probes of many backends (or of many pyproxy
instances) do not fall into lockstep. Only real transitions are logged.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from pyproxy.backend import Backend
from pyproxy.config import HealthCheckConfig
from pyproxy.healthprobe import check_backend

log = logging.getLogger(__name__)

PROBE_WORKERS = 8  # probes run in parallel so one hanging backend cannot delay the rest


class HealthChecker:
    """Probes the backends that `backends()` returns, in a daemon thread named
    `pyproxy-health`. `settings()` is read each round, so a reload takes effect."""

    def __init__(
        self,
        backends: Callable[[], Sequence[Backend]],
        settings: Callable[[], HealthCheckConfig],
        on_transition: Callable[[Backend], None],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._backends = backends
        self._settings = settings
        self._on_transition = on_transition
        self._clock = clock
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._next_due: dict[int, float] = {}  # id(backend) -> clock time of its next probe
        self._pool = ThreadPoolExecutor(PROBE_WORKERS, thread_name_prefix="pyproxy-probe")
        self._thread = threading.Thread(target=self._run, name="pyproxy-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():  # a Service built but never started must close too
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def poke(self) -> None:
        """Probe new backends now instead of at the next wake-up (after add-backend)."""
        self._wake.set()

    def probe_once(self, backend: Backend, settings: HealthCheckConfig) -> bool:
        """Probe and record; True if the verdict changed."""
        passed, detail = check_backend(backend, settings)
        changed = backend.health.record(passed, detail, self._clock())
        if changed:
            level = logging.INFO if backend.health.up else logging.WARNING
            log.log(level, "backend %s is %s (%s)", backend.name, backend.health.state, detail)
            self._on_transition(backend)
        return changed

    def _run(self) -> None:
        while not self._stop.is_set():
            settings = self._settings()
            if not settings.enabled:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            now = self._clock()
            backends = list(self._backends())
            live = {id(b) for b in backends}
            self._next_due = {k: v for k, v in self._next_due.items() if k in live}
            due = [b for b in backends if self._next_due.get(id(b), 0.0) <= now]
            futures = [self._pool.submit(self.probe_once, b, settings) for b in due]
            for future in futures:
                try:
                    future.result()
                except Exception:
                    log.exception("health probe crashed")
            for backend in due:
                jitter = self._rng.uniform(0.9, 1.1)
                self._next_due[id(backend)] = self._clock() + settings.interval * jitter
            if self._next_due:
                wait = max(0.0, min(self._next_due.values()) - self._clock())
            else:
                wait = settings.interval
            self._wake.wait(min(wait, 1.0) if wait else 0.01)
            self._wake.clear()
