"""Active health checks: `HealthChecker` schedules probes; one probe is in probe.py.

Each backend is probed at start, then `interval` (with ~10% jitter) after its
previous probe ended, so probes of many backends (or of many pyproxy instances) do
not fall into lockstep. Every backend keeps its own schedule: no backend waits for
another's probe to end.

Only real transitions are logged, one line each (a backend down for an hour is not
one line per probe): going down at WARNING with the URL probed, what came back, the
streak, and a hint at the usual cause (`hint()`); coming back up at INFO.

Threads: one scheduler, `pyproxy-health`, which never does network I/O, and at most
`max_workers` probe workers, `pyproxy-probe-N`, started as they are needed. Three
rules keep a slow backend from delaying anyone else, with bounded threads however
many backends there are:

1. A probe takes at most `timeout` (probe.py), so a worker is never held longer.
2. A backend has at most one probe queued or running: a backend that hangs occupies
   one worker, never more, and is not probed again until that probe ends.
3. Backends whose last probe used its whole timeout ("slow") may hold at most half
   the workers together, so however many backends hang at once, the other half keeps
   probing the rest on time. (A backend hanging for the first time is not yet known
   as slow: for one `timeout` it may take any free worker.)

`stop()` aborts the probes in progress (shuts their sockets down) and waits for none.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence

from pyproxy.config.schema import HealthCheckConfig
from pyproxy.pool.backend import Backend
from pyproxy.pool.probe import MAX_PROBE_BODY, Probe, ProbeResult, check_backend, probe_url

log = logging.getLogger(__name__)

# Probes in flight at most. Each is bounded by `timeout` and mostly waits on a socket,
# so this bounds threads and sockets, not speed: 32 workers probe 1,000 healthy
# backends (a few ms each) every 5 s with room to spare.
PROBE_WORKERS = 32
IDLE_WAIT = 1.0  # the scheduler looks again at least this often (settings may change)


def hint(result: ProbeResult, settings: HealthCheckConfig) -> str:
    """What to look at when a backend goes down, by what its last probe met."""
    low, high = settings.expected_status
    if result.cause == "status" and result.status in (404, 405):
        return (
            f"set health_check.path to a page that answers {low}-{high}, "
            "or health_check.enabled: false"
        )
    if result.cause == "status":
        return (
            f"the status is outside health_check.expected_status ({low}-{high}); "
            "fix the page or widen expected_status"
        )
    if result.cause == "body":
        return (
            f"health_check.expect_body is not in the first {MAX_PROBE_BODY // 1024} KiB "
            "of the answer; check the page or expect_body"
        )
    if result.cause == "forbidden":
        return "an admin-added backend may not use this address (docs/security.md, SSRF)"
    if result.cause == "refused":
        return "is the backend running, and listening on that port? (health_check.port)"
    if result.detail == "connect timeout":
        return "no connection within health_check.timeout; is the host reachable (a firewall)?"
    if result.cause == "timeout":
        return (
            f"no answer within health_check.timeout ({settings.timeout:g}s); "
            "raise the timeout or check why the backend is slow"
        )
    return "is the backend speaking HTTP on that port (http:// vs https://)?"


def _what_came_back(result: ProbeResult) -> str:
    """The log's words after the arrow: "404", "200, body lacks 'ok'", "connection refused"."""
    if result.cause == "status":
        return str(result.status)  # the URL beside it already names the path
    if result.cause == "body":
        return f"{result.status}, {result.detail}"
    return result.detail


def _failures(count: int) -> str:
    return f"{count} failure" if count == 1 else f"{count} failures"


