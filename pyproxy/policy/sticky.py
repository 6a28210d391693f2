"""Sticky sessions: send a client back to the backend it used before (see docs/stickiness.md).

Two ways to remember "before":

- `cookie`: the first response carries `Set-Cookie: <name>=<token>`, where the
  token is a keyed hash of the backend's URL. It names no address, and is the same
  on every pyproxy instance with the same backends and across restarts, so a
  cookie survives a restart and works behind several instances. A cookie that
  matches no available backend (tampered, stale, backend down) is ignored and the
  client is pinned afresh.
- `ip`: rendezvous (highest-random-weight) hashing of the client address over the
  available backends. Every backend gets a pseudo-random score for this client;
  the highest wins. Adding or removing one backend changes only the clients whose
  winner it was (or becomes): about 1/n of them, not all of them as `hash % n` would.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Sequence
from typing import Protocol, TypeVar

from pyproxy.config.schema import StickyConfig
from pyproxy.policy.selection import Candidate


class Pinnable(Candidate, Protocol):
    @property
    def url(self) -> str: ...


B = TypeVar("B", bound=Pinnable)

# Not a secret: it only keeps tokens from being a bare hash of the URL, so they
# cannot be matched against hashes of guessed addresses computed elsewhere.
_TOKEN_KEY = b"pyproxy-sticky-v1"
MAX_COOKIES = 1024  # Set-Cookie values kept per pool (one per backend URL)
_COOKIE_PAIR = re.compile(r"\s*([^=;,\s]+)\s*=\s*([^;,]*)")


@functools.lru_cache(maxsize=1024)
def backend_token(url: str) -> str:
    """The opaque cookie value for the backend at `url`.

    Cached: a cookie-mode pool asks for it on every request (to pin a new client, or
    once per candidate to find a returning one's), and a backend's URL never changes.
    The URLs are the operator's (config and admin API), so the cache stays small."""
    return hashlib.blake2b(url.encode(), key=_TOKEN_KEY, digest_size=9).hexdigest()


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header, or None.

    waitress joins repeated Cookie headers with ", ", so both separators are accepted.
    """
    if not cookie_header:
        return None
    for match in _COOKIE_PAIR.finditer(cookie_header):
        if match.group(1) == name:
            return match.group(2).strip().strip('"')
    return None


def rendezvous_score(key: str, backend: Pinnable) -> float:
    """Weighted rendezvous score (Schindelhauer & Schomaker's logarithmic method):
    -weight / ln(u), with u uniform in (0, 1) from a hash of (key, backend)."""
    digest = hashlib.blake2b(f"{key}|{backend.url}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -max(backend.weight, 1) / math.log(u)


class Sticky:
    """Sticky-session rules for one config. `mode` "none" makes it do nothing."""

    def __init__(self, settings: StickyConfig) -> None:
        self.settings = settings
        self.mode = settings.mode
        # backend URL -> its Set-Cookie value: the same string for every client pinned
        # there, built once instead of per new client (1.06 -> 0.09 us). A reload makes
        # a new Sticky, so changed settings are never served from here; backends added
        # through the admin API can only grow it to MAX_COOKIES.
        self._cookies: dict[str, str] = {}

    def pinned(self, candidates: Sequence[B], cookie_header: str | None, client: str) -> B | None:
        """The backend this client is pinned to, if it is among the candidates."""
        if self.mode == "ip":
            if not candidates:
                return None
            return max(candidates, key=lambda backend: rendezvous_score(client, backend))
        if self.mode == "cookie":
            token = cookie_value(cookie_header, self.settings.cookie_name)
            if token:
                for backend in candidates:
                    if backend_token(backend.url) == token:
                        return backend
        return None

    def set_cookie(self, backend: Pinnable) -> str:
        """The Set-Cookie value that pins a client to `backend`."""
        cookie = self._cookies.get(backend.url)
        if cookie is None:
            cookie = self._build_cookie(backend)
            if len(self._cookies) < MAX_COOKIES:
                self._cookies[backend.url] = cookie  # one dict store: atomic under the GIL
        return cookie

    def _build_cookie(self, backend: Pinnable) -> str:
        parts = [
            f"{self.settings.cookie_name}={backend_token(backend.url)}",
            "Path=/",
            "HttpOnly",
            "SameSite=Lax",
        ]
        if self.settings.cookie_max_age is not None:
            parts.append(f"Max-Age={self.settings.cookie_max_age}")
        return "; ".join(parts)
