"""The edge server's event loop turn: a persistent poll set, so idle connections cost nothing.

waitress's `wasyncore.poll2` builds a new poll set on every turn of the loop: it asks
every socket in the map `readable()` and `writable()` and registers each again. With
1,000 idle keep-alive clients that is 2,000 Python calls and 1,000 registrations per
turn, and a loaded server turns several times per request (measured: 10x the CPU per
request). An idle connection's answer cannot change until something happens to it, so
`Poller` keeps one poll set for the life of the loop (epoll on Linux, as nginx and
HAProxy use; poll() elsewhere: both watch any fd number, unlike select()) and asks a
socket again only when its interest may have changed:

- it was added to or removed from the map (`SocketMap` records both);
- it had an event this turn (its handler read, wrote or closed);
- it is *busy*: a worker thread may change its buffers or requests at any moment
  (waitress then pulls the trigger, which wakes the loop), or its readable() has side
  effects (the listening socket's connection limit);
- the loop touched it between turns (`SocketMap.touch`, e.g. the idle-timeout check).

A connection is *quiet*, asked nothing per turn, when no request is being received or
served on it, no output is pending and it is not closing: only the client (an event)
or the loop itself can change that. Events are handled by waitress's own
`wasyncore.readwrite`, so channel semantics (close on hang-up, ClientDisconnected for
a worker writing to a closed connection) are waitress's.
"""

from __future__ import annotations

import collections
import contextlib
import select
from typing import Any

from waitress import wasyncore
from waitress.channel import HTTPChannel

__all__ = ["Poller", "SocketMap"]

# epoll's EPOLLIN/PRI/OUT/ERR/HUP have poll()'s values on Linux (one kernel ABI), so
# waitress's readwrite(), which tests select.POLL*, reads epoll's events unchanged.
_READ = select.POLLIN | select.POLLPRI
_WRITE = select.POLLOUT


class SocketMap(dict[int, Any]):
    """waitress's socket map (fd -> dispatcher) that remembers which fds came and went.

    wasyncore adds and removes sockets with `map[fd] = obj` and `del map[fd]`, from the
    loop thread and, rarely, from a worker; a deque takes appends from any thread."""

    def __init__(self) -> None:
        super().__init__()
        self.changed: collections.deque[int] = collections.deque()

    def __setitem__(self, fd: int, obj: Any) -> None:
        super().__setitem__(fd, obj)
        self.changed.append(fd)

    def __delitem__(self, fd: int) -> None:
        super().__delitem__(fd)
        self.changed.append(fd)

    def touch(self, fd: int) -> None:
        """Ask the poller to re-read this socket's interest before its next wait."""
        self.changed.append(fd)


class Poller:
    """One poll set for the life of an event loop. Loop thread only, except close()."""

    def __init__(self, socket_map: SocketMap) -> None:
        self._map = socket_map
        self._epoll = hasattr(select, "epoll")
        self._poll: Any = select.epoll() if self._epoll else select.poll()
        self._registered: dict[int, tuple[Any, int]] = {}  # fd -> (dispatcher, events)
        self._busy: set[int] = set()  # fds asked again on every turn
        self._fired: list[int] = []  # fds that had an event on the last turn
        # True from the start of a turn's refresh until its wait returns. A worker that
        # changes a busy connection in that window may have changed it after the refresh
        # read it, so the loop must be woken (the trigger) to read it again. Outside the
        # window the loop is handling events and has yet to refresh: it will read the
        # change before it waits, unwoken (see EdgeListener.pull_trigger).
        self.watching = False
        for fd in socket_map:  # sockets created before the poller (listener, trigger)
            socket_map.touch(fd)

    def poll(self, timeout: float) -> None:
        """One turn: bring the poll set up to date, wait at most `timeout` seconds,
        and dispatch the events (as wasyncore.poll2 does)."""
        self.watching = True  # before the refresh reads any connection
        self._refresh()
        events = self._poll.poll(timeout if self._epoll else int(timeout * 1000))
        self.watching = False
        self._fired = [fd for fd, _ in events]
        for fd, flags in events:
            obj = self._map.get(fd)
            if obj is not None:
                wasyncore.readwrite(obj, flags)

    def close(self) -> None:
        if self._epoll:
            self._poll.close()

    def _refresh(self) -> None:
        fds = set(self._busy)
        fds.update(self._fired)
        changed = self._map.changed
        while changed:
            fds.add(changed.popleft())
        for fd in fds:
            self._update(fd)

    def _update(self, fd: int) -> None:
        obj = self._map.get(fd)
        if obj is None or _quiet(obj):
            self._busy.discard(fd)
        else:
            self._busy.add(fd)
        events = 0 if obj is None else _interest(obj)
        old = self._registered.get(fd)
        if old is not None and old[0] is obj and old[1] == events:
            return
        if events == 0:
            # Not polled at all, as in poll2: a channel whose request is being served
            # is not read, and its hang-up is noticed when the worker writes.
            if self._registered.pop(fd, None) is not None:
                with contextlib.suppress(OSError, KeyError):  # gone with its closed socket
                    self._poll.unregister(fd)
            return
        self._registered[fd] = (obj, events)
        # A channel leaves the poll set while its request is served and comes back after
        # it: register it directly rather than try modify() and fail (a syscall and an
        # exception a request, measured with scripts/profile_proxy.py).
        if old is None:
            try:
                self._poll.register(fd, events)
            except FileExistsError:  # select.poll() never says so; epoll might
                self._poll.modify(fd, events)
            return
        try:
            self._poll.modify(fd, events)
        except FileNotFoundError:  # a new socket with a closed one's number
            self._poll.register(fd, events)


def _interest(obj: Any) -> int:
    events = _READ if obj.readable() else 0
    if obj.writable() and not obj.accepting:  # accepting sockets are never writable
        events |= _WRITE
    return events


def _quiet(obj: Any) -> bool:
    """Whether only an event on this socket, or the loop itself, can change its interest."""
    return (
        isinstance(obj, HTTPChannel)
        and not obj.requests
        and obj.request is None
        and not obj.total_outbufs_len
        and not obj.will_close
        and not obj.close_when_flushed
    )
