"""One attempt's exchange with one backend: send the request, check the answer,
relay the body.

The bytes themselves are written and read by exchange.py, on a connection of the
urllib3 pool owned by the backend's requests.Session adapter (neither
`Session.request` nor urllib3's `urlopen`: see exchange.py for why). Nothing here
decides about retries or metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import IO

import urllib3

from pyproxy.pool.backend import Backend
from pyproxy.pool.deadline import DEADLINE_WATCHDOG, DeadlineWatchdog
from pyproxy.pool.errors import Failure, bad_response, classify
from pyproxy.pool.exchange import UpstreamResponse, exchange, request_head
from pyproxy.pool.response_head import InvalidResponseHead

log = logging.getLogger(__name__)

RELAY_CHUNK = 64 * 1024


def send(
    backend: Backend,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | IO[bytes] | None,
    timeout: urllib3.Timeout,
    deadline: float | None = None,
    watchdog: DeadlineWatchdog = DEADLINE_WATCHDOG,
) -> UpstreamResponse:
    """Send one request and return the response with its body still unread.

    `target` goes out exactly as given (the client's bytes: urllib3's urlopen would
    re-encode `%zz` as `%25zz`), with `headers` and nothing else (no User-Agent or
    Accept-Encoding of pyproxy's own). `deadline` (`timeouts.total`, on `watchdog`'s
    clock) holds while the request is sent and the head awaited. Raises
    UnsendableRequest for a request that cannot be written, else the exception of a
    failed exchange (see errors.classify). The head has been read strictly
    (response_head.py): a head that is not valid HTTP raised.
    """
    if "Host" not in headers and "host" not in headers:
        headers["Host"] = backend.netloc  # RFC 9112 §3.2: every HTTP/1.1 request has one
    head = request_head(method, target, headers, body)
    try:
        return exchange(backend.pool, method, head, body, timeout, deadline, watchdog)
    except urllib3.exceptions.ProtocolError as exc:
        cause = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(cause, InvalidResponseHead):
            # The client is told "invalid response"; the operator learns which rule.
            log.warning("backend %s sent an invalid response head: %s", backend.name, cause)
        raise


def response_problem(response: UpstreamResponse) -> str | None:
    """Why a valid response is still no answer pyproxy can relay, or None.

    Its head is valid HTTP (response_head.py refused the rest, framing included) and
    interim responses were read past, so a 1xx here is 101 Switching Protocols: the
    connection now speaks another protocol, and pyproxy does not do Upgrade.
    """
    if response.status < 200:
        return f"{response.status} as final response (pyproxy does not do Upgrade)"
    return None


def discard(response: UpstreamResponse) -> None:
    """Close the response's connection instead of pooling it: after a broken or
    abandoned response, the bytes left on it belong to nobody."""
    response.close()


def check(response: UpstreamResponse) -> Failure | None:
    """Validate a fresh response; a broken one is discarded and returned as a Failure."""
    problem = response_problem(response)
    if problem is None:
        return None
    discard(response)
    return bad_response(problem)


class BodyRelay:
    """Iterates over an upstream body as it arrives, `read1`-style: each chunk is
    handed on as soon as the socket has it (server-sent events do not wait for a
    buffer to fill), undecoded. `failure` is set if the backend died mid-body."""

    def __init__(self, response: UpstreamResponse) -> None:
        self.response = response
        self.bytes_sent = 0
        self.complete = False
        self.failure: Failure | None = None

    def __iter__(self) -> Iterator[bytes]:
        read1 = self.response.read1
        try:
            while True:
                chunk = read1(RELAY_CHUNK)
                if not chunk:
                    break
                self.bytes_sent += len(chunk)
                yield chunk
        except Exception as exc:
            self.failure = classify(exc)
            return
        self.complete = True

    def close(self) -> None:
        if not self.complete:
            discard(self.response)
