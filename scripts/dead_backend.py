#!/usr/bin/env python3
"""scripts/dead_backend.py: what does a backend dying under load cost the clients?

One command, about 15 seconds, loopback only:

    python scripts/dead_backend.py                  # 32 client threads, 10 ms backends
    python scripts/dead_backend.py --threads 8 --delay 0.05 --seconds 20

What runs (every process on 127.0.0.1, ephemeral ports):

    client threads (GET /) -> pyproxy (a real `python -m pyproxy`, default settings:
                              health checks, circuit breaker, 2 retries, budget 20%)
                           -> app1, app2, app3 (each its own Python process, each
                              request taking --delay seconds of "work")

After a third of the run, app2 is killed with SIGKILL. Its requests in flight see
their connection closed before the response (`reset`: the request was sent, so a
GET's retry needs a retry-budget token); every new request to it is refused
(`connect_error`: nothing was sent, so its retry needs no token) until its circuit
opens. It prints the requests sent, the client errors and their kinds, the proxy's
own account of each failure (its access log says why no retry followed), and stops
every process it started, by PID, also on Ctrl-C.

Measured on a 2-core machine shared with other work (3 runs each):
  --delay 0.01, 32 threads: before connect errors bypassed the budget, 1, 1, 0 client
    errors ("connection refused; no retry: retry budget spent"); after, 0, 0, 0.
  --delay 0.05, 32 threads: 2-3 errors before and after, all resets of requests in
    flight at the kill ("no retry: retry budget spent"): about a third of 32
    requests fail at once, more than 20% of the requests in flight may retry.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import requests

ROOT = Path(__file__).resolve().parent.parent
MAX_REQUESTS_PER_THREAD = 20_000  # a bound on the load, whatever the machine's speed

# A backend small enough to read at a glance: 200 "ok" to everything, /health included.
BACKEND = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DELAY = float(sys.argv[1])  # seconds of "work" per request

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path != "/health":
            time.sleep(DELAY)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""

CONFIG = """\
listen: "127.0.0.1:{proxy_port}"
admin:
  listen: "127.0.0.1:{admin_port}"
access_log:
  format: json
  path: "{access_log}"
backends:
{backends}
"""


def start_backend(delay: float) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, "-c", BACKEND, str(delay)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline())
    return process, port


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; pyproxy binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_proxy(config_path: str, admin_url: str, log: IO[str]) -> subprocess.Popen[bytes]:
    """A real pyproxy process; returns once its admin listener says it is ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pyproxy", "-c", config_path, "--log-level", "WARNING"],
        cwd=ROOT,
        stderr=log,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if requests.get(admin_url + "/readyz", timeout=1).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("pyproxy was not ready within 15 s")


def describe(reply: requests.Response) -> str:
    text = " ".join(reply.text.split())[:80]
    return f"{reply.status_code} {text}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--delay", type=float, default=0.01, help="backend time per request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dead_backend-") as workdir:
        errors = run(Path(workdir), args.threads, args.seconds, args.delay)
        report(Path(workdir))
    return 0 if not errors else 1


def run(workdir: Path, threads: int, seconds: float, delay: float) -> int:
    """The experiment; returns the number of client errors. Stops every process."""
    processes: list[subprocess.Popen[Any]] = []
    try:
        ports = []
        for _ in range(3):
            process, port = start_backend(delay)
            processes.append(process)
            ports.append(port)
        backends = "\n".join(
            f"  - url: http://127.0.0.1:{port}\n    name: app{i}" for i, port in enumerate(ports, 1)
        )
        proxy_port, admin_port = free_port(), free_port()
        config_path = workdir / "pyproxy.yaml"
        config_path.write_text(
            CONFIG.format(
                backends=backends, proxy_port=proxy_port, admin_port=admin_port,
                access_log=workdir / "access.log",
            )
        )  # fmt: skip
        url = f"http://127.0.0.1:{proxy_port}"
        with (workdir / "pyproxy.log").open("w") as proxy_log:
            proxy = start_proxy(str(config_path), f"http://127.0.0.1:{admin_port}", proxy_log)
        processes.append(proxy)
        print(f"pyproxy at {url}, backends on ports {ports} ({delay * 1000:.0f} ms per "
              f"request); {threads} client threads for {seconds:.0f} s")  # fmt: skip

        stop = threading.Event()
        lock = threading.Lock()
        sent = [0]
        errors: collections.Counter[str] = collections.Counter()

        def load() -> None:
            with requests.Session() as session:
                session.trust_env = False
                for _ in range(MAX_REQUESTS_PER_THREAD):
                    if stop.is_set():
                        return
                    try:
                        reply = session.get(url + "/", timeout=10)
                        error = None if reply.status_code == 200 else describe(reply)
                    except requests.RequestException as exc:
                        error = type(exc).__name__
                    with lock:
                        sent[0] += 1
                        if error is not None:
                            errors[error] += 1

        clients = [threading.Thread(target=load, daemon=True) for _ in range(threads)]
        for client in clients:
            client.start()
        time.sleep(seconds / 3)
        with lock:
            before_kill = sent[0]
        victim = processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=5)
        print(f"killed app2 (pid {victim.pid}) with SIGKILL after {before_kill} requests")
        time.sleep(seconds * 2 / 3)
        stop.set()
        for client in clients:
            client.join(timeout=15)
        print(f"requests: {sent[0]}")
        print(f"client errors: {sum(errors.values())}")
        for kind, count in errors.most_common():
            print(f"  {count:6d}  {kind}")
        return sum(errors.values())
    finally:
        for process in processes:  # SIGTERM: pyproxy drains and flushes its access log
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)


def report(workdir: Path) -> None:
    """The proxy's own account: why each failed request failed (the access log's
    `detail`, e.g. "retry budget spent"), and what it logged about the backends."""
    lines = (workdir / "access.log").read_text().splitlines()
    reasons = collections.Counter(
        f"{entry['status']} {entry.get('detail') or ''}".strip()
        for entry in map(json.loads, lines)
        if entry["status"] != 200
    )
    for reason, count in reasons.most_common():
        print(f"  {count:6d}  access log: {reason}")
    for line in (workdir / "pyproxy.log").read_text().splitlines():
        if " pyproxy." in line:  # the proxy's own loggers, not waitress's queue depth
            print(f"  log: {line.split(' ', 2)[2]}")


if __name__ == "__main__":
    sys.exit(main())
