"""The reference "naive" proxy: the obvious way to write a Python reverse proxy.

waitress serves a WSGI app; the app forwards each request with one shared
`requests.Session` (connection pooling on, pool sized to the thread count) through
`Session.request(...)` and streams the answer back with `iter_content`. Nothing here
is sabotaged: it is what a competent engineer writes in an afternoon, and it is the
yardstick scripts/bench.py measures pyproxy against.

    python scripts/naive_proxy.py --listen 127.0.0.1:8090 --backend http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable

import requests
import waitress

# RFC 9110 §7.6.1: hop-by-hop headers are not forwarded (waitress also refuses them).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
}


def make_app(backend: str, threads: int):
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=threads)
    session.mount("http://", adapter)

    def app(environ, start_response) -> Iterable[bytes]:
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"] if length else None  # requests sends Content-Length
        url = backend + environ.get("REQUEST_URI", environ["PATH_INFO"])
        upstream = session.request(
            environ["REQUEST_METHOD"],
            url,
            headers=headers,
            data=body,
            stream=True,
            allow_redirects=False,
            timeout=(2, 30),
        )
        start_response(
            f"{upstream.status_code} {upstream.reason}",
            [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP],
        )
        return upstream.iter_content(chunk_size=65536)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8090", help="host:port")
    parser.add_argument("--backend", required=True, help="e.g. http://127.0.0.1:9001")
    parser.add_argument("--threads", type=int, default=32, help="waitress worker threads")
    parser.add_argument(
        "--connection-limit", type=int, default=1000, help="open client connections"
    )
    args = parser.parse_args()
    # waitress warns "Task queue depth is N" on stderr under load; quiet it, as anyone would.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    waitress.serve(
        make_app(args.backend.rstrip("/"), args.threads),
        listen=args.listen,
        threads=args.threads,
        connection_limit=args.connection_limit,
        _quiet=True,
    )


if __name__ == "__main__":
    main()
