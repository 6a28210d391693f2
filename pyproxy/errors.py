"""The one place that turns what went wrong upstream into what the client is told.

`classify()` reads like a table: each exception urllib3 can raise on the way to a
backend becomes a `Failure` carrying the metric reason (SPEC §9), the retry
condition it counts as (SPEC §3 `retry_on`), the status the client gets if it is
the final outcome (SPEC §4), and whether the request may have reached the backend
(only a request that certainly did not is safe to retry whatever its method).
"""

from __future__ import annotations

import http
import http.client
from dataclasses import dataclass

from urllib3 import exceptions as u3

REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    508: "Loop Detected",
}


@dataclass(frozen=True)
class Failure:
    """One failed upstream attempt, or a request that never got one."""

    reason: str  # proxy_errors_total reason label
    condition: str | int  # what `retry_on` calls it: connect_error | reset | timeout | a status
    status: int  # the answer if this is the final outcome
    detail: str  # a few words for the error body and the log
    request_sent: bool = True  # False: nothing reached the backend, safe to retry any method


def classify(exc: BaseException) -> Failure:
    """Map an exception from an upstream exchange to a Failure. Order matters:
    NewConnectionError is a subclass of ConnectTimeoutError in urllib3 2."""
    if isinstance(exc, u3.NewConnectionError):
        return Failure("connect_error", "connect_error", 502, "connection refused", False)
    if isinstance(exc, u3.ConnectTimeoutError):
        # A connect timeout sent nothing, so it retries like a refusal, but the
        # client's final answer says "timeout" (SPEC §4).
        return Failure("connect_error", "connect_error", 504, "connect timeout", False)
    if isinstance(exc, u3.SSLError):
        return Failure("connect_error", "connect_error", 502, "TLS handshake failed", False)
    if isinstance(exc, u3.ReadTimeoutError | TimeoutError):
        return Failure("timeout", "timeout", 504, "no response in time")
    if isinstance(exc, u3.ProtocolError):
        cause = exc.args[1] if len(exc.args) > 1 else exc.__context__
        if isinstance(cause, u3.InvalidChunkLength):  # an IncompleteRead subclass, so first
            return Failure("bad_response", "reset", 502, "invalid chunk size")
        if isinstance(cause, http.client.IncompleteRead):
            return Failure("reset", "reset", 502, "response body cut short")
        if isinstance(cause, http.client.HTTPException) and not isinstance(
            cause, http.client.RemoteDisconnected
        ):
            # BadStatusLine, LineTooLong and friends: bytes that are not HTTP.
            return Failure("bad_response", "reset", 502, "invalid response")
        return Failure("reset", "reset", 502, "connection closed before the response")
    if isinstance(exc, u3.InvalidHeader | u3.HTTPError | http.client.HTTPException):
        return Failure("bad_response", "reset", 502, "invalid response")
    if isinstance(exc, OSError):
        return Failure("reset", "reset", 502, "connection error")
    raise exc


def bad_response(detail: str) -> Failure:
    """A response that arrived but breaks HTTP framing rules (checked by pyproxy)."""
    return Failure("bad_response", "reset", 502, detail)


def status_failure(status: int) -> Failure:
    """A well-formed answer whose status the config counts as a failure."""
    return Failure("upstream_status", status, status, f"backend answered {status}")


def chaos_failure(status: int) -> Failure:
    """An injected failure: behaves exactly like a backend that answered `status`."""
    return Failure("chaos", status, status, f"chaos injected {status}")


def reason_phrase(status: int) -> str:
    """The standard reason phrase (RFC 9110 §15), e.g. 418 -> "I'm a Teapot"."""
    if status in REASONS:
        return REASONS[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_body(status: int, why: str) -> bytes:
    """SPEC §4: a short text/plain body `<code> <reason>: <why>`."""
    return f"{status} {reason_phrase(status)}: {why}\n".encode()
