"""Which addresses a backend added through the admin API may point at.

An admin token is a powerful thing, but it should not turn pyproxy into a way to
reach what the network hides: cloud metadata services live on link-local addresses
(169.254.169.254, fd00:ec2::254 is reached through fe80::/10 routes), "unspecified"
addresses (0.0.0.0, ::) mean "this host" to many stacks, and a backend pointing at
pyproxy's own listeners is a loop (or, for the admin listener, a way to publish the
admin API on the proxy port).

An address can be spelled many ways, and the check must see what the kernel will
connect to, not what the text looks like:

- IPv4 inside IPv6: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`
  (RFC 4291 §2.5.5), NAT64 `64:ff9b::/96` and `64:ff9b:1::/48` (RFC 6052, RFC 8215),
  6to4 `2002::/16` (RFC 3056) and Teredo `2001::/32` (RFC 4380). Python's
  `is_link_local` and friends do not look inside; a translator or the kernel does.
- The many IPv4 spellings glibc's `inet_aton` accepts: `2852039166`,
  `0xa9.0xfe.0xa9.0xfe`, `0251.0376.0251.0376`, `169.254.43518`. `ipaddress` refuses
  them, so they are resolved with `socket.getaddrinfo`, exactly as urllib3 will.
- IPv6 zone ids (`fe80::1%eth0`): the zone is dropped, the address judged.

The check runs three times: when `POST /admin/add-backend` is asked (`refuse_backend_url`),
when backends are restored from `admin.state_file` at start (`keep_allowed`, called
from runtime/state_file.py: a tampered file must not add a metadata backend), and
each time a connection to an admin-added backend is made (`resolve_allowed`, called
from connection.py): DNS can answer differently after the admin check (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from pyproxy.config.schema import BackendConfig

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 §2.1
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # RFC 1122 §3.2.1.3: never a destination


class ForbiddenAddress(ValueError):
    """A resolved address a backend may not have; the message says why."""


def _rfc6052_ipv4(address: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a NAT64 prefix of this length (RFC 6052 §2.2:
    bits 64-71 are the reserved "u" octet and are skipped)."""
    raw = address.packed
    without_u = raw[:8] + raw[9:]
    start = prefix_length // 8 if prefix_length <= 64 else prefix_length // 8 - 1
    return ipaddress.IPv4Address(without_u[start : start + 4])


def embedded_ipv4(address: Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address this IPv6 address may carry to an IPv4 host."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    elif address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address in _NAT64_WELL_KNOWN:
        found.append(_rfc6052_ipv4(address, 96))
    elif address in _NAT64_LOCAL_USE:
        # The operator picks the prefix length inside the /48; any of them may apply.
        # A position that decodes into 0.0.0.0/8 is the zero padding of another one.
        for length in (48, 56, 64, 96):
            candidate = _rfc6052_ipv4(address, length)
            if candidate not in _THIS_NETWORK:
                found.append(candidate)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.append(address.teredo[1])  # the client's address (the server's is public)
    return found


def why_forbidden(address: Address) -> str | None:
    """Why no admin-added backend may connect to `address`, or None."""
    for candidate in (address, *embedded_ipv4(address)):
        shown = str(candidate) if candidate == address else f"{candidate} (inside {address})"
        if candidate.is_link_local:
            return f"{shown} is link-local (cloud metadata lives there)"
        if candidate.is_unspecified or candidate in _THIS_NETWORK:
            return f"{shown} is an unspecified address"
    return None


def parse_address(text: str) -> Address:
    """An IP literal as `getaddrinfo` or a URL gives it: brackets and zone id dropped."""
    return ipaddress.ip_address(text.strip("[]").split("%")[0])


def resolve(host: str, port: int | None = None) -> list[Address]:
    """What a connection to `host` would try, in order: the literal itself, or what
    `socket.getaddrinfo` answers (the resolver urllib3 uses, with inet_aton's
    spellings). Raises OSError (socket.gaierror) when the name does not resolve."""
    try:
        return [parse_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[Address] = []
    for info in infos:
        address = parse_address(str(info[4][0]))
        if address not in addresses:
            addresses.append(address)
    return addresses


def resolve_allowed(host: str, port: int) -> list[str]:
    """The addresses to connect to for an admin-added backend, as IP literals.

    Resolves once and refuses the whole name if any answer is forbidden (a name that
    resolves to a good and a bad address is a trap, not a fallback). The caller must
    connect to exactly these literals: resolving again could get another answer.
    Raises ForbiddenAddress, or OSError when the name does not resolve.
    """
    addresses = resolve(host, port)
    for address in addresses:
        why = why_forbidden(address)
        if why is not None:
            REFUSALS.refused(host, port, why)
            raise ForbiddenAddress(why)
    REFUSALS.allowed(host, port)
    return [str(address) for address in addresses]


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


def _own_listener(
    addresses: Sequence[Address], port: int, own_listeners: Sequence[tuple[str, int]]
) -> bool:
    candidates = [c for address in addresses for c in (address, *embedded_ipv4(address))]
    for listen_host, listen_port in own_listeners:
        if port != listen_port:
            continue
        try:
            listen_ips = resolve(listen_host)
        except OSError:
            continue
        wildcard_or_local = any(ip.is_unspecified or ip.is_loopback for ip in listen_ips)
        for candidate in candidates:
            if candidate in listen_ips or (candidate.is_loopback and wildcard_or_local):
                return True
    return False


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
    for address in addresses:
        why = why_forbidden(address)
        if why is not None:
            return why
    if _own_listener(addresses, port, own_listeners):
        return f"{host}:{port} is one of pyproxy's own listeners"
    return None


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

