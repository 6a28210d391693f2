"""One client connection and the listening socket: waitress's, with the deadlines it lacks.

`EdgeChannel` is one connection: waitress's channel with the strict parser, pyproxy's
tasks, and a way to end with a reset. `EdgeListener` is the listening socket that
owns the channels; `enforce_deadlines()` runs on the loop thread between two polls,
the only moment a socket can be closed without racing the poll's list of file
descriptors. The deadlines: a client must finish its header block within
`limits.header_timeout` (slowloris: 408, then close), and a client that accepts no
response bytes for `limits.send_timeout` is dropped with a reset, which frees the
worker thread blocked writing to it. While draining, idle keep-alive connections are
closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge.parser import StrictRequestParser
from pyproxy.edge.poller import Poller
from pyproxy.edge.tasks import EdgeErrorTask, EdgeTask
from pyproxy.wsgi import EdgeRefusal

logger = logging.getLogger(__name__)

# SO_LINGER on with a zero timeout: close() sends RST and drops the unsent bytes the
# kernel still holds for the client (nginx's `reset_timedout_connection`).
_LINGER_RESET = struct.pack("ii", 1, 0)
# Response bytes held per connection for a client slower than its backend (plus one
# relay chunk: the write that crosses the mark is taken, the next one waits).
OUTPUT_BUFFER = 1024 * 1024


class EdgeChannel(HTTPChannel):
    """One client connection."""

    parser_class = StrictRequestParser
    task_class = EdgeTask
    error_task_class = EdgeErrorTask
    responses = 0  # requests answered on this connection (a draining server closes it when idle)
    reset_on_close = False  # end with RST, not FIN (see EdgeTask for when)

    def service(self) -> None:
        super().service()
        self.responses += 1

    def write_soon(self, data: Any) -> int:
        """waitress's write_soon, with a direct send when nothing is waiting to go out.

        waitress appends every write to the output buffer, then sends from the buffer:
        for a response that the socket takes whole (nearly all of them), a pass through
        OverflowableBuffer (a copy into it past 8 KiB, then out) and _flush_some's loop
        (measured: write_soon 121 -> 62 us a request under cProfile). With nothing
        pending, the bytes go straight to the socket; whatever it does not take goes
        to waitress's buffer as before. Held under outbuf_lock, as waitress's writes.
        """
        if type(data) is bytes and data and self.connected and not self.total_outbufs_len:
            with self.outbuf_lock:
                if self.connected and not self.total_outbufs_len:
                    try:
                        sent = self.send(data, do_close=False)
                    except OSError:
                        sent = 0  # waitress's flush meets it again and handles it
                    if sent:
                        self.last_activity = time.time()  # the send deadline's clock
                    if sent == len(data):
                        return sent
                    if sent:
                        return sent + int(super().write_soon(data[sent:]))
        return int(super().write_soon(data))

    def handle_close(self) -> None:
        if self.reset_on_close:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        # handle_close() sets connected = False and notifies outbuf_lock, so a worker
        # blocked in write_soon() raises ClientDisconnected and goes back to the pool.
        super().handle_close()


class EdgeListener(TcpWSGIServer):
    """waitress's listening socket plus the deadline checks it lacks."""

    channel_class = EdgeChannel
    draining = False
    # waitress runs its idle check (maintenance, O(connections)) from this socket's
    # readable(); enforce_deadlines() runs it once per tick instead, so never from here:
    # the poller asks the listener readable() on every turn.
    next_channel_cleanup = float("inf")
    on_refused: Callable[[EdgeRefusal], None] | None = None
    poller: Poller | None = None  # the loop's, once it has one (see pull_trigger)

    def __init__(self, application: Any, limits: LimitsConfig, **kw: Any) -> None:
        self.limits = limits
        self._trigger_lock = threading.Lock()  # guards the trigger's fd against use after close
        self._trigger_closed = False
        super().__init__(application, **kw)

    def pull_trigger(self) -> None:
        """Wake the loop to read a connection's interest again, if it would miss it.

        waitress's channels call this from worker threads after changing a connection
        that is being served: at the end of every request (it may now be read again),
        and when output is left for the loop to send. A served connection is busy for
        the poller, read again before every wait; only a loop already in its
        refresh-and-wait window can miss the change (Poller.watching). Outside it, the
        os.write() to the trigger and the extra turn it causes are skipped: under load
        the loop is mostly handling events, and this was one syscall per request.
        """
        poller = self.poller
        if poller is not None and not poller.watching:
            return
        self.wake()

    def wake(self) -> None:
        """Wake the loop now, whatever it is doing (for calls queued to it, or a stop)."""
        # waitress's trigger writes to its fd number even after close(); a worker still in
        # the app could then write into whatever file the OS gave that number next.
        with self._trigger_lock:
            if not self._trigger_closed:
                self.trigger.pull_trigger()

    def close_trigger(self) -> None:
        with self._trigger_lock:
            self._trigger_closed = True
            self.trigger.close()

    def close_listener(self) -> None:
        """Stop accepting; unlike BaseWSGIServer.close(), keep the trigger the channels use."""
        if self.socket is not None:
            wasyncore.dispatcher.close(self)

    def maintenance(self, now: float) -> None:
        """waitress's idle check (channel_timeout), telling the poller about each channel
        it closes: an idle channel's interest is otherwise asked only when it has an event."""
        cutoff = now - self.adj.channel_timeout
        for fd, channel in list(self.active_channels.items()):
            if not channel.requests and channel.last_activity < cutoff:
                channel.will_close = True
                self._map.touch(fd)

    def enforce_deadlines(self) -> None:
        """Close connections that missed a deadline. Loop thread only, between polls."""
        now = time.time()
        send_timeout, header_timeout = self.limits.send_timeout, self.limits.header_timeout
        # The idle check (channel_timeout) runs here, never from the listener's
        # readable(), which is not called at all once we stop accepting.
        self.maintenance(now)
        for channel in list(self.active_channels.values()):
            if _send_stalled(channel, send_timeout, now):
                logger.info("%s read nothing for %gs: dropped", channel.addr[0], send_timeout)
                _reset(channel)
            elif _header_late(channel, header_timeout):
                logger.info(
                    "%s sent no full header in %gs: closed", channel.addr[0], header_timeout
                )
                _send_408(channel, header_timeout)
            elif self.draining and channel.responses and _is_idle(channel):
                channel.handle_close()  # an idle keep-alive connection: nothing is lost


def _send_stalled(channel: EdgeChannel, timeout: float, now: float) -> bool:
    # waitress stamps last_activity (with time.time()) whenever the socket accepts output;
    # while output is pending the channel does not read, so nothing else stamps it.
    return bool(channel.total_outbufs_len) and 0 < timeout < now - channel.last_activity


def _header_late(channel: EdgeChannel, timeout: float) -> bool:
    request = channel.request  # the request being received, if any
    return (
        not channel.requests  # one in progress stops waitress reading: the client is not late
        and request is not None
        and not request.headers_finished
        and 0 < timeout < time.monotonic() - request.started
    )


def _is_idle(channel: EdgeChannel) -> bool:
    return not channel.requests and channel.request is None and not channel.total_outbufs_len


def _reset(channel: EdgeChannel) -> None:
    channel.reset_on_close = True
    channel.handle_close()


def _send_408(channel: EdgeChannel, timeout: float) -> None:
    body = f"408 Request Timeout: request header not complete within {timeout:g}s".encode()
    head = "HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with contextlib.suppress(OSError):  # best effort: the socket is non-blocking
        channel.socket.send(head.encode() + body)
    channel.handle_close()
