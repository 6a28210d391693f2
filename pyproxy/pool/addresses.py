"""What an address really is, whatever its spelling: the checks under the SSRF guard
(urlguard.py) for backends added through the admin API.

An address can be spelled many ways, and a check must see what the kernel will
connect to, not what the text looks like:

- IPv4 inside IPv6: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`
  (RFC 4291 §2.5.5), NAT64 `64:ff9b::/96` and `64:ff9b:1::/48` (RFC 6052, RFC 8215),
  6to4 `2002::/16` (RFC 3056) and Teredo `2001::/32` (RFC 4380). Python's
  `is_link_local` and friends do not look inside; a translator or the kernel does.
- The many IPv4 spellings glibc's `inet_aton` accepts: `2852039166`,
  `0xa9.0xfe.0xa9.0xfe`, `0251.0376.0251.0376`, `169.254.43518`. `ipaddress` refuses
  them, so they are resolved with `socket.getaddrinfo`, exactly as urllib3 will.
- IPv6 zone ids (`fe80::1%eth0`): the zone is dropped, the address judged.

Whether an address is this host's own is asked of the kernel too (`is_this_host`).
"""

from __future__ import annotations

import ipaddress
import socket

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 §2.1
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # RFC 1122 §3.2.1.3: never a destination


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


def is_this_host(address: Address) -> bool:
    """Whether `address` is one of this host's: loopback, or assigned to one of its
    interfaces. The kernel is asked, not a list: it lets a socket bind only to a local
    address (EADDRNOTAVAIL otherwise). Binding to port 0 sends nothing and listens on
    nothing. On a host that allows non-local binds (Linux's ip_nonlocal_bind) this says
    yes to more addresses, so the guard refuses more, never less."""
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((str(address), 0))
    except OSError:
        return False
    return True