class HealthChecker:
    """Probes the backends that `backends()` returns. `settings()` is read on every
    pass of the scheduler, so a reload takes effect (with `settings_for`, each
    backend's own settings, its pool's, are read instead); backends added or removed at
    runtime are picked up the same way (`poke()` makes it at once)."""

    def __init__(
        self,
        backends: Callable[[], Sequence[Backend]],
        settings: Callable[[], HealthCheckConfig],
        on_transition: Callable[[Backend], None],
        settings_for: Callable[[Backend], HealthCheckConfig] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_workers: int = PROBE_WORKERS,
    ) -> None:
        self._backends = backends
        self._settings = settings
        self._settings_for = settings_for
        self._on_transition = on_transition
        self._clock = clock
        self._rng = rng or random.Random()
        self._max_workers = max(1, max_workers)
        self._max_slow = max(1, self._max_workers // 2)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by poke(), stop() and every probe that ends
        self._jobs: queue.SimpleQueue[Probe | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the four fields below; never held across I/O
        self._next_due: dict[Backend, float] = {}  # clock time of each backend's next probe
        self._running: dict[Backend, Probe] = {}  # queued or in progress: one per backend
        self._slow: set[Backend] = set()  # last probe used its whole timeout
        self._workers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="pyproxy-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop probing now. Probes in progress are aborted, not waited for."""
        with self._lock:  # so the scheduler starts no worker or probe from now on
            self._stop.set()
            probes = list(self._running.values())
            workers = len(self._workers)
        self._wake.set()
        for probe in probes:
            probe.abort()
        for _ in range(workers):
            self._jobs.put(None)  # one "stop" for each worker
        if self._thread.is_alive():  # a Service built but never started must close too
            self._thread.join(timeout=5)  # it does no I/O: it ends at once

    def poke(self) -> None:
        """Probe new backends now instead of at the next wake-up (after add-backend)."""
        self._wake.set()

    def probe_once(self, backend: Backend, settings: HealthCheckConfig) -> bool:
        """Probe in the calling thread and record; True if the verdict changed."""
        return self._record(backend, Probe(backend, settings).run(), settings)

    def _record(self, backend: Backend, result: ProbeResult, settings: HealthCheckConfig) -> bool:
        health = backend.health
        changed = health.record(result.passed, result.detail, self._clock())
        if changed:
            url = probe_url(backend, settings)
            seen = _what_came_back(result)
            if health.up:
                log.info("backend %s up: GET %s -> %s", backend.name, url, seen)
            else:
                log.warning(
                    "backend %s down: GET %s -> %s (%s in a row); %s",
                    backend.name, url, seen, _failures(health.fail_streak), hint(result, settings),
                )  # fmt: skip
            self._on_transition(backend)
        return changed

    # -- the scheduler: pyproxy-health ---------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a wake-up from now on is not lost
            settings = self._settings()
            backends = list(self._backends())
            if self._settings_for is not None:  # each pool's own health_check settings
                backends = [b for b in backends if self._settings_for(b).enabled]
            elif not settings.enabled:
                backends = []
            if not backends:
                self._wake.wait(IDLE_WAIT)
                continue
            wait = self._dispatch_due(backends, settings)
            self._wake.wait(min(wait, IDLE_WAIT))

    def _dispatch_due(self, backends: list[Backend], settings: HealthCheckConfig) -> float:
        """Hand every due backend to a worker, within the limits; return how long the
        scheduler may sleep. A backend held back by a limit needs no timer: the end of
        a probe frees a worker and wakes the scheduler."""
        now = self._clock()
        with self._lock:
            if self._stop.is_set():
                return 0.0
            live = set(backends)
            self._next_due = {b: t for b, t in self._next_due.items() if b in live}
            self._slow &= live
            slow_running = len(self._slow.intersection(self._running))
            waiting = [b for b in backends if b not in self._running]
            waiting.sort(key=self._due)  # the most overdue first
            sleep = IDLE_WAIT
            for backend in waiting:
                if self._due(backend) > now:
                    sleep = self._due(backend) - now  # the soonest one still to come
                    break
                if len(self._running) >= self._max_workers:
                    break
                if backend in self._slow:
                    if slow_running >= self._max_slow:
                        continue
                    slow_running += 1
                own = settings if self._settings_for is None else self._settings_for(backend)
                probe = Probe(backend, own)
                self._running[backend] = probe
                self._jobs.put(probe)
            self._start_workers(len(self._running))
        return sleep

    def _due(self, backend: Backend) -> float:
        """When `backend` is due; one never probed is the most overdue of all."""
        return self._next_due.get(backend, -math.inf)

    def _start_workers(self, needed: int) -> None:
        """Start workers up to `needed` (never more than max_workers); the lock is held."""
        while len(self._workers) < min(needed, self._max_workers):
            name = f"pyproxy-probe-{len(self._workers) + 1}"
            worker = threading.Thread(target=self._work, name=name, daemon=True)
            self._workers.append(worker)
            worker.start()

    # -- the workers: pyproxy-probe-N ----------------------------------------------

    def _work(self) -> None:
        while True:
            probe = self._jobs.get()
            if probe is None or self._stop.is_set():
                return
            try:
                result = probe.run()
                if not probe.aborted:
                    self._record(probe.backend, result, probe.settings)
            except Exception:
                log.exception("health probe of %s crashed", probe.backend.name)
                result = ProbeResult(False, "crashed")
            self._finished(probe, result)

    def _finished(self, probe: Probe, result: ProbeResult) -> None:
        backend = probe.backend
        jitter = self._rng.uniform(0.9, 1.1)
        with self._lock:
            del self._running[backend]
            self._next_due[backend] = self._clock() + probe.settings.interval * jitter
            if result.timed_out:
                self._slow.add(backend)
            else:
                self._slow.discard(backend)
        self._wake.set()


__all__ = ["HealthChecker", "check_backend", "hint"]
