"""ResponseStream: the response body iterable handed to waitress.

PEP 3333 promises that the server calls `close()` on the iterable whatever happens
(complete, client gone, error), so `close()` is where a relayed request ends: the
request's Admission (backend slot, breaker permit, its place in flight) is closed,
and the metrics and access log line are recorded, exactly once (the idea of
werkzeug's ClosingIterator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from pyproxy.observe.metrics import Metrics
from pyproxy.pool.upstream import BodyRelay
from pyproxy.proxy.admission import Admission, BackendLease
from pyproxy.proxy.request import Outcome, Request
from pyproxy.wsgi import AbortResponse

log = logging.getLogger(__name__)


class ResponseStream:
    """Relays `relay` to the client for the request that `admission` holds; the
    admission's current lease is the backend the body comes from."""

    def __init__(
        self,
        admission: Admission,
        request: Request,
        outcome: Outcome,
        relay: BodyRelay,
        *,
        metrics: Metrics,
        on_close: Callable[[Request, Outcome], object],
        send_head: Callable[[bytes], object],
    ) -> None:
        assert admission.lease is not None
        self.admission, self.relay = admission, relay
        self.request, self.outcome = request, outcome
        self.lease: BackendLease = admission.lease
        self.metrics = metrics
        self.on_close = on_close
        self.send_head = send_head  # the WSGI write(): write(b"") sends the head alone
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.relay
        failure = self.relay.failure
        if failure is not None:
            backend = self.lease.backend
            self.outcome.detail = f"backend failed mid-body: {failure.detail}"
            log.warning(
                "backend %s failed mid-response (%s); cutting the client's response short",
                backend.name, failure.detail,
            )  # fmt: skip
            self.metrics.count_error(backend.name, failure.reason, self.lease.pool)
            self.lease.judge(failed=True)
            if not self.relay.bytes_sent:
                # The head waits for the first body byte; without it the client would
                # see no answer at all. It gets the head, then the cut.
                self.send_head(b"")
            # The client must see the truncation, never a complete short body
            # (RFC 9112 §8: an incomplete message is one the recipient can detect).
            raise AbortResponse(failure.detail)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        relay, outcome = self.relay, self.outcome
        try:
            relay.close()
            outcome.bytes_sent = relay.bytes_sent
            if not relay.complete and relay.failure is None:
                outcome.detail = "client disconnected"
                self.metrics.count_error(
                    self.lease.backend.name, "client_disconnected", self.lease.pool
                )
        finally:
            try:
                self.admission.close()
            finally:
                self.on_close(self.request, outcome)
