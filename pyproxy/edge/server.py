"""EdgeServer: the proxy's client-facing HTTP/1.1 server, waitress made strict and deadline-aware.

waitress parses requests on one asyncore loop thread and runs the WSGI app on a pool of
worker threads. As an edge server facing untrusted clients it needs, on top of that:

- strict framing (StrictRequestParser, in parser.py): ambiguous requests are
  refused before the app runs;
- deadlines waitress does not have: a client must finish its header block within
  `limits.header_timeout` (slowloris), and a client that accepts no response bytes for
  `limits.send_timeout` is dropped, which frees the worker thread blocked writing to it;
- no `Server: waitress` / `Via: waitress` in responses (pyproxy adds its own Via);
- draining for graceful shutdown: `Connection: close` on every response;
- AbortResponse (pyproxy/wsgi.py), to cut a response short on purpose without a
  logged traceback.

The loop runs in whichever thread calls `serve_forever()`; deadlines are enforced on
that thread between two polls, the only moment a socket can be closed without racing
the poll's list of file descriptors.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge.parser import StrictRequestParser
from pyproxy.edge.tasks import EdgeErrorTask, EdgeTask
from pyproxy.wsgi import EdgeRefusal

__all__ = ["EdgeServer"]

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

    def handle_close(self) -> None:
        if self.reset_on_close:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        # handle_close() sets connected = False and notifies outbuf_lock, so a worker
        # blocked in write_soon() raises ClientDisconnected and goes back to the pool.
        super().handle_close()


class _EdgeWSGIServer(TcpWSGIServer):
    """waitress's listening socket plus the deadline checks it lacks."""

    channel_class = EdgeChannel
    draining = False
    on_refused: Callable[[EdgeRefusal], None] | None = None

    def __init__(self, application: Any, limits: LimitsConfig, **kw: Any) -> None:
        self.limits = limits
        self._trigger_lock = threading.Lock()  # guards the trigger's fd against use after close
        self._trigger_closed = False
        super().__init__(application, **kw)

    def pull_trigger(self) -> None:
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

    def enforce_deadlines(self) -> None:
        """Close connections that missed a deadline. Loop thread only, between polls."""
        now = time.time()
        send_timeout, header_timeout = self.limits.send_timeout, self.limits.header_timeout
        # waitress runs its idle check (channel_timeout) from the listening socket's
        # readable(), which stops being called once we stop accepting: run it here too.
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


