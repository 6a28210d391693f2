"""Relaying a backend's answer to the client: `Relay.start()` starts the response (its
head through the server's start_response), and `ResponseStream` is the body iterable
handed to waitress.

PEP 3333 promises that the server calls `close()` on the iterable whatever happens
(complete, client gone, error), so `close()` is where a relayed request ends: the
request's Admission (backend slot, breaker permit, its place in flight) is closed,
and the metrics and access log line are recorded, exactly once (the idea of
werkzeug's ClosingIterator).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator

from pyproxy.headers import downstream_response_headers
from pyproxy.observe.metrics import Metrics
from pyproxy.pool.errors import Failure
from pyproxy.pool.upstream import BodyRelay
from pyproxy.proxy.admission import Admission, BackendLease
from pyproxy.proxy.answers import OwnAnswers
from pyproxy.proxy.request import Outcome, Request
from pyproxy.wsgi import AbortResponse, StartResponse

log = logging.getLogger(__name__)

HEAD_REFUSED = Failure("bad_response", "reset", 502, "invalid response head from backend")


class Relay:
    """Starts the client's response from the current attempt's upstream response: the
    head (the backend's fields made downstream ones, pyproxy's own added), the
    metrics, then a ResponseStream for the body. `on_close(request, outcome)` ends the
    request (the access log line) whichever way the stream ends."""

    def __init__(
        self,
        metrics: Metrics,
        own_answers: OwnAnswers,
        instance_name: str,
        clock: Callable[[], float],
        *,
        on_close: Callable[[Request, Outcome], object],
    ) -> None:
        self.metrics, self.own_answers = metrics, own_answers
        self.instance_name, self.clock, self.on_close = instance_name, clock, on_close

    def start(
        self,
        request: Request,
        outcome: Outcome,
        start_response: StartResponse,
        admission: Admission,
    ) -> Iterable[bytes]:
        """The current attempt's response goes to the client, its body as it arrives."""
        lease = admission.lease
        assert lease is not None and lease.response is not None
        response = lease.response
        outcome.status = response.status
        headers = downstream_response_headers(
            response.headers.items(),
            request_id=request.request_id,
            instance_name=self.instance_name,
        )
        if outcome.set_cookie:
            headers.append(("Set-Cookie", outcome.set_cookie))
        if outcome.explanation is not None:
            outcome.explanation.outcome(str(response.status))
            headers.append(outcome.explanation.header())
        admission.end_retries()  # the budget caps attempts, not streams
        # RFC 9112 §4: the space after the status code stays even when the reason is empty.
        status = f"{response.status} {response.reason or ''}"
        try:
            write = start_response(status, headers)
        except (AssertionError, ValueError) as exc:
            # The server refused this head (waitress: AssertionError for a field it takes
            # for hop-by-hop, ValueError for a bad Content-Length). Nothing went out yet:
            # an invalid response, so a 502 (not a 500) and the backend's failure.
            log.warning(
                "backend %s: response head refused (%s); answering 502", lease.backend.name, exc
            )
            self.metrics.count_error(lease.backend.name, "bad_response", lease.pool)
            lease.judge(failed=True)
            admission.end_attempt()  # discards the upstream connection
            # PEP 3333: a second start_response before any output must carry exc_info.
            exc_info = sys.exc_info()
            return self.own_answers.failed(request, outcome, start_response, HEAD_REFUSED, exc_info)
        if "content-length" not in response.headers:
            # A body of unknown length (server-sent events, a long poll) may not send a
            # byte for a while, and waitress holds the head until the first one: send it
            # now. With a Content-Length the body follows, and the head goes out with its
            # first chunk in one write instead of two.
            write(b"")
        self.metrics.observe_request(
            lease.backend.name, request.method, response.status, self.clock() - request.started,
            lease.pool,
        )  # fmt: skip
        return ResponseStream(
            admission,
            request,
            outcome,
            BodyRelay(lease.take_response()),
            metrics=self.metrics,
            on_close=self.on_close,
            send_head=write,
        )


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
