"""AccessLog: one line per request, written off the request path.

A worker thread must not wait on a disk or a slow terminal to finish a request, so
`write()` only appends the request's fields to a deque; the `pyproxy-accesslog`
thread wakes every `FLUSH_INTERVAL`, formats what has gathered and writes it in one
call. Nobody is woken per request: a queue whose `put()` woke the writer for every
line cost a quarter of the proxy's CPU under load (docs/performance.md). If lines
back up past `MAX_QUEUE` (the disk is stuck), they are dropped and counted rather
than letting memory grow, and the log says so when it catches up.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import sys
import threading
import time
from json.encoder import encode_basestring_ascii
from typing import IO, Any, Protocol

from pyproxy.config.schema import AccessLogConfig

log = logging.getLogger(__name__)

MAX_QUEUE = 100_000
FLUSH_INTERVAL = 0.1  # seconds a line may wait before it is written


class LoggedRequest(Protocol):
    """What the client asked for (pyproxy.proxy.request.Request)."""

    @property
    def protocol(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def request_id(self) -> str: ...
    @property
    def referer(self) -> str: ...
    @property
    def user_agent(self) -> str: ...


class LoggedOutcome(Protocol):
    """What became of it (pyproxy.proxy.request.Outcome)."""

    upstream_seconds: float | None
    status: int
    bytes_sent: int
    backend_name: str
    attempts: int
    detail: str


# What a client could use to end a field or a line, or to talk to a terminal: C0
# controls, `"` and `\\` (the text format's quote and escape), DEL, and everything
# beyond ASCII (C1 controls such as U+0085, a line break to str.splitlines, and
# U+009B, a CSI to some terminals, arrive as obs-text bytes 0x80-0x9f).
_UNSAFE = re.compile(r'[\x00-\x1f"\\\x7f-\U0010ffff]')


def _hex(match: re.Match[str]) -> str:
    char = match.group()
    # WSGI strings are latin-1, so a code point <= 0xff is the byte the client sent.
    data = char.encode("latin-1") if ord(char) <= 0xFF else char.encode("utf-8")
    return "".join(f"\\x{byte:02X}" for byte in data)


def escape(value: str) -> str:
    """`value` with every unsafe character as `\\xNN`, as nginx writes its access log
    (ngx_http_log_escape, ngx_http_log_module.c): one request, one ASCII line."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value  # the usual case, checked by four C loops instead of a regex
    return _UNSAFE.sub(_hex, value)


def format_text(fields: dict[str, Any]) -> str:
    """Apache combined log format, then pyproxy's fields as key=value, escaped."""
    stamp = _clf_second(int(fields["time"]))
    request_line = escape(f"{fields['method']} {fields['target']} {fields['protocol']}")
    return (
        f'{escape(fields["client"]) or "-"} - - [{stamp}] "{request_line}" {fields["status"]} '
        f"{fields['bytes']} {_quoted(fields['referer'])} {_quoted(fields['user_agent'])} "
        f"backend={escape(fields['backend']) or '-'} attempts={fields['attempts']} "
        f"duration={fields['duration']:.6f} upstream_time={_seconds(fields['upstream_time'])} "
        f"request_id={escape(fields['request_id'])}"
        + (f" detail={_quoted(fields['detail'])}" if fields["detail"] else "")
    )


def _quoted(value: str) -> str:
    return '"' + (escape(value) or "-") + '"'


