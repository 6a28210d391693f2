"""The tasks of the edge server: how one response (or one refusal) is written.

waitress runs each request as a Task on a worker thread. pyproxy's tasks change three
things: the response head (no waitress identity; `Connection: close` while draining),
an app that cuts a response short on purpose (AbortResponse: no final chunk, no
traceback), and the errors waitress answers itself (short text, X-Request-ID, and a
report to the access log through `on_refused`). See server.py for the server.
"""

from __future__ import annotations

import logging

from waitress.task import ErrorTask, Task, WSGITask

from pyproxy.config.schema import LimitsConfig
from pyproxy.headers import sane_request_id
from pyproxy.wsgi import AbortResponse, EdgeRefusal

logger = logging.getLogger("pyproxy.edge.server")


class _EdgeHead(Task):
    """Response-head changes shared by app responses and error responses."""

    chunked_response: bool  # waitress's Task attributes, declared for the type checker
    close_on_finish: bool

    def build_response_header(self) -> bytes:
        server = self.channel.server
        if server.draining:
            # As if the client had sent `Connection: close`: waitress then adds that header
            # and closes after this response (RFC 9112 §9.6). An app may not send it itself:
            # waitress refuses hop-by-hop headers from apps (PEP 3333).
            self.request.headers["CONNECTION"] = "close"
        app_sent_server = any(name.lower() == "server" for name, _ in self.response_headers)
        keep_alive = self._may_keep_alive()
        head: bytes = super().build_response_header()
        # waitress adds exactly one header of its own: `Server: <ident>` when the app sent
        # no Server, else `Via: <ident>`. Remove that line; pyproxy sets its own Via.
        own = ("Via: " if app_sent_server else "Server: ") + server.adj.ident
        head = head.replace(f"\r\n{own}\r\n".encode("latin-1"), b"\r\n", 1)
        if self._bodiless():
            head = self._drop_chunked(head)
        if keep_alive and self.close_on_finish and (self.chunked_response or self._bodiless()):
            head = self._keep_open(head)
        return head

    def _bodiless(self) -> bool:
        """RFC 9112 §6.3: answers to HEAD, and 1xx/204/304, end at their head."""
        command = getattr(self.request, "command", None)  # unset when parsing failed
        return command == "HEAD" or self.status[:3] in ("204", "304")

    def _may_keep_alive(self) -> bool:
        """Whether this 1.1 connection stays open, as far as the client and we decide."""
        connection = self.request.headers.get("CONNECTION", "").lower()
        return self.version == "1.1" and connection != "close" and not self.close_on_finish

    def _drop_chunked(self, head: bytes) -> bytes:
        """waitress treats a response without Content-Length as one whose body runs to a
        chunked end: for a bodiless answer it would send a stray `0 CRLF CRLF` after a
        HEAD response, read by the client as the start of the next response. Undo it."""
        if self.chunked_response:
            self.chunked_response = False
            head = head.replace(b"\r\nTransfer-Encoding: chunked\r\n", b"\r\n", 1)
        return head

    def _keep_open(self, head: bytes) -> bytes:
        """waitress closes the connection after every HTTP/1.1 response without a
        Content-Length, even a chunked one or a bodiless one (task.py,
        build_response_header). Both are framed, so the next request can follow on the
        same connection (RFC 9112 §6.3, §9.3), as nginx and HAProxy keep it."""
        self.close_on_finish = False
        return head.replace(b"\r\nConnection: close\r\n", b"\r\n", 1)


class EdgeTask(_EdgeHead, WSGITask):
    """Runs the WSGI app for one request; AbortResponse closes the connection quietly.

    A response cut short must look cut short. With a Content-Length or chunked framing
    the close before the promised end shows it (RFC 9112 §8), and a clean close keeps
    the bytes still in flight (a RST makes the kernel drop them). A close-delimited
    body (an HTTP/1.0 client, which cannot take chunked) ends at the close by
    definition (RFC 9112 §6.3): a clean FIN would present the cut as complete, so
    that connection is reset instead.
    """

    aborted = False
    content_length: int | None  # from the app's Content-Length (waitress's Task)

    def execute(self) -> None:
        try:
            super().execute()
        except AbortResponse as exc:
            logger.debug("response to %s cut short: %s", self.request.path, exc)
            self.aborted = True
            self.close_on_finish = True
            self._reset_if_close_delimited()
        except Exception:
            self._reset_if_close_delimited()  # a bug mid-body cuts it short just as well
            raise

    def _reset_if_close_delimited(self) -> None:
        framed = self.chunked_response or self.content_length is not None
        if self.wrote_header and not framed and not self._bodiless():
            self.channel.reset_on_close = True

    def finish(self) -> None:
        # waitress's finish() would write the last chunk ("0\r\n\r\n") and make the
        # truncated body look complete; an aborted response must end with the connection.
        if not self.aborted:
            super().finish()


class EdgeErrorTask(_EdgeHead, ErrorTask):
    """An error waitress produces itself (400, 413, 431, 500, 501, 505): short text, close."""

    def execute(self) -> None:
        error = self.request.error
        self.status = f"{error.code} {error.reason}"
        body = f"{self.status}: {_plain_reason(error.body, self.channel.server.limits)}".encode()
        # Every answer pyproxy makes itself carries an X-Request-ID, for the client to quote.
        request_id = sane_request_id(self.request.headers.get("X_REQUEST_ID"))
        self.response_headers.append(("Content-Type", "text/plain; charset=utf-8"))
        self.response_headers.append(("X-Request-ID", request_id))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        report = self.channel.server.on_refused
        if report is not None:  # the access log and metrics hear of it too
            try:
                report(
                    EdgeRefusal(
                        peer=str(self.channel.addr[0]),
                        method=str(getattr(self.request, "command", "") or "-"),
                        target=str(getattr(self.request, "request_uri", "") or "-"),
                        status=int(error.code),
                        why=str(error.body),
                        bytes_sent=len(body),
                        request_id=request_id,
                    )
                )
            except Exception:
                logger.exception("reporting a refused request failed")


def _plain_reason(body: str, limits: LimitsConfig) -> str:
    """waitress words its limit errors with its own names and its off-by-one values
    (we pass limit + 1, see EdgeServer); say them in the config's terms instead."""
    if body.startswith("exceeds max_body"):
        return f"body larger than limits.max_request_body ({limits.max_request_body} bytes)"
    if body.startswith("exceeds max_header"):
        size = limits.max_request_header
        return f"header block larger than limits.max_request_header ({size} bytes)"
    return body
