"""ResponseStream: the response body iterable handed to waitress.

PEP 3333 promises that the server calls `close()` on the iterable whatever happens
(complete, client gone, error), so `close()` is where a relayed request ends: the
backend's in-flight slot is given back, and the metrics and access log line are
recorded, exactly once (the idea of werkzeug's ClosingIterator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from pyproxy.backend import Backend
from pyproxy.inbound import AbortResponse
from pyproxy.metrics import Metrics
from pyproxy.request import Inbound
from pyproxy.upstream import BodyRelay

log = logging.getLogger(__name__)


class ResponseStream:
    """Relays `relay` to the client. `failed_status` marks an answer the breaker
    counted as a failure (e.g. a 503 relayed after retries ran out)."""

    def __init__(
        self,
        backend: Backend,
        request: Inbound,
        relay: BodyRelay,
        *,
        failed_status: bool,
        metrics: Metrics,
        on_backend_failure: Callable[[Backend], None],
        on_close: Callable[[Inbound], None],
        send_head: Callable[[bytes], object],
    ) -> None:
        self.backend, self.request, self.relay = backend, request, relay
        self.failed_status = failed_status
        self.metrics = metrics
        self.on_backend_failure = on_backend_failure
        self.on_close = on_close
        self.send_head = send_head  # the WSGI write(): write(b"") sends the head alone
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.relay
        failure = self.relay.failure
        if failure is not None:
            self.request.detail = f"backend failed mid-body: {failure.detail}"
            log.warning(
                "backend %s failed mid-response (%s); cutting the client's response short",
                self.backend.name, failure.detail,
            )  # fmt: skip
            self.metrics.count_error(self.backend.name, failure.reason)
            self.on_backend_failure(self.backend)
            if not self.relay.bytes_sent:
                # The head waits for the first body byte; without it the client would
                # see no answer at all. It gets the head, then the cut.
                self.send_head(b"")
            # SPEC §4: the client must see the truncation, never a complete short body.
            raise AbortResponse(failure.detail)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        relay, request = self.relay, self.request
        relay.close()
        request.bytes_sent = relay.bytes_sent
        if not relay.complete and relay.failure is None:
            request.detail = "client disconnected"
            self.metrics.count_error(self.backend.name, "client_disconnected")
        self.backend.release(failed=relay.failure is not None or self.failed_status)
        self.on_close(request)
