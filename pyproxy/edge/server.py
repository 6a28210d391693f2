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

The loop runs in whichever thread calls `serve_forever()`, one turn at a time through
poller.py (a poll set kept for the life of the loop: idle connections cost nothing per
turn); the connections and the deadlines are in listener.py (`EdgeChannel`,
`EdgeListener`), enforced on that thread between two polls.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.task import ThreadedTaskDispatcher

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge.listener import OUTPUT_BUFFER, EdgeListener
from pyproxy.edge.poller import Poller, SocketMap
from pyproxy.wsgi import EdgeRefusal

__all__ = ["EdgeServer"]

logger = logging.getLogger(__name__)


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
        sock: socket.socket | None = None,
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
        self._map = SocketMap()
        self._dispatcher = _NamedDispatcher(f"pyproxy-{name}")
        # `sock`: a socket already bound (by a master process, inherited by its
        # workers), served as waitress's create_server(sockets=[...]) serves one.
        inherited: dict[str, Any] = {"sockinfo": adj.listen[0]}
        if sock is not None:
            info = (sock.family, sock.type, sock.proto, sock.getsockname())
            inherited = {"_sock": sock, "bind_socket": False, "sockinfo": info}
        try:
            self._server = EdgeListener(
                app, limits, map=self._map, dispatcher=self._dispatcher, adj=adj, **inherited
            )
        except OSError as exc:
            wasyncore.close_all(self._map)  # the trigger and the unbound socket
            # Name the address, as asyncio's create_server() does: there are two listeners.
            raise OSError(exc.errno, f"{host}:{port}: {exc.strerror}") from exc
        self._dispatcher.set_thread_count(threads)
        server = self._server
        self.address: tuple[str, int] = (server.effective_host, int(server.effective_port))
        deadlines = [t for t in (limits.header_timeout, limits.send_timeout) if t > 0]
        self._tick = max(0.05, min([1.0] + [t / 4 for t in deadlines]))
        self._poller = Poller(self._map)
        server.poller = self._poller
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
                # Not wasyncore.poll2, which asks every connection for its interest on
                # every turn (see poller.py), nor select(), which cannot watch fds above 1023.
                self._poller.poll(self._tick)
                while not self._calls.empty():
                    self._calls.get()()
                now = time.monotonic()
                if now >= next_check:
                    # O(connections): once a tick, not on every turn of a busy loop
                    # (with 1,000 idle clients that scan dominated the loop).
                    self._server.enforce_deadlines()
                    next_check = now + self._tick
        finally:
            self._poller.close()
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
            self._server.wake()
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
        if self._loop_thread is None:
            self._poller.close()  # else the loop closes it as it exits

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
        self._server.wake()
        done.wait(2.0)
