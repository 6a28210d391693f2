"""Which addresses a backend added through the admin API may point at.

An admin token is a powerful thing, but it should not turn pyproxy into a way to
reach what the network hides: cloud metadata services live on link-local addresses
(169.254.169.254, fd00:ec2::254 is reached through fe80::/10 routes), "unspecified"
addresses (0.0.0.0, ::) mean "this host" to many stacks, and a backend pointing at
pyproxy's own listeners is a loop (or, for the admin listener, a way to publish the
admin API on the proxy port).

An address can be spelled many ways (IPv4 inside IPv6, the IPv4 spellings inet_aton
accepts, zone ids): addresses.py sees through them, so the check judges what the
kernel will connect to, not what the text looks like.

The check runs three times: when `POST /admin/add-backend` is asked (`refuse_backend_url`),
when backends are restored from `admin.state_file` at start (`keep_allowed`, called
from runtime/state_file.py: a tampered file must not add a metadata backend), and
each time a connection to an admin-added backend is made (`resolve_allowed`, called
from connection.py): DNS can answer differently after the admin check (DNS rebinding).
The last one knows pyproxy's listeners from `OWN_LISTENERS`, which process/ fills
as they start serving; a listener on 0.0.0.0 or :: owns every address of the host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pyproxy.pool.addresses import Address, embedded_ipv4, is_this_host, resolve, why_forbidden

if TYPE_CHECKING:
    from pyproxy.config.schema import BackendConfig

log = logging.getLogger(__name__)


class ForbiddenAddress(ValueError):
    """A resolved address a backend may not have; the message says why."""


def resolve_allowed(host: str, port: int) -> list[str]:
    """The addresses to connect to for an admin-added backend, as IP literals.

    Resolves once and refuses the whole name if any answer is forbidden (a name that
    resolves to a good and a bad address is a trap, not a fallback). The caller must
    connect to exactly these literals: resolving again could get another answer.
    Raises ForbiddenAddress, or OSError when the name does not resolve.
    """
    addresses = resolve(host, port)
    why = _why_refused(host, port, addresses, OWN_LISTENERS())
    if why is not None:
        REFUSALS.refused(host, port, why)
        raise ForbiddenAddress(why)
    REFUSALS.allowed(host, port)
    return [str(address) for address in addresses]


def _why_refused(
    host: str, port: int, addresses: Sequence[Address], own_listeners: Sequence[tuple[str, int]]
) -> str | None:
    """Why a backend at `host:port`, resolving to `addresses`, may not be dialled."""
    for address in addresses:
        why = why_forbidden(address)
        if why is not None:
            return why
    own = _own_listener(addresses, port, own_listeners)
    if own is not None:
        shown = f"[{own}]" if own.version == 6 else str(own)
        return f"{shown}:{port} is one of pyproxy's own listeners"
    return None


def _own_listener(
    addresses: Sequence[Address], port: int, own_listeners: Sequence[tuple[str, int]]
) -> Address | None:
    """The address among `addresses` (or inside one) where one of `own_listeners`
    listens on `port`, or None."""
    candidates = [c for address in addresses for c in (address, *embedded_ipv4(address))]
    for listen_host, listen_port in own_listeners:
        if port != listen_port:
            continue
        try:
            listen_ips = resolve(listen_host)
        except OSError:
            continue
        # A wildcard listener (0.0.0.0 or ::) accepts on every address of this host,
        # the LAN address as much as loopback. Either family counts: a :: listener takes
        # IPv4 too unless IPV6_V6ONLY is set, and refusing the other family's address on
        # this same port costs an operator little.
        wildcard = any(ip.is_unspecified for ip in listen_ips)
        on_loopback = any(ip.is_loopback for ip in listen_ips)
        for candidate in candidates:
            if candidate in listen_ips or (candidate.is_loopback and on_loopback):
                return candidate
            if wildcard and is_this_host(candidate):
                return candidate
    return None


class OwnListeners:
    """Where this process listens: its proxy and admin listeners (a worker adds its
    master's admin listener). The connect-time check reads it, since a name that
    passed the admin check may later answer with pyproxy's own address.

    Process-wide, as the sockets are: `process/` adds a listener when it starts
    serving and removes it when it closes. Counted, so two instances on one address in
    turn (a test, a restart in-process) do not remove each other's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[tuple[str, int], int] = {}  # (host, port) -> times added

    def add(self, address: tuple[str, int]) -> None:
        with self._lock:
            self._listeners[address] = self._listeners.get(address, 0) + 1

    def remove(self, address: tuple[str, int]) -> None:
        with self._lock:
            left = self._listeners.pop(address, 0) - 1
            if left > 0:
                self._listeners[address] = left

    def __call__(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._listeners)


OWN_LISTENERS = OwnListeners()


class RefusalLog:
    """Logs a backend's refusal when it starts or its reason changes, not on every
    connection attempt: health probes dial a refused backend every interval, and a
    warning per probe would bury everything else. This is how nginx and HAProxy log an
    upstream: its state changes, not each failed try. The refusal itself still holds
    on every attempt; only the log line is spared.

    Keyed by (host, port) as the backend's URL names it. Bounded: a process that sees
    more refused backends than `limit` forgets the oldest, which at worst logs one of
    them again."""

    def __init__(self, limit: int = 1024) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[tuple[str, int], str] = {}  # (host, port) -> last reason logged
        self._limit = limit

    def refused(self, host: str, port: int, why: str) -> None:
        key = (host, port)
        with self._lock:
            if self._reasons.get(key) == why:
                return
            self._reasons.pop(key, None)  # re-inserted last: the newest to forget
            if len(self._reasons) >= self._limit:
                del self._reasons[next(iter(self._reasons))]
            self._reasons[key] = why
        log.warning("refused to connect to admin-added backend %s:%d: %s", host, port, why)

    def allowed(self, host: str, port: int) -> None:
        if not self._reasons:  # the usual case: nothing refused, no lock taken
            return
        with self._lock:
            was_refused = self._reasons.pop((host, port), None) is not None
        if was_refused:
            log.info("admin-added backend %s:%d is allowed again", host, port)


REFUSALS = RefusalLog()  # one per process: every pool's connections report here


def url_identity(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in: http://h and http://h:80
    are one backend."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def refuse_backend_url(
    url: str, own_listeners: Sequence[tuple[str, int]], *, unresolvable_ok: bool = False
) -> str | None:
    """Why `url` may not become an admin-added backend, or None. `url` is already a
    valid http(s) URL. A name that does not resolve is refused unless `unresolvable_ok`
    (restoring at start, when DNS may not be up yet: the connect-time check still holds)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "only http:// and https:// backends are allowed"
    if parts.username is not None or parts.password is not None:
        return "backend URLs must not carry user info"
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(host, port)
    except OSError:
        return None if unresolvable_ok else f"cannot resolve {host}"
    return _why_refused(host, port, addresses, own_listeners)


def keep_allowed(
    backends: Iterable[BackendConfig], own_listeners: Sequence[tuple[str, int]]
) -> tuple[BackendConfig, ...]:
    """The backends restored from `admin.state_file` that the admin API would accept;
    each refused one is logged and skipped. The file is the admin API's memory, so it
    gets the admin API's rules: editing it must not be a way around them."""
    kept = []
    for backend in backends:
        why = refuse_backend_url(backend.url, own_listeners, unresolvable_ok=True)
        if why is None:
            kept.append(backend)
        else:
            log.error("admin state: skipped backend %s (%s): %s", backend.name, backend.url, why)
    return tuple(kept)

