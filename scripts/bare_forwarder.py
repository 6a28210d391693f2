"""The smallest correct forwarder on pyproxy's stack, and the yardstick for its features.

waitress receives; the urllib3 pool owned by a requests Session adapter forwards the
raw target with hop-by-hop headers stripped; the body streams back with `read1`.
No health checks, breaker, retries, metrics, access log or rate limits: what pyproxy
costs above this is what its features cost (scripts/bench.py, candidate "bare").

    python scripts/bare_forwarder.py --listen 127.0.0.1:8091 --backend http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator

import requests
import urllib3
import waitress
from urllib3.util import SKIP_HEADER, Retry

# RFC 9110 §7.6.1: these describe one connection and are not forwarded; "trailers" is
# the RFC 2616 misspelling that PEP 3333 (and so waitress) refuses from an app.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
}
NO_RETRIES = Retry(total=False, redirect=False)  # built once; a forwarder does not retry
TIMEOUT = urllib3.Timeout(connect=2, read=30)


def not_forwarded(connection: str | None) -> set[str]:
    """Hop-by-hop names, plus those the Connection header lists (RFC 9110 §7.6.1)."""
    return HOP_BY_HOP | {t.strip().lower() for t in (connection or "").split(",")}


def make_app(backend: str, threads: int):  # type: ignore[no-untyped-def]
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=threads)
    requests.Session().mount("http://", adapter)
    pool = adapter.poolmanager.connection_from_url(backend)  # the Session's own pool

    def app(environ, start_response) -> Iterable[bytes]:  # type: ignore[no-untyped-def]
        drop = not_forwarded(environ.get("HTTP_CONNECTION")) | {"host"}  # urllib3 sets Host
        headers = {"User-Agent": SKIP_HEADER, "Accept-Encoding": SKIP_HEADER}  # none added
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-").title()  # HTTP_USER_AGENT -> User-Agent
                if name.lower() not in drop:
                    headers[name] = value
        for key, name in (("CONTENT_TYPE", "Content-Type"), ("CONTENT_LENGTH", "Content-Length")):
            if environ.get(key):  # waitress has buffered the whole body already
                headers[name] = environ[key]
        try:
            response = pool.urlopen(
                environ["REQUEST_METHOD"], environ["REQUEST_URI"],  # the raw target, as sent
                body=environ["wsgi.input"] if environ.get("CONTENT_LENGTH") else None,
                headers=headers, retries=NO_RETRIES, redirect=False, timeout=TIMEOUT,
                preload_content=False, decode_content=False, release_conn=False,
            )  # fmt: skip
        except urllib3.exceptions.HTTPError:
            start_response("502 Bad Gateway", [("Content-Type", "text/plain")])
            return [b"502 Bad Gateway: the backend did not answer\n"]
        drop = not_forwarded(response.headers.get("Connection"))
        start_response(
            f"{response.status} {response.reason}",
            [(k, v) for k, v in response.headers.items() if k.lower() not in drop],
        )
        return relay(response)

    return app


def relay(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """Each chunk as soon as the socket has it. A body read to the end gives its
    connection back to the pool by itself; an abandoned one must be closed, because
    the bytes left on it belong to nobody. A backend dying mid-body raises, and
    waitress then cuts the client's connection: the truncation stays visible."""
    try:
        while chunk := response.read1(64 * 1024, decode_content=False):
            yield chunk
    finally:
        if not response.isclosed():  # the client went away, or the backend failed
            response.close()
            response.release_conn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8091", help="host:port")
    parser.add_argument("--backend", required=True, help="e.g. http://127.0.0.1:9001")
    parser.add_argument("--threads", type=int, default=32, help="waitress worker threads")
    args = parser.parse_args()
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" noise
    app = make_app(args.backend, args.threads)
    waitress.serve(app, listen=args.listen, threads=args.threads, connection_limit=1000)


if __name__ == "__main__":
    main()
