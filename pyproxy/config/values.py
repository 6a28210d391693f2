"""Checkers for the value syntaxes particular to pyproxy's config file.

Addresses (`host:port`), networks (CIDRs), HTTP statuses and status ranges, retry
conditions, the rate limiter's client key and store, cookie names, backend URLs and
names. Each takes a YAML value and returns the typed setting or raises `ValueError`
with a message for a person; see `checks.py` for the generic ones and the rules
they all follow.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from typing import Any
from urllib.parse import urlsplit

from pyproxy.config.checks import each, integer
from pyproxy.config.report import redact_secrets
from pyproxy.config.schema import RETRY_CONDITIONS, Address, Network

# RFC 9110 §5.6.2 token: the characters allowed in header names (and cookie names).
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Letters, digits, "-" and "."; "_" too, because Docker and Compose name hosts that way.
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_PATH = re.compile(r"/[!-~]*")  # "/" then printable ASCII: it goes into a request line
_BACKEND_NAME = re.compile(r"[A-Za-z0-9._:\[\]-]{1,100}")


def url_path(value: Any) -> str:
    if not isinstance(value, str) or not _PATH.fullmatch(value):
        raise ValueError("must be a path starting with '/' (e.g. /health)")
    return str(value)


def cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not TOKEN.fullmatch(value):
        raise ValueError("must be a cookie name: letters, digits and !#$%&'*+-.^_`|~")
    return str(value)


def address(value: Any) -> Address:
    """`host:port` or `[ipv6]:port`; port 0 asks the OS for a free one."""
    usage = "must be host:port or [ipv6]:port (e.g. 127.0.0.1:8080)"
    if not isinstance(value, str):
        raise ValueError(usage)
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{usage}; the port must be 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(usage)
    return Address(host, int(port_text))


def network(value: Any) -> Network:
    """A CIDR (`10.0.0.0/8`) or a single address (`192.0.2.7` = a /32)."""
    usage = f"{value!r} is not a CIDR (e.g. 10.0.0.0/8) or an IP address"
    if not isinstance(value, str):
        raise ValueError(usage)
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as error:
        if "host bits set" not in str(error):
            raise ValueError(usage) from None
    # 10.0.0.1/8 is more likely a typo than a wish, so say what it would mean.
    meant = ipaddress.ip_network(value.strip(), strict=False)
    raise ValueError(f"{value!r} has host bits set (did you mean {meant}?)")


def networks(value: Any) -> tuple[Network, ...]:
    return tuple(each(network)(value))


status = integer(100, 599)


def statuses(value: Any) -> frozenset[int]:
    return frozenset(each(status)(value))


def status_range(value: Any) -> tuple[int, int]:
    """`"200-399"` (inclusive), `"200"` or `200`."""
    usage = "must be a status or an inclusive range of statuses such as 200-399"
    if isinstance(value, str):
        low, dash, high = (part.strip() for part in value.partition("-"))
        high = high if dash else low
        if not (low.isdigit() and high.isdigit()):
            raise ValueError(usage)
        bounds = status(int(low)), status(int(high))
    else:
        bounds = status(value), status(value)
    if bounds[0] > bounds[1]:
        raise ValueError(f"{value!r}: the range is empty (low > high)")
    return bounds


def retry_condition(value: Any) -> str | int:
    if isinstance(value, str) and value in RETRY_CONDITIONS:
        return str(value)
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # a quoted "502" means the status
    try:
        return int(status(value))
    except ValueError:
        names = ", ".join(sorted(RETRY_CONDITIONS))
        raise ValueError(f"unknown condition {value!r} (use {names} or a status 100-599)") from None


def retry_conditions(value: Any) -> frozenset[str | int]:
    return frozenset(each(retry_condition)(value))


def client_key(value: Any) -> str:
    if value == "ip":
        return "ip"
    prefix, _, name = value.partition(":") if isinstance(value, str) else ("", "", "")
    if prefix == "header" and TOKEN.fullmatch(name):
        return str(value)
    raise ValueError(f"must be ip or header:<Header-Name> (got {value!r})")


def store(value: Any) -> str:
    """`memory`, or `redis[s]://[[user]:password@]host[:port][/db]` (`rediss` = TLS).

    Anything else is an error, never a quiet fall back to per-instance memory: a
    config asking for a shared limit must get one or not start. For the same
    reason a Redis store needs the redis package now, not at the first request.
    The value is never echoed back: it may hold a password.
    """
    if value == "memory":
        return "memory"
    usage = "must be memory, redis:// or rediss:// (e.g. redis://host:6379/0)"
    if not isinstance(value, str):
        raise ValueError(usage)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  # raises ValueError for a port outside 0-65535
    except ValueError:
        raise ValueError(f"{usage}; got {redact_secrets(value)!r}") from None
    db = parts.path.lstrip("/")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query:
        raise ValueError(f"{usage}; got {redact_secrets(value)!r}")
    if db and not db.isdigit():
        raise ValueError(f"the redis database must be a number (got {db!r})")
    if importlib.util.find_spec("redis") is None:
        raise ValueError("needs the redis package (pip install 'pyproxy[redis]')")
    return str(value)


def backend_url(value: Any) -> tuple[str, str]:
    """Check a backend URL; return it normalised and its `host:port` (the default name).

    Only scheme, host and port are allowed: a path would silently rewrite every
    request, and user info would put credentials in logs and on the status page.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("must be a URL such as http://127.0.0.1:9001")
    if "@" in value:  # first: the messages below echo the value, password and all
        raise ValueError("must not contain user info (user:password@)")
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError as error:
        raise ValueError(f"invalid URL {value!r}: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"must start with http:// or https:// (got {value!r})")
    host = parts.hostname
    if not host or not (_HOSTNAME.fullmatch(host) or ":" in host):  # urlsplit checked IPv6
        raise ValueError(f"needs a valid host (got {value!r})")
    if port == 0:
        raise ValueError("the port must be 1-65535")
    if parts.path not in ("", "/"):
        raise ValueError(f"must not have a path (got {parts.path!r}); only scheme://host:port")
    if "?" in value or "#" in value:
        raise ValueError("must not have a query or a fragment")
    shown = f"[{host}]" if ":" in host else host
    netloc = shown if port is None else f"{shown}:{port}"
    default_port = port if port is not None else (443 if scheme == "https" else 80)
    return f"{scheme}://{netloc}", f"{shown}:{default_port}"


def backend_name(value: Any) -> str:
    if not isinstance(value, str) or not _BACKEND_NAME.fullmatch(value):
        raise ValueError("must be 1-100 characters of letters, digits and . _ : - [ ]")
    return str(value)


# Envoy's load_balancing_weight is a uint32 too. Weighted rendezvous hashing (sticky
# ip) divides by the weight as a float, so a larger one would raise OverflowError.
MAX_WEIGHT = 2**32 - 1
_WEIGHT = integer(minimum=0)


def backend_weight(value: Any) -> int:
    """A backend's weight: an integer from 0 (no new requests) to MAX_WEIGHT."""
    weight = _WEIGHT(value)
    if weight > MAX_WEIGHT:
        raise ValueError(f"must be at most {MAX_WEIGHT}")
    return weight


def host_header(value: Any) -> str:
    """A Host header value for probes: `name`, `name:port`, `[ipv6]` or `[ipv6]:port`."""
    usage = "must be a host name, optionally with :port (e.g. app.internal:8080)"
    if not isinstance(value, str):
        raise ValueError(usage)
    host, port = value, ""
    if value.rfind(":") > value.rfind("]"):  # a port after the host (or after "[ipv6]")
        host, _, port = value.rpartition(":")
    if port and (not port.isdigit() or int(port) > 65535):
        raise ValueError(usage)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host[1:-1]!r} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(usage)
    return str(value)


