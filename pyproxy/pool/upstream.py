"""One exchange with one backend: send the request, check the answer, relay the body.

This is the hot path's network half. It talks to the urllib3 pool owned by the
backend's requests.Session adapter, skipping `Session.request` (settings merge,
URL re-preparation, cookie extraction: about half of a request's CPU on this stack,
see docs/performance.md). Nothing here decides about retries or metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import IO

import urllib3
from urllib3.util import SKIP_HEADER, Retry

from pyproxy.pool.backend import Backend
from pyproxy.pool.errors import Failure, bad_response, classify
from pyproxy.pool.response_head import InvalidResponseHead

log = logging.getLogger(__name__)

RELAY_CHUNK = 64 * 1024
# Built once: `retries=False` makes urllib3 build an equivalent Retry on every call.
NO_RETRIES = Retry(total=False, redirect=False, raise_on_redirect=False)


def send(
    backend: Backend,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | IO[bytes] | None,
    timeout: urllib3.Timeout,
) -> urllib3.BaseHTTPResponse:
    """Send one request and return the response with its body still unread.

    Raises the urllib3 exception of a failed exchange (see errors.classify). The head
    has been read strictly (response_head.py): a head that is not valid HTTP raised.
    """
    # urllib3 adds User-Agent and Accept-Encoding when absent; SKIP_HEADER says
    # "send none", so the backend sees only what the client sent.
    if "User-Agent" not in headers and "user-agent" not in headers:
        headers["User-Agent"] = SKIP_HEADER
    if "Accept-Encoding" not in headers and "accept-encoding" not in headers:
        headers["Accept-Encoding"] = SKIP_HEADER
    try:
        return backend.pool.urlopen(
            method,
            target,
            body=body,
            headers=headers,
            retries=NO_RETRIES,  # retrying is pyproxy's decision, made with the whole pool in view
            redirect=False,  # a redirect is the client's to follow
            assert_same_host=False,
            preload_content=False,  # stream: never hold a whole response in memory
            decode_content=False,  # compressed bodies pass through byte for byte
            # The response keeps its connection until the body is read to the end, then
            # hands it back to the pool (True would pool it at once, mid-body).
            release_conn=False,
            timeout=timeout,
            chunked=False,  # we always know the length: waitress buffered the request body
        )
    except urllib3.exceptions.ProtocolError as exc:
        cause = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(cause, InvalidResponseHead):
            # The client is told "invalid response"; the operator learns which rule.
            log.warning("backend %s sent an invalid response head: %s", backend.name, cause)
        raise


def response_problem(response: urllib3.BaseHTTPResponse) -> str | None:
    """Why a valid response is still no answer pyproxy can relay, or None.

    Its head is valid HTTP (response_head.py refused the rest, framing included) and
    interim responses were read past, so a 1xx here is 101 Switching Protocols: the
    connection now speaks another protocol, and pyproxy does not do Upgrade.
    """
    if response.status < 200:
        return f"{response.status} as final response (pyproxy does not do Upgrade)"
    return None


def discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close the response's connection instead of pooling it: after a broken or
    abandoned response, the bytes left on it belong to nobody."""
    response.close()
    response.release_conn()


def check(response: urllib3.BaseHTTPResponse) -> Failure | None:
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

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self.response = response
        self.bytes_sent = 0
        self.complete = False
        self.failure: Failure | None = None

    def __iter__(self) -> Iterator[bytes]:
        read1 = self.response.read1
        try:
            while True:
                chunk = read1(RELAY_CHUNK, decode_content=False)
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
