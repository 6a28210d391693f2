"""ConfigWatcher: reload the config when its file changes.

Editors save by writing a temp file and renaming it over the original; Kubernetes
updates a mounted ConfigMap by swapping a `..data` symlink. Both replace the file
rather than write into it, so a watch on the file itself goes deaf after the first
change. We watch the *directory*, react to any event there, wait until events stop
for `DEBOUNCE` seconds (a save is several events), and reload only when the bytes
of the file differ from the bytes the last reload read, whoever triggered it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

DEBOUNCE = 0.25  # seconds of quiet after the last event before reading the file


def file_digest(path: str) -> str | None:
    """SHA-256 of the file's bytes (following symlinks), or None if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


class _StopRace(logging.Filter):
    """watchdog's inotify emitter logs an ERROR when stop() lands while it is reading
    ("queue_events() called when the thread is inactive"): a harmless race inside
    watchdog at shutdown that an operator should not see as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


_STOP_RACE = _StopRace()


class _AnyEvent(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]) -> None:
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):  # reads are not changes
            self._poke()


class WatchedFile(Protocol):
    """The file reloads read (runtime.swap.FileSource)."""

    path: str
    digest: str | None  # of the bytes the last reload read (valid or not)


class ConfigWatcher:
    """Calls `reload("file change")` after `source.path` changed and settled, unless
    the last reload (by any trigger) already read these bytes.

    `reload` is the service's one reload entry: it reads the file, records its digest
    in `source`, validates, applies or refuses, and logs. The digest is recorded even
    for an invalid file, so the same broken bytes are not re-parsed on every event,
    but fixing the file triggers a reload.
    """

    def __init__(self, source: WatchedFile, reload: Callable[[str], object]) -> None:
        self.source = source
        self.path = os.path.abspath(source.path)
        self._reload = reload
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._last_event = 0.0
        emitter_log = logging.getLogger("watchdog.observers.inotify")
        if _STOP_RACE not in emitter_log.filters:
            emitter_log.addFilter(_STOP_RACE)
        self._observer = Observer()
        self._observer.name = "pyproxy-watchdog"
        self._observer.daemon = True
        self._observer.schedule(_AnyEvent(self._poke), os.path.dirname(self.path) or ".")
        self._thread = threading.Thread(target=self._run, name="pyproxy-reload", daemon=True)

    def start(self) -> None:
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        self._observer.stop()
        self._observer.join(timeout=2)
        self._thread.join(timeout=2)

    def _poke(self) -> None:
        self._last_event = time.monotonic()
        self._changed.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.is_set():
                return
            # Debounce: wait until no event arrived for DEBOUNCE seconds.
            while not self._stop.is_set():
                quiet = time.monotonic() - self._last_event
                if quiet >= DEBOUNCE:
                    break
                self._stop.wait(DEBOUNCE - quiet)
            self._changed.clear()
            # A deleted or unreadable file hashes to None: the first reload of it fails
            # and records None, and the next one waits until the file is back.
            if file_digest(self.path) == self.source.digest:
                continue  # touched, rewritten identically, or already reloaded
            # Another trigger may read these bytes between this check and the reload;
            # this reload then finds nothing new and logs "no changes": harmless.
            try:
                self._reload("file change")
            except Exception:  # the watcher must outlive any bug in a reload
                log.exception("reload after a file change failed")