def host_pattern(value: Any) -> str:
    """A route's host: exact (`api.example.com`) or `*.example.com`; returned lower case.

    A wildcard is one whole leading label and stands for exactly one label, as in
    Caddy; `*` elsewhere (`api.*.com`, `*api.com`) has no agreed meaning, so it is
    refused. A trailing dot (the fully qualified form) is dropped, as nginx does.
    """
    usage = "must be a host name (api.example.com) or *. and a domain (*.example.com)"
    if not isinstance(value, str) or not value:
        raise ValueError(usage)
    host = value.lower().removesuffix(".")
    if host.startswith("["):
        address, _, after = host[1:].partition("]")
        if after:
            raise ValueError("must not have a port (the port is ignored when matching)")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IPv6 address") from None
        return host
    if ":" in host:
        raise ValueError("must not have a port (the port is ignored when matching)")
    name = host.removeprefix("*.")
    if "*" in name:
        raise ValueError(f"only one leading wildcard label, as in *.example.com (got {value!r})")
    if not _HOSTNAME.fullmatch(name) or ".." in name:
        raise ValueError(usage)
    return host


def path_prefix(value: Any) -> str:
    """A route's path prefix: a raw path starting with "/", without a query."""
    prefix = url_path(value)
    if "?" in prefix or "#" in prefix:
        raise ValueError("must be a path without '?' or '#' (the query is not matched)")
    return prefix


# Pool names become field paths (`pools.web.health_check`) and metric labels: no dots.
_POOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")


def pool_name(value: Any) -> str:
    if not isinstance(value, str) or not _POOL_NAME.fullmatch(value):
        raise ValueError("must be 1-100 characters of letters, digits, _ and -")
    return str(value)


def route_name(value: Any) -> str:
    if not isinstance(value, str) or not _BACKEND_NAME.fullmatch(value):
        raise ValueError("must be 1-100 characters of letters, digits and . _ : - [ ]")
    return str(value)


def workers(value: Any) -> int:
    """A number of processes >= 1, or "auto": one per CPU."""
    if value == "auto":
        return os.cpu_count() or 1
    try:
        return int(integer(minimum=1)(value))
    except ValueError:
        raise ValueError('must be an integer >= 1 or "auto" (one per CPU)') from None
