"""Route matching: which pool a request goes to, decided from its host and raw path.

The rules, as in the config file's `routes:`:

- Routes are tried in file order; the first that matches wins.
- `host` is matched case-insensitively with the port ignored (`A.Example.COM:8080`
  is `a.example.com`). `*.example.com` stands for exactly one more label:
  `a.example.com`, never `example.com` nor `a.b.example.com` (Caddy's rule).
- `path_prefix` is matched against the raw path as the client sent it, without
  percent-decoding (`/v1%2Fx` is not under `/v1`), and only on a segment boundary:
  `/v1` takes `/v1`, `/v1/`, `/v1/x` and `/v1?q`, never `/v1x`. A prefix ending in
  "/" takes every path that starts with it. The query is never matched.
- Both given: both must match. Neither: every request (a catch-all).

Matching costs O(1) in the number of routes with other hosts: routes are indexed by
exact host, by the parent domain of a wildcard, and the host-less ones kept apart;
a request looks at three short lists, each in file order, and the earliest match
across them (by position in the file) wins, exactly as a linear scan would pick.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyproxy.config.schema import RouteConfig


@dataclass(frozen=True)
class Route:
    """One route, ready to match. `index` is its position in the file (from 0)."""

    index: int
    name: str
    pool: str
    host: str | None  # lower case, no port: "api.example.com" or "*.example.com"
    path_prefix: str | None
    strip_prefix: bool = False

    def matches_path(self, raw_path: str) -> bool:
        """Whether `raw_path` (query included or not) is under this route's prefix."""
        prefix = self.path_prefix
        if prefix is None:
            return True
        if not raw_path.startswith(prefix):
            return False
        if prefix.endswith("/"):
            return True
        # A prefix holds no "?", so it can only have matched inside the path part.
        boundary = raw_path[len(prefix) : len(prefix) + 1]
        return boundary in ("", "/", "?")

    def upstream_path(self, raw_path: str) -> str:
        """The path to send upstream: `raw_path` with the prefix cut off if asked.

        `/v1/users` -> `/users`, `/v1` -> `/`, `/v1?x=1` -> `/?x=1` (as nginx's
        `location /v1/ { proxy_pass http://b/; }`). Only call it on a matching path.
        """
        if not self.strip_prefix or self.path_prefix is None:
            return raw_path
        rest = raw_path[len(self.path_prefix.rstrip("/")) :]
        return rest if rest.startswith("/") else "/" + rest


def request_host(host: str) -> str:
    """A Host header value as routes compare it: lower case, no port, no final dot.

    `A.EXAMPLE.COM:8080` -> `a.example.com`; `[::1]:8080` -> `[::1]`; the final dot of
    a fully qualified name goes, as nginx drops it (`example.com.` is `example.com`).
    """
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    host = host.partition(":")[0]
    return host[:-1] if host.endswith(".") else host


def route_from_config(index: int, config: RouteConfig) -> Route:
    return Route(
        index=index,
        name=config.name,
        pool=config.pool,
        host=config.match.host,
        path_prefix=config.match.path_prefix,
        strip_prefix=config.strip_prefix,
    )


class RouteTable:
    """Routes indexed for matching; build one per config with `RouteTable.build`."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)  # file order
        self._exact: dict[str, list[Route]] = {}  # "api.example.com" -> its routes
        self._wildcard: dict[str, list[Route]] = {}  # "example.com" for "*.example.com"
        self._any_host: list[Route] = []  # routes without `host`
        for route in self.routes:
            if route.host is None:
                self._any_host.append(route)
            elif route.host.startswith("*."):
                self._wildcard.setdefault(route.host[2:], []).append(route)
            else:
                self._exact.setdefault(route.host, []).append(route)

    @classmethod
    def build(cls, routes: Iterable[RouteConfig]) -> RouteTable:
        return cls([route_from_config(index, route) for index, route in enumerate(routes)])

    def match(self, host: str, raw_path: str) -> Route | None:
        """The first route in file order that takes this request, or None (404).

        `host` is the request's host (Host header or absolute-form authority, port
        and case as sent); `raw_path` the request target as sent, query included.
        An empty path counts as "/" (RFC 9110, 4.2.3).
        """
        name = request_host(host)
        path = raw_path or "/"
        label, dot, parent = name.partition(".")
        best = _first(self._exact.get(name, ()), path, None)
        if dot and label:  # "a.example.com" -> the routes of "*.example.com"
            best = _first(self._wildcard.get(parent, ()), path, best)
        return _first(self._any_host, path, best)


def _first(candidates: Iterable[Route], path: str, best: Route | None) -> Route | None:
    """The earliest of `best` and the first of `candidates` (file order) taking `path`."""
    for route in candidates:
        if best is not None and route.index > best.index:
            return best  # every later candidate comes after best in the file too
        if route.matches_path(path):
            return route
    return best
