"""Health checks: is a backend up, judged from its recent probe results.

`HealthStatus` is the pure part: it turns a stream of pass/fail probe results into
up / down, with HAProxy's "rise" (`healthy_threshold`) and "fall"
(`unhealthy_threshold`) streaks, so one lost probe does not flap a backend.
It performs no I/O and reads no clock: the prober passes the time of each result.

    unknown --first pass-------------------------> up
    unknown --unhealthy_threshold failures-------> down
    up      --unhealthy_threshold failures-------> down
    down    --healthy_threshold passes-----------> up

A pass resets the fail streak and a failure resets the pass streak.
"""

from __future__ import annotations

import threading


class HealthStatus:
    """HealthStatus: one backend's health verdict and the facts behind it. Thread-safe.

    `initially_up`: True for backends from the config file (they take traffic at
    once), False to start down, None for "unknown" (runtime-added backends get no
    traffic until their first passing probe). Thresholds below 1 act as 1.
    """

    def __init__(
        self, healthy_threshold: int, unhealthy_threshold: int, initially_up: bool | None
    ) -> None:
        self._lock = threading.Lock()  # guards every field below; never held across I/O
        self._healthy_threshold = max(1, healthy_threshold)
        self._unhealthy_threshold = max(1, unhealthy_threshold)
        self._up = initially_up  # None = unknown
        self._pass_streak = 0
        self._fail_streak = 0
        self._last_probe_at: float | None = None  # None = never probed
        self._last_result: str | None = None  # e.g. "200", "connect refused"
        self._changed_at: float | None = None  # time of the last transition; None = none yet
        self._transitions = 0  # up/down changes so far (shown on /admin/backends)

    def update_thresholds(self, healthy_threshold: int, unhealthy_threshold: int) -> None:
        """Apply reloaded thresholds; the verdict and streaks are kept.

        A streak already past a lowered threshold takes effect at the next result.
        """
        with self._lock:
            self._healthy_threshold = max(1, healthy_threshold)
            self._unhealthy_threshold = max(1, unhealthy_threshold)

    def record(self, passed: bool, detail: str, at: float) -> bool:
        """Record one probe result; True only on a real transition (log and count those).

        `detail` says what happened ("200", "timeout", "connect refused"); `at` is
        the prober's clock time of the result.
        """
        with self._lock:
            self._last_probe_at = at
            self._last_result = detail
            if passed:
                self._pass_streak += 1
                self._fail_streak = 0
                # From unknown one pass is enough: a backend added at runtime takes
                # traffic after its first passing probe; the healthy_threshold streak
                # is for a backend coming back from down.
                changes = self._up is None or (
                    self._up is False and self._pass_streak >= self._healthy_threshold
                )
                new_up = True
            else:
                self._fail_streak += 1
                self._pass_streak = 0
                changes = self._up is not False and self._fail_streak >= self._unhealthy_threshold
                new_up = False
            if not changes:
                return False
            self._up = new_up
            self._changed_at = at
            self._transitions += 1
            return True

    @property
    def up(self) -> bool:
        """The judgement selection uses: True only when known to be up (unknown is not).

        Read without the lock: it is one attribute load (atomic in CPython), and this
        runs for every backend on every request."""
        return self._up is True

    @property
    def state(self) -> str:
        """The verdict as a word: up, down, or unknown (added at runtime, never passed yet)."""
        with self._lock:
            return {True: "up", False: "down", None: "unknown"}[self._up]

    @property
    def pass_streak(self) -> int:
        """Consecutive passing probes up to now (0 after any failure)."""
        with self._lock:
            return self._pass_streak

    @property
    def fail_streak(self) -> int:
        """Consecutive failed probes up to now (0 after any pass)."""
        with self._lock:
            return self._fail_streak

    @property
    def last_probe_at(self) -> float | None:
        """Clock time of the last probe result; None if never probed."""
        with self._lock:
            return self._last_probe_at

    @property
    def last_result(self) -> str | None:
        """What the last probe saw ("200", "connect refused"); None if never probed."""
        with self._lock:
            return self._last_result

    @property
    def transitions(self) -> int:
        """How many times the verdict changed (unknown -> up counts as one)."""
        return self._transitions

    @property
    def changed_at(self) -> float | None:
        """Clock time of the last transition (for "down since ..."); None if none yet."""
        with self._lock:
            return self._changed_at
