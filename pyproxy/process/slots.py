"""One worker's place in the master (process/master.py): starting a worker process in
it, hearing that the worker serves, and when to replace one that exited.

A worker is `python -m pyproxy.process.worker LISTEN_FD READY_FD ALIVE_FD CONFIG`: a
new interpreter that inherits its slot's listening socket (fork then exec; see
master.py for why not fork alone). It reads what it serves, pickled, on its stdin,
and writes "admin PORT" on READY_FD once it serves. A worker that exits is replaced
after 1 s, doubling to 30 s while replacements keep dying young (so a worker that
cannot start does not spin the CPU); one that lived `LIVED_LONG` starts over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import IO

log = logging.getLogger(__name__)

FIRST_BACKOFF, MAX_BACKOFF = 1.0, 30.0
LIVED_LONG = 30.0  # a worker that ran this long was healthy: the backoff starts over
# systemd's socket is the master's; an operator's prometheus_multiproc_dir (the old
# lower-case name, still read) must not point the workers elsewhere than the master reads.
NOT_FOR_WORKERS = frozenset({"NOTIFY_SOCKET", "prometheus_multiproc_dir"})


def backoff(failures: int) -> float:
    """Seconds before replacing a worker, after `failures` quick deaths in a row."""
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, failures))


class Slot:
    """One worker's place: the process in it now and its restart history."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0  # its admin API, once it said it serves
        self.ready = threading.Event()
        self.started_at = 0.0
        self.failures = 0
        self.restart_at: float | None = None

    def start(
        self, *, listen_fd: int, alive_fd: int, config_file: str, metrics_dir: str,
        served: bytes, now: float,
    ) -> None:  # fmt: skip
        """Start a worker here, serving `listen_fd`, told `served` (pickled) on stdin.
        Its stdout (the access log) and stderr are the master's."""
        said, say = os.pipe()  # the worker says on this pipe when it serves
        env = {**{k: v for k, v in os.environ.items() if k not in NOT_FOR_WORKERS},
               "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
               "PYPROXY_LOG_LEVEL": logging.getLevelName(log.getEffectiveLevel())}  # fmt: skip
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "pyproxy.process.worker", str(listen_fd), str(say),
                 str(alive_fd), config_file],
                pass_fds=(listen_fd, say, alive_fd), stdin=subprocess.PIPE, env=env,
            )  # fmt: skip
        except BaseException:
            os.close(said)
            raise
        finally:
            os.close(say)
        assert process.stdin is not None
        with contextlib.suppress(OSError):  # a worker dead at once is seen by exited()
            process.stdin.write(served)
            process.stdin.close()
        self.process, self.port, self.started_at = process, 0, now
        self.ready.clear()
        threading.Thread(target=self._await_port, args=(process, os.fdopen(said, "rb")),
                         name=f"pyproxy-worker-{process.pid}", daemon=True).start()  # fmt: skip
        log.info("worker %d started", process.pid)

    def _await_port(self, process: subprocess.Popen[bytes], pipe: IO[bytes]) -> None:
        """Read the worker's "admin PORT" line: from then on it serves and can be asked."""
        with pipe:
            line = pipe.readline().decode(errors="replace").split()
        if len(line) == 2 and line[0] == "admin" and line[1].isdigit() and self.process is process:
            self.port = int(line[1])
            self.ready.set()

    def exited(self, now: float) -> bool:
        """True once, when the worker here has exited: its replacement is scheduled
        (`restart_at`) and the exit logged."""
        process = self.process
        if process is None or self.restart_at is not None or process.poll() is None:
            return False
        self.failures = 0 if now - self.started_at >= LIVED_LONG else self.failures + 1
        self.restart_at = now + backoff(self.failures - 1)
        log.error("worker %d exited (%s); a new one in %gs", process.pid,
                  _exit_reason(process.returncode), self.restart_at - now)  # fmt: skip
        return True

    def due(self, now: float) -> bool:
        """True once, when this slot's replacement is due: the caller starts it."""
        if self.restart_at is None or now < self.restart_at:
            return False
        self.restart_at = None
        return True

    def running(self) -> subprocess.Popen[bytes] | None:
        """The worker process here, unless it exited and awaits its replacement."""
        return self.process if self.restart_at is None else None


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
