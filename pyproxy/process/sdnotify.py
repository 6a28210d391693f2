"""Tell systemd how the service is doing: the sd_notify protocol, without libsystemd.

systemd starts a `Type=notify` unit with `$NOTIFY_SOCKET` naming a Unix datagram
socket: a filesystem path, or `@name` for a Linux abstract socket (a leading NUL byte
on the wire). The service sends newline-separated `KEY=VALUE` lines in one datagram
(sd_notify(3)):

    READY=1                       both listeners accept connections: "started"
    RELOADING=1 + MONOTONIC_USEC  a reload began (systemd >= 253 wants the timestamp
                                  for Type=notify-reload, to match it to its SIGHUP)
    READY=1                       the reload is over, whether it applied or not
    STOPPING=1                    the graceful shutdown began

Without `$NOTIFY_SOCKET` (not under systemd, or another Type=) every call does
nothing. A socket that cannot be reached is logged once at DEBUG and then ignored:
notification is a courtesy to the supervisor, never a reason to stop serving.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | None:
    """`$NOTIFY_SOCKET` as `socket.connect` takes it; None if it names no socket.

    `@name` is an abstract socket: Python writes those with a leading NUL byte.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # systemd also accepts vsock:..., which pyproxy does not speak


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET` (read from `env`, default os.environ)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self._failed_once = False
        self._lock = threading.Lock()  # guards _failed_once; held only around one sendto

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> None:
        self.send("READY=1")

    def reloading(self) -> None:
        # CLOCK_MONOTONIC in microseconds, as systemd's own clock reads it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def send(self, message: str) -> bool:
        """Send one datagram; True if it left. Never raises for an unreachable socket."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
            return True
        except OSError as error:
            with self._lock:
                first, self._failed_once = not self._failed_once, True
            if first:
                log.debug("NOTIFY_SOCKET %r unreachable (%s); not notifying", self.address, error)
            return False