@functools.lru_cache(maxsize=4)
def _clf_second(second: int) -> str:
    """`second` (Unix time) in the common log format's UTC timestamp. Lines written
    within a second share it: strftime runs once per second, not once per line."""
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def format_json(fields: dict[str, Any]) -> str:
    """One JSON object per line, the fields in `AccessLog.write`'s order.

    Written out rather than through json.dumps (3.3 us a line instead of 7.6, timeit;
    the same text, checked against json.dumps on 20,000 random lines): each string
    goes through the json module's own escaper, which escapes every control
    character, `"` and `\\`, and everything beyond ASCII as \\uXXXX, as json.dumps
    does with ensure_ascii; numbers are written as json.dumps writes them (durations
    are finite: clock differences)."""
    esc = encode_basestring_ascii
    stamp, upstream = fields["time"], fields["upstream_time"]
    return (
        f'{{"time":"{_iso_second(int(stamp))}.{int(stamp % 1 * 1000):03d}Z"'
        f',"client":{esc(fields["client"])},"method":{esc(fields["method"])}'
        f',"target":{esc(fields["target"])},"protocol":{esc(fields["protocol"])}'
        f',"status":{fields["status"]:d},"bytes":{fields["bytes"]:d}'
        f',"duration":{round(fields["duration"], 6)!r}'
        f',"upstream_time":{"null" if upstream is None else repr(round(upstream, 6))}'
        f',"backend":{esc(fields["backend"])},"attempts":{fields["attempts"]:d}'
        f',"request_id":{esc(fields["request_id"])},"referer":{esc(fields["referer"])}'
        f',"user_agent":{esc(fields["user_agent"])},"detail":{esc(fields["detail"])}}}'
    )


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    """`second` (Unix time) as ISO 8601 UTC to the second: the lines written within a
    second share it, so strftime runs once per second, not once per line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class AccessLog:
    """Writes access log lines to `settings.path` ("-" = stdout) in a thread of its own."""

    def __init__(self, settings: AccessLogConfig, stream: IO[str] | None = None) -> None:
        self.format = format_json if settings.format == "json" else format_text
        self._owns_stream = stream is None and settings.path != "-"
        self._path = settings.path
        self._reopen = False  # set by reopen(); the writer thread acts on it
        if stream is not None:
            self._stream = stream
        elif settings.path == "-":
            self._stream = sys.stdout
        else:
            self._stream = open(settings.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        # deque.append/popleft are atomic in CPython: the hot path takes no lock.
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._stop = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="pyproxy-accesslog", daemon=True)
        self._thread.start()

    def write(self, request: LoggedRequest, outcome: LoggedOutcome, now: float) -> None:
        """Queue one line; cheap enough for the hot path (no formatting, no I/O)."""
        if len(self._pending) >= MAX_QUEUE:
            self.dropped += 1
            return
        self._pending.append(
            {
                "time": time.time(),
                "client": request.client or request.peer,
                "method": request.method,
                "target": request.target,
                "protocol": request.protocol,
                "status": outcome.status,
                "bytes": outcome.bytes_sent,
                "duration": now - request.started,
                "upstream_time": outcome.upstream_seconds,
                "backend": outcome.backend_name,
                "attempts": outcome.attempts,
                "request_id": request.request_id,
                "referer": request.referer,
                "user_agent": request.user_agent,
                "detail": outcome.detail,
            }
        )

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self._write_pending()
        self._write_pending()  # what arrived before close()

    def _write_pending(self) -> None:
        pending = self._pending
        while pending or self.dropped:
            lines: list[str] = []
            while pending and len(lines) < 1024:
                lines.append(self.format(pending.popleft()))
            self._emit(lines)

    def reopen(self) -> None:
        """Reopen the file before the next write (SIGHUP, after logrotate moved it), as
        nginx does on USR1. The writer thread does it, so no line is half-written."""
        self._reopen = self._owns_stream

    def _emit(self, lines: list[str]) -> None:
        if self._reopen:
            self._reopen = False
            try:
                fresh = open(self._path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as exc:
                log.error("access log %s not reopened: %s", self._path, exc)
            else:
                self._stream.close()
                self._stream = fresh
        dropped, self.dropped = self.dropped, 0
        if dropped:
            # Said in the log itself, where whoever reads it will notice the gap.
            log.warning("access log: %d line(s) dropped, the writer could not keep up", dropped)
        if not lines:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:
            log.error("access log write failed: %s", exc)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)
        if self._owns_stream:
            self._stream.close()