class _NamedDispatcher(ThreadedTaskDispatcher):
    """waitress's worker pool, with threads named `<prefix>-N` instead of `waitress-N`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def start_new_thread(self, target: Callable[[int], None], thread_no: int) -> None:
        name = f"{self.prefix}-{thread_no}"
        threading.Thread(target=target, name=name, args=(thread_no,), daemon=True).start()


class EdgeServer:
    """One listening socket, its asyncore loop and its pool of `threads` worker threads.

    Binds in the constructor (port 0 = an ephemeral port; OSError if the port is taken).
    `limits` maps onto waitress where it can: max_request_body (413), max_request_header
    (431), client_idle_timeout, max_connections; header_timeout and send_timeout are
    enforced here. A timeout of 0 means no limit.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        host: str,
        port: int,
        *,
        threads: int,
        limits: LimitsConfig,
        name: str = "proxy",
    ) -> None:
        adj = Adjustments(
            host=host,
            port=port,
            threads=threads,
            ident="pyproxy",  # SERVER_SOFTWARE; never sent (see _EdgeHead)
            server_name=host,  # SERVER_NAME when a 1.0 request has no Host
            # waitress refuses at >= the size; the limits refuse only what is larger.
            max_request_body_size=limits.max_request_body + 1,
            max_request_header_size=limits.max_request_header + 1,
            # waitress counts its map, which also holds the listener and the trigger
            connection_limit=limits.max_connections + 2,
            # pyproxy decides itself which X-Forwarded-* to believe (trusted_proxies)
            clear_untrusted_proxy_headers=False,
        )
        # Output held for a slow client: waitress's default is 16 MiB per connection,
        # spooled to a temporary file. Beyond OUTPUT_BUFFER the worker's write waits
        # instead, so it stops reading from the backend (backpressure, as nginx's
        # proxy_buffers give), and limits.send_timeout bounds that wait.
        adj.outbuf_high_watermark = OUTPUT_BUFFER
        adj.outbuf_overflow = 2 * OUTPUT_BUFFER  # what fits under the mark stays in memory
        # Set after construction: waitress casts these to int, and passing send_bytes warns.
        adj.channel_timeout = limits.client_idle_timeout or float("inf")
        adj.cleanup_interval = 1
        # Hand every write to the socket at once: server-sent events and other small
        # streamed chunks must not wait for a buffer to fill (waitress's old default was
        # 18000 bytes; 3.0 defaults to 1 but deprecates the knob, so pin it here).
        adj.send_bytes = 1
        self._map: dict[int, Any] = {}
        self._dispatcher = _NamedDispatcher(f"pyproxy-{name}")
        try:
            self._server = _EdgeWSGIServer(
                app, limits, map=self._map, dispatcher=self._dispatcher, adj=adj,
                sockinfo=adj.listen[0],
            )  # fmt: skip
        except OSError as exc:
            wasyncore.close_all(self._map)  # the trigger and the unbound socket
            # Name the address, as asyncio's create_server() does: there are two listeners.
            raise OSError(exc.errno, f"{host}:{port}: {exc.strerror}") from exc
        self._dispatcher.set_thread_count(threads)
        server = self._server
        self.address: tuple[str, int] = (server.effective_host, int(server.effective_port))
        deadlines = [t for t in (limits.header_timeout, limits.send_timeout) if t > 0]
        self._tick = max(0.05, min([1.0] + [t / 4 for t in deadlines]))
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._loop_exited = threading.Event()
        self._loop_thread: int | None = None
        self._close_lock = threading.Lock()  # makes close() run once
        self._closed = False

    @property
    def draining(self) -> bool:
        """True: every response from now on carries `Connection: close`, and idle
        keep-alive connections are closed."""
        return bool(self._server.draining)

    @draining.setter
    def draining(self, value: bool) -> None:
        self._server.draining = value

    @property
    def on_refused(self) -> Callable[[EdgeRefusal], None] | None:
        """Called (in a worker thread) for each request refused before the app ran."""
        return self._server.on_refused

    @on_refused.setter
    def on_refused(self, report: Callable[[EdgeRefusal], None] | None) -> None:
        self._server.on_refused = report

    def open_connections(self) -> int:
        return len(self._server.active_channels)

    def buffered_output(self) -> int:
        """Response bytes held for clients that their sockets have not taken yet."""
        return sum(c.total_outbufs_len for c in list(self._server.active_channels.values()))

    def busy_connections(self) -> int:
        """Connections with a request being read or served, or a response not yet fully
        written to the client. An app can be done with a response while waitress still
        holds megabytes of it for a slow reader: a drain must wait for those too."""
        channels = list(self._server.active_channels.values())
        return sum(
            1
            for channel in channels
            if channel.requests or channel.total_outbufs_len or channel.request is not None
        )

    def serve_forever(self) -> None:
        """Run the loop in this thread until close()."""
        self._loop_thread = threading.get_ident()
        try:
            next_check = 0.0
            while not self._stopping.is_set():
                # poll(), not select(): select() cannot watch fds above 1023.
                wasyncore.poll2(self._tick, self._map)
                while not self._calls.empty():
                    self._calls.get()()
                now = time.monotonic()
                if now >= next_check:
                    # O(connections): once a tick, not on every turn of a busy loop
                    # (with 1,000 idle clients that scan dominated the loop).
                    self._server.enforce_deadlines()
                    next_check = now + self._tick
        finally:
            self._loop_exited.set()

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already open keep being served."""
        self._on_loop(self._server.close_listener)

    def close(self) -> None:
        """Stop the loop, then close every connection and stop the workers.

        Returns at once when the loop is idle; waits up to 5 s for a loop starved of CPU
        and 1 s for busy workers."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        if self._loop_thread not in (None, threading.get_ident()):
            self._server.pull_trigger()
            # The trigger wakes it at once. Sockets closed while it still runs could be
            # closed under its poll or its walk over the channels (a "dictionary changed
            # size" error would kill the thread), so give a starved loop time to exit.
            self._loop_exited.wait(5.0)
        for channel in list(self._server.active_channels.values()):
            channel.handle_close()  # releases a worker blocked writing to it
        self._server.close_listener()
        self._dispatcher.shutdown(cancel_pending=True, timeout=1.0)
        self._server.close_trigger()
        self._map.clear()

    def _on_loop(self, call: Callable[[], None]) -> None:
        """Run `call` on the loop thread between polls (now, if no loop is running)."""
        if self._loop_thread in (None, threading.get_ident()) or self._loop_exited.is_set():
            call()
            return
        done = threading.Event()

        def call_then_signal() -> None:
            call()
            done.set()

        self._calls.put(call_then_signal)
        self._server.pull_trigger()
        done.wait(2.0)
