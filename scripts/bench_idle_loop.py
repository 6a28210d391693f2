"""What idle keep-alive connections cost the edge server's loop, in-process, without wrk.

Serves a tiny WSGI app on an EdgeServer, then times N requests on one keep-alive
connection, first with no other connection open and then with `--idle` idle keep-alive
connections open (each made one request first). Prints the wall time and the process
CPU time per request, and the ratio with/without. Each measurement runs `--rounds`
times; the median is reported (the machine may be shared).

    python scripts/bench_idle_loop.py                  # 2,000 requests, 1,000 idle, 3 rounds
    python scripts/bench_idle_loop.py --requests 500 --idle 300 --rounds 1
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from pyproxy.config.schema import LimitsConfig
from pyproxy.edge.server import EdgeServer

BODY = b"x" * 1024
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "1024")])
    return [BODY]


def one_request(sock: socket.socket) -> None:
    """Send a GET on a kept-alive socket and read the whole 1 KiB answer."""
    sock.sendall(REQUEST)
    data = b""
    while not (b"\r\n\r\n" in data and len(data.partition(b"\r\n\r\n")[2]) >= len(BODY)):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk


def timed(address: tuple[str, int], requests: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per request, over `requests` on one connection."""
    with socket.create_connection(address, timeout=10) as sock:
        for _ in range(50):  # warm up
            one_request(sock)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            one_request(sock)
        return (time.perf_counter() - wall) / requests, (time.process_time() - cpu) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * args.idle + 200:  # both ends of every idle connection live here
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * args.idle + 200), hard))
    limits = LimitsConfig(max_connections=args.idle + 50, client_idle_timeout=600)
    server = EdgeServer(app, "127.0.0.1", 0, threads=4, limits=limits, name="bench")
    loop = threading.Thread(target=server.serve_forever, name="bench-loop")
    loop.start()
    idle: list[socket.socket] = []
    rows: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    try:
        for _ in range(args.rounds):
            rows["without"].append(timed(server.address, args.requests))
            for _ in range(args.idle - len(idle)):
                sock = socket.create_connection(server.address, timeout=10)
                idle.append(sock)
                one_request(sock)
            rows["with"].append(timed(server.address, args.requests))
            for sock in idle:
                sock.close()
            idle.clear()
            for _ in range(500):  # let the loop see them go before the next round
                if server.open_connections() == 0:
                    break
                time.sleep(0.01)
    finally:
        for sock in idle:
            sock.close()
        server.close()
        loop.join(10)
    wall = {k: statistics.median(w for w, _ in v) for k, v in rows.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in rows.items()}
    for kind in ("without", "with"):
        print(
            f"{kind:>7} {args.idle if kind == 'with' else 0:>5} idle: "
            f"{wall[kind] * 1e6:7.1f} us/request wall, {cpu[kind] * 1e6:7.1f} us/request CPU "
            f"(median of {args.rounds}: "
            + ", ".join(f"{w * 1e6:.0f}" for w, _ in rows[kind])
            + " us wall)"
        )
    print(
        f"ratio with/without: wall {wall['with'] / wall['without']:.2f}x, "
        f"CPU {cpu['with'] / cpu['without']:.2f}x"
    )


if __name__ == "__main__":
    main()
