"""The WSGI contract between the edge server and the proxy app, and nothing else.

PEP 3333 lets a server and an application agree on very little: the app is a callable
taking an environ and a `start_response`, and returns an iterable of bytes whose
`close()` the server calls however the response ends. pyproxy's edge server and its
proxy app need three more words between them, and they live here:

- `AbortResponse`, which the app raises from its body iterator to cut a response
  short on purpose (the backend died mid-body): the server then ends the connection
  without the final chunk, so the client can tell the body is incomplete (RFC 9112
  §8), and logs no traceback, the app having accounted for the failure;
- `EdgeRefusal`, the record of a request the server refused before any app ran
  (400, 413, 431, ...), handed to the app so the access log and metrics hear of it;
- `StartResponse` and `ExcInfo`, the types of PEP 3333's `start_response` and of
  its optional third argument.

Why a module of its own: the request path (pyproxy.proxy) must not know which server
runs it, and the server must not know the request path. Both import this leaf, which
imports nothing of pyproxy, so either side can be replaced or tested alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = ["AbortResponse", "EdgeRefusal", "ExcInfo", "StartResponse"]

# PEP 3333: start_response(status, response_headers, exc_info=None) -> write(bytes).
StartResponse = Callable[..., Any]
# What sys.exc_info() returns; PEP 3333 requires it on a second start_response call.
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class AbortResponse(Exception):
    """Raised by the app's body iterator to cut a response short on purpose, e.g. the
    backend died mid-body, so the client sees a truncated response.

    The server closes the connection without the end of the body (no final chunk) and
    logs nothing as an error: the app has already accounted for the failure.
    """


@dataclass(frozen=True, slots=True)
class EdgeRefusal:
    """A request the server refused before any app ran, as the access log needs it."""

    peer: str
    method: str
    target: str
    status: int
    why: str
    bytes_sent: int
    request_id: str
