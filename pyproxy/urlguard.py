"""Which backend URLs the admin API refuses to add (SPEC §6).

An admin token is a powerful thing, but it should not turn pyproxy into a way to
reach what the network hides: cloud metadata services live on link-local
addresses (169.254.169.254), "unspecified" addresses (0.0.0.0, ::) mean "this host"
to many stacks, and a backend pointing at pyproxy's own listeners is a loop.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _unwrapped(address: Address) -> Address:
    """The IPv4 address inside an IPv4-mapped IPv6 one (::ffff:169.254.169.254):
    Python's is_link_local and friends do not look inside, but the kernel connects
    to the IPv4 address all the same."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _addresses(host: str) -> list[Address]:
    try:
        return [_unwrapped(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [_unwrapped(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos]


def url_identity(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in: http://h and http://h:80
    are one backend."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def refuse_backend_url(url: str, own_listeners: Sequence[tuple[str, int]]) -> str | None:
    """Why `url` may not become a backend, or None. `url` is already a valid http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "only http:// and https:// backends are allowed"
    if parts.username is not None or parts.password is not None:
        return "backend URLs must not carry user info"
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _addresses(host)
    if not addresses:
        return f"cannot resolve {host}"
    for address in addresses:
        if address.is_link_local:
            return f"{address} is link-local (cloud metadata lives there)"
        if address.is_unspecified:
            return f"{address} is an unspecified address"
    for listen_host, listen_port in own_listeners:
        if port != listen_port:
            continue
        listen_ips = _addresses(listen_host)
        for address in addresses:
            if address in listen_ips or (
                address.is_loopback
                and any(ip.is_unspecified or ip.is_loopback for ip in listen_ips)
            ):
                return f"{host}:{port} is one of pyproxy's own listeners"
    return None
