"""The one place that turns what went wrong upstream into what the client is told.

`classify()` reads like a table: each exception urllib3 can raise on the way to a
backend becomes a `Failure` carrying the metric reason (`proxy_errors_total`), the
retry condition it counts as (`retry_on`), the status the client gets if it is the
final outcome, whether the request may have reached the backend (only a request
that certainly did not is safe to retry whatever its method), and whether the
backend is to blame at all.

A backend is judged only on its own behaviour. `not_sent()` is the other table:
a request that http.client refused to *write* (a control byte in the target, a
header value it cannot encode) never reached the backend and says nothing about
it, so it is answered 400 (the request's fault) or 500 (pyproxy's), never retried,
and never counted against the backend.
"""

from __future__ import annotations

import http
import http.client
from dataclasses import dataclass

from urllib3 import exceptions as u3

REASONS = {
    400: "Bad Request",
    500: "Internal Server Error",
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
    backend_at_fault: bool = True  # False: not the backend's doing; no verdict, no retry


class UnsendableRequest(Exception):
    """The request cannot be written as HTTP/1.1, found before a byte of it was
    written to the backend's socket (exchange.request_head; the reason is `__cause__`)."""


# The request itself cannot be written as HTTP/1.1, found while building the request
# line and header lines, before anything is sent (the same refusals as http.client's
# putrequest and putheader).
_REQUEST_AT_FAULT: tuple[tuple[type[BaseException], str], ...] = (
    # a control byte, space or DEL in the target (CPython bpo-30458)
    (http.client.InvalidURL, "request target cannot be forwarded"),
    # the request line is ASCII, field values latin-1 (RFC 9110 §5.5: octets, not text)
    (UnicodeEncodeError, "a byte in the request target or a header cannot be forwarded"),
    # a name that is not a token, a value with a CR, LF or another control
    (ValueError, "a header name or value cannot be forwarded"),
)


def classify(exc: BaseException) -> Failure:
    """Map an exception from an upstream exchange to a Failure. Order matters:
    NewConnectionError is a subclass of ConnectTimeoutError in urllib3 2."""
    if isinstance(exc, u3.NewConnectionError):
        return Failure("connect_error", "connect_error", 502, "connection refused", False)
    if isinstance(exc, u3.ConnectTimeoutError):
        # A connect timeout sent nothing, so it retries like a refusal, but the
        # client's final answer says "timeout": 504, as nginx answers a connect timeout.
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
    if isinstance(exc, UnsendableRequest):
        return not_sent(exc)  # found before a connection was taken
    if isinstance(exc, u3.InvalidHeader | u3.HTTPError | http.client.HTTPException):
        return Failure("bad_response", "reset", 502, "invalid response")
    if isinstance(exc, OSError):
        return Failure("reset", "reset", 502, "connection error")
    raise exc


def not_sent(exc: BaseException) -> Failure:
    """A request that never left pyproxy: 400 if the request cannot be written as
    HTTP/1.1, 500 if pyproxy built something it could not send (a bug). Neither is
    the backend's doing, so neither is judged, counted against it or retried."""
    cause = exc.__cause__ if isinstance(exc, UnsendableRequest) and exc.__cause__ else exc
    for kind, why in _REQUEST_AT_FAULT:
        if isinstance(cause, kind):
            return Failure("bad_request", "bad_request", 400, why, False, backend_at_fault=False)
    why = f"request could not be built ({type(cause).__name__})"
    return Failure("proxy_error", "proxy_error", 500, why, False, backend_at_fault=False)


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
    """The body of an answer pyproxy makes itself: one short line, `<code> <reason>: <why>`."""
    return f"{status} {reason_phrase(status)}: {why}\n".encode()
