"""The connection classes of pyproxy's upstream pools: urllib3's, with two changes.

1. The response head is read strictly (response_head.StrictResponse): whatever a
   backend writes, what comes back is valid HTTP or an exception, never a hang.
   exchange.py reads heads with it directly; the health probe through urllib3.
2. Connections to backends added through the admin API (`check_peer`) go only to
   addresses the SSRF guard allows (urlguard.py), checked on the address actually
   dialled: a name can resolve differently after the admin check. Config-file
   backends are the operator's own choice and are not checked.

Requests are not written through these classes' `request()`: exchange.py writes the
head itself (the raw target, the deadline, one buffer). urllib3 still owns what a
connection is: dialling (with TLS), keep-alive, the stale-connection check.
"""

from __future__ import annotations

import http.client
import socket

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from pyproxy.pool import urlguard
from pyproxy.pool.response_head import StrictResponse


class AddressRefused(NewConnectionError):
    """The SSRF guard refused every address an admin-added backend's name gave. A
    NewConnectionError, so the hot path treats it as a refused connection (nothing
    sent, retried elsewhere); its own type lets the health probe say why."""


class _UpstreamMixin:
    sock: socket.socket | None
    # What http.client's getresponse() builds: the strict head reader.
    response_class: type[http.client.HTTPResponse] = StrictResponse
    host: str
    port: int
    _dns_host: str  # urllib3's: the name it resolves, self.host without a trailing dot
    check_peer = False  # True for admin-added backends: see _new_conn

    def _new_conn(self) -> socket.socket:
        """Open the TCP connection; for an admin-added backend, resolve the name once,
        refuse it if any answer is forbidden, and dial exactly the answers checked
        (letting urllib3 resolve again could get another, DNS rebinding). Called once
        per new connection, not per request; config backends skip it entirely."""
        if not self.check_peer:
            return super()._new_conn()  # type: ignore[misc]
        name = self._dns_host
        try:
            addresses = urlguard.resolve_allowed(name, self.port)
        except urlguard.ForbiddenAddress as refused:
            why = f"refused to connect to {self.host}: {refused}"
            raise AddressRefused(self, why) from None  # type: ignore[arg-type]
        except OSError as error:  # socket.gaierror: the name does not resolve
            raise NameResolutionError(self.host, self, error) from error  # type: ignore[arg-type]
        failure: Exception | None = None
        try:
            for address in addresses:
                self._dns_host = address  # a literal: urllib3 connects without a lookup
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except ConnectTimeoutError as error:  # refused or timed out: try the next
                    # (NewConnectionError, a refusal, is a ConnectTimeoutError in urllib3 2)
                    failure = error
        finally:
            self._dns_host = name
        assert failure is not None  # resolve_allowed returns at least one address
        raise failure


class UpstreamHTTPConnection(_UpstreamMixin, HTTPConnection):
    """urllib3's HTTPConnection with the strict head reader."""


class UpstreamHTTPSConnection(_UpstreamMixin, HTTPSConnection):
    """The same for HTTPS backends."""


class CheckedHTTPConnection(UpstreamHTTPConnection):
    """For backends added through the admin API: every peer address is checked."""

    check_peer = True


class CheckedHTTPSConnection(UpstreamHTTPSConnection):
    """The same for HTTPS backends added through the admin API."""

    check_peer = True


def connection_class(scheme: str, source: str) -> type[HTTPConnection]:
    """The connection class for a backend's pool, by its scheme and source ("config"
    from the file, "admin" added through the admin API)."""
    if source == "admin":
        return CheckedHTTPSConnection if scheme == "https" else CheckedHTTPConnection
    return UpstreamHTTPSConnection if scheme == "https" else UpstreamHTTPConnection
