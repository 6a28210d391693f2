#!/usr/bin/env python3
"""scripts/bench_scale.py: how pyproxy behaves as things get big (issue 3, item 3).

    python scripts/bench_scale.py            # every part, a few minutes
    python scripts/bench_scale.py --quick    # smaller sizes, a smoke run
    python scripts/bench_scale.py --parts selection,limiter --json scale.json
    python scripts/bench_scale.py --parts routes

Parts:

  client     CPU per request of each client layer alone (requests' Session, urllib3's
             pool, http.client), one thread against nginx: what the convenience costs.
  routes     per-request cost of route matching with 2 and 1,000 routes: host routes
             (indexed, so the cost should not grow) and path-only routes (tried in
             file order, so it does), each against a linear first-match scan.
  selection  per-pick cost of every strategy with 2, 100 and 1,000 backends: the
             policy alone (`choose`), and the whole per-request path (filter the
             available backends, then choose) on real `Backend` objects.
  limiter    the per-client limiter fed 1M distinct client keys: memory and cost
             per check as the table fills, with the default `max_clients` bound.
  stream     the proxy's RSS while a 1 GiB response and a 1 GiB upload go through it
             (generated on the fly, never a file on disk), next to the naive proxy.
  idle       1,000 idle keep-alive client connections held open while wrk loads the
             proxy: are the load and the idle connections both still served?

Parts that need a pyproxy module that does not exist yet say so and are skipped.
Every process started is stopped by PID, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import http.server
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the helpers of scripts/bench.py (processes, /proc, wrk, nginx)

sys.path.insert(0, str(bench.REPO))
MIB, GIB = bench.MIB, 1024 * bench.MIB


def say(line: str = "") -> None:
    print(line, flush=True)


def time_per_call(fn: Callable[[], object], budget_s: float = 0.3) -> float:
    """Seconds per call of `fn`, timed over about `budget_s` (at least 100 calls)."""
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(100):
            fn()
        calls += 100
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return elapsed / calls


# ---------------------------------------------------------------------------
# Part 1: selection with 2, 100 and 1,000 backends.
# ---------------------------------------------------------------------------


@dataclass
class FakeBackend:
    """Just what a selection policy may look at (pyproxy.policy.selection.Candidate)."""

    name: str
    weight: int
    in_flight: int


def part_selection(results: dict[str, Any]) -> None:
    say("\n== selection: cost per pick, by strategy and number of backends ==")
    try:
        from pyproxy.policy.selection import SELECTORS
    except ImportError as exc:
        say(f"selection: pyproxy.policy.selection not available yet ({exc}); skipped")
        return
    full_path = full_path_runtimes()
    if isinstance(full_path, str):
        say(f"(whole per-request path not measured: {full_path})")
    say(f"{'strategy':<18}{'backends':>9}{'choose() us':>14}{'filter+choose us':>18}")
    rows = []
    for strategy, selector_class in SELECTORS.items():
        for n in (2, 100, 1000):
            fakes = [FakeBackend(f"b{i}", 1 + i % 3, i % 5) for i in range(n)]
            selector = selector_class()
            choose_s = time_per_call(lambda s=selector, f=fakes: s.choose(f))
            whole_s = None
            if not isinstance(full_path, str):
                runtime = full_path(strategy, n)
                whole_s = time_per_call(lambda r=runtime: r.selector.choose(r.candidates()))
            shown = f"{whole_s * 1e6:18.2f}" if whole_s is not None else f"{'-':>18}"
            say(f"{strategy:<18}{n:>9}{choose_s * 1e6:14.2f}{shown}")
            rows.append(
                {
                    "strategy": strategy,
                    "backends": n,
                    "choose_us": choose_s * 1e6,
                    "filter_and_choose_us": whole_s * 1e6 if whole_s else None,
                }
            )
    results["selection"] = rows


def full_path_runtimes() -> Callable[[str, int], Any] | str:
    """A factory of real pyproxy Runtimes with n backends, or why there is none."""
    try:
        from pyproxy.config.load import parse_config
        from pyproxy.runtime.snapshot import build_runtime
    except ImportError as exc:
        return f"pyproxy.runtime.snapshot/configload not available yet ({exc})"

    def make(strategy: str, n: int) -> Any:
        config = parse_config(
            {
                "strategy": strategy,
                "health_check": {"enabled": False},
                "backends": [
                    {"url": f"http://127.0.0.1:{10000 + i}", "weight": 1 + i % 3} for i in range(n)
                ],
            },
            env={},
        )
        runtime, _ = build_runtime(config)
        return runtime

    try:
        make("round_robin", 2)
    except Exception as exc:  # the API is young; report rather than crash
        return f"building a Runtime failed: {exc!r}"
    return make


# ---------------------------------------------------------------------------
# Part 1b: route matching with 2 and 1,000 routes.
# ---------------------------------------------------------------------------


def route_lists(n: int) -> dict[str, tuple[list[Any], list[tuple[str, str]]]]:
    """Route lists of about `n` routes and the requests to time against them."""
    from pyproxy.config.schema import RouteConfig, RouteMatch

    def route(i: int, host: str | None = None, prefix: str | None = None) -> RouteConfig:
        return RouteConfig(name=f"r{i}", pool="p", match=RouteMatch(host, prefix))

    hosts = [route(i, host=f"svc{i}.example.com", prefix="/v1") for i in range(n - 2)]
    hosts += [route(n - 2, host="*.example.com"), route(n - 1)]
    paths = [route(i, prefix=f"/p{i}") for i in range(n - 1)] + [route(n - 1)]
    last = max(n - 3, 0)
    return {
        "by host": (
            hosts,
            [
                (f"svc{last}.example.com:8080", "/v1/users?x=1"),  # the last exact host
                ("other.example.com", "/"),  # falls to the wildcard
                ("elsewhere.org", "/"),  # falls to the catch-all
            ],
        ),
        "by path only": (paths, [("h", f"/p{n - 2}/x"), ("h", "/nothing")]),
    }


def linear_match(routes: list[Any], host: str, path: str) -> Any:
    """The obvious way: try every route in order (what the index avoids)."""
    name = host.lower().partition(":")[0]
    for config in routes:
        pattern, prefix = config.match.host, config.match.path_prefix
        if pattern is not None and not (
            name == pattern or (pattern.startswith("*.") and name.partition(".")[2] == pattern[2:])
        ):
            continue
        if prefix is not None and not (
            path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("", "/", "?")
        ):
            continue
        return config
    return None


def part_routes(results: dict[str, Any]) -> None:
    say("\n== routes: cost per match, by number of routes ==")
    try:
        from pyproxy.policy.routes import RouteTable
    except ImportError as exc:
        say(f"routes: pyproxy.policy.routes not available yet ({exc}); skipped")
        return
    say(f"{'routes':>7}  {'kind':<13}{'request':<42}{'table us':>9}{'linear us':>11}")
    rows = []
    for n in (2, 1000):
        for kind, (routes, requests) in route_lists(n).items():
            table = RouteTable.build(routes)
            for host, path in requests:
                table_s = time_per_call(lambda t=table, h=host, p=path: t.match(h, p))
                linear_s = time_per_call(lambda r=routes, h=host, p=path: linear_match(r, h, p))
                shown = f"{host} {path}"[:40]
                say(f"{n:>7}  {kind:<13}{shown:<42}{table_s * 1e6:9.2f}{linear_s * 1e6:11.2f}")
                rows.append(
                    {
                        "routes": n,
                        "kind": kind,
                        "host": host,
                        "path": path,
                        "table_us": table_s * 1e6,
                        "linear_us": linear_s * 1e6,
                    }
                )
    results["routes"] = rows


# ---------------------------------------------------------------------------
# Part 0: what each layer of the upstream client costs, one thread, no proxy.
# ---------------------------------------------------------------------------


def part_client(
    results: dict[str, Any],
    procs: bench.Processes,
    workdir: Path,
    cpus: tuple[int | None, int | None],
    requests_n: int,
) -> None:
    """CPU per request of the client libraries alone: requests' Session (as the naive
    proxy uses it), urllib3's pool (as pyproxy's hot path does), plain http.client."""
    import requests
    import urllib3

    say(f"\n== client: CPU per GET of 1 KiB from nginx, one thread, {requests_n:,} requests ==")
    (workdir / "client-backend").mkdir()
    nginx = bench.find_or_install("nginx", "nginx-light", required=False)
    backend = bench.start_backend(procs, workdir / "client-backend", nginx, cpus[1])
    url = backend.url + "/1k"
    host, port = backend.url.removeprefix("http://").split(":")

    def cpu_us(fetch: Callable[[], bytes]) -> float:
        for _ in range(200):
            fetch()
        start = time.process_time()
        for _ in range(requests_n):
            fetch()
        return (time.process_time() - start) / requests_n * 1e6

    session = requests.Session()
    quiet = requests.Session()
    quiet.trust_env = False
    pool = urllib3.HTTPConnectionPool(host, int(port), maxsize=1)
    conn = http.client.HTTPConnection(host, int(port))

    def by_urllib3() -> bytes:
        resp = pool.urlopen("GET", "/1k", preload_content=False, decode_content=False)
        body = resp.read1(65536) + resp.read()  # what a streaming relay does
        resp.release_conn()
        return body

    def by_http_client() -> bytes:
        conn.request("GET", "/1k")
        return conn.getresponse().read()

    env_size = len(os.environ)
    rows = [
        (
            f"requests Session.get, trust_env on ({env_size} env vars)",
            lambda: session.get(url).content,
        ),
        ("requests Session.get, trust_env off", lambda: quiet.get(url).content),
        (
            "requests Session.request(stream=True) + iter_content, trust_env off",
            lambda: b"".join(quiet.request("GET", url, stream=True).iter_content(65536)),
        ),
        ("urllib3 HTTPConnectionPool.urlopen, preload_content=False", by_urllib3),
        ("http.client.HTTPConnection", by_http_client),
    ]
    old_affinity = os.sched_getaffinity(0)
    if cpus[0] is not None:
        os.sched_setaffinity(0, {cpus[0]})  # alone on a CPU, nginx on the other
    try:
        measured = [(label, cpu_us(fetch)) for label, fetch in rows]
    finally:
        os.sched_setaffinity(0, old_affinity)
        procs.stop(backend.proc)
    floor = measured[-1][1]
    for label, us in measured:
        say(f"{label:<70}{us:8.0f} us  {us / floor:5.2f}x http.client")
    results["client"] = [{"client": label, "cpu_us_per_request": us} for label, us in measured]


# ---------------------------------------------------------------------------
# Part 2: the per-client limiter with 1M distinct keys.
# ---------------------------------------------------------------------------


def part_limiter(results: dict[str, Any], keys: int) -> None:
    say(f"\n== limiter: {keys:,} distinct client keys ==")
    try:
        from pyproxy.config.schema import Rate
        from pyproxy.policy.ratelimit import MemoryClientLimiter
    except ImportError as exc:
        say(f"limiter: pyproxy.policy.ratelimit not available yet ({exc}); skipped")
        return
    rows = []
    # (rate, max_clients): a typical rate with the default bound; then the worst case
    # for memory, a rate so slow that no bucket refills (and so none may be dropped as
    # "full") during the run, with the default bound and with room for every key.
    for rate, max_clients in (
        (Rate(100, 60.0), 100_000),
        (Rate(1, 3600.0), 100_000),
        (Rate(1, 3600.0), keys),
    ):
        gc.collect()
        rss_before = bench.memory_kib(os.getpid(), "VmRSS")
        limiter = MemoryClientLimiter(rate, None, max_clients)
        step = max(keys // 10, 1)
        per_check_us = []
        mark = time.perf_counter()
        for i in range(keys):
            limiter.check(f"203.0.{i >> 16}.{i & 0xFFFF}:{i}")
            if (i + 1) % step == 0:
                now = time.perf_counter()
                per_check_us.append((now - mark) / step * 1e6)
                mark = now
        gc.collect()
        rss_after = bench.memory_kib(os.getpid(), "VmRSS")
        hot = time_per_call(lambda lim=limiter: lim.check("203.0.0.1:1"))
        row = {
            "rate": str(rate),
            "max_clients": max_clients,
            "keys": keys,
            "table_size": len(limiter),
            "rss_growth_mib": (rss_after - rss_before) / 1024,
            "check_us_first_tenth": per_check_us[0],
            "check_us_last_tenth": per_check_us[-1],
            "check_us_known_key": hot * 1e6,
            "evicted_active": getattr(limiter, "evicted_active", None),
        }
        rows.append(row)
        say(
            f"rate {row['rate']:<10} max_clients={max_clients:>9,}: table holds "
            f"{row['table_size']:,} buckets, RSS grew {row['rss_growth_mib']:.0f} MiB; "
            f"check() {row['check_us_first_tenth']:.1f} us (first tenth of the keys) -> "
            f"{row['check_us_last_tenth']:.1f} us (last tenth), "
            f"{row['check_us_known_key']:.1f} us for a known key"
        )
        del limiter
    results["limiter"] = rows


# ---------------------------------------------------------------------------
# A backend that generates and swallows big bodies (no file on disk).
# ---------------------------------------------------------------------------


def serve_stream_backend(port: int) -> None:
    """GET /stream/<n>: n generated bytes. POST /upload: read and drop the body
    (Content-Length or chunked), answer JSON with its size and when its first and
    last bytes arrived. GET /health, GET /1k: small answers."""
    block = memoryview(bytes(range(256)) * 4096)  # 1 MiB of a pattern

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.startswith("/stream/"):
                size = int(self.path.rsplit("/", 1)[1])
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                while size > 0:
                    chunk = block[: min(size, len(block))]
                    self.wfile.write(chunk)
                    size -= len(chunk)
                return
            body = b"x" * 1024 if self.path == "/1k" else b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            first = last = None
            received = 0
            for chunk in self._body_chunks():
                now = time.time()
                first = first or now
                last = now
                received += len(chunk)
            body = json.dumps(
                {"bytes": received, "first_byte_at": first, "last_byte_at": last}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body_chunks(self) -> Iterator[bytes]:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return
                    left = size
                    while left:
                        chunk = self.rfile.read(min(left, MIB))
                        left -= len(chunk)
                        yield chunk
                    self.rfile.readline()  # the CRLF after each chunk
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, MIB))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


# ---------------------------------------------------------------------------
# Starting a proxy (pyproxy or naive) in front of a backend.
# ---------------------------------------------------------------------------


def pyproxy_available() -> str | None:
    """None if `python -m pyproxy --check` runs at all, else the reason."""
    probe = Path(tempfile.mkdtemp(prefix="pyproxy-scale-check-")) / "c.yaml"
    probe.write_text('{"backends": []}\n')
    problem = bench.pyproxy_check(probe)
    probe.unlink()
    probe.parent.rmdir()
    return problem


def start_proxy(
    kind: str,
    backend_url: str,
    procs: bench.Processes,
    workdir: Path,
    cpu: int | None,
    extra: dict[str, Any] | None = None,
) -> tuple[Any, str]:
    """Start pyproxy or the naive proxy in front of `backend_url`; (process, base URL)."""
    listen = f"127.0.0.1:{bench.free_port()}"
    if kind == "naive":
        argv = [
            sys.executable,
            str(bench.REPO / "scripts" / "naive_proxy.py"),
            "--listen",
            listen,
            "--backend",
            backend_url,
            "--threads",
            "32",
            "--connection-limit",
            "2000",
        ]
    else:
        config = {
            "listen": listen,
            "threads": 32,
            "admin": {"listen": f"127.0.0.1:{bench.free_port()}"},
            "backends": [{"url": backend_url}],
            "access_log": {"enabled": False},
            **(extra or {}),
        }
        path = workdir / f"pyproxy-{bench.free_port()}.yaml"
        path.write_text(json.dumps(config, indent=2))
        argv = [sys.executable, "-m", "pyproxy", "-c", str(path)]
    proc = procs.start(
        argv,
        cpu=cpu,
        env=bench.proxy_environment(),
        log=workdir / f"{kind}-{listen.rsplit(':', 1)[1]}.out",
    )
    bench.wait_http(f"http://{listen}/health", 30, proc)
    return proc, listen


class Sampler:
    """Samples a process's RSS (and bytes in deleted temp files) every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kib = 0
        self.peak_tempfile_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_rss_kib = max(self.peak_rss_kib, bench.memory_kib(self.pid, "VmRSS"))
                self.peak_tempfile_bytes = max(
                    self.peak_tempfile_bytes, deleted_file_bytes(self.pid)
                )
            except OSError:
                return


def deleted_file_bytes(pid: int) -> int:
    """Bytes in files `pid` holds open that are already unlinked (tempfile.TemporaryFile,
    which is where waitress spools request bodies)."""
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).endswith("(deleted)"):
                total += os.stat(fd).st_size
        except OSError:
            continue
    return total


# ---------------------------------------------------------------------------
# Part 3: a 1 GiB response and a 1 GiB upload through the proxy.
# ---------------------------------------------------------------------------


def download(base: str, size: int) -> dict[str, Any]:
    host, port = base.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    start = time.perf_counter()
    conn.request("GET", f"/stream/{size}")
    resp = conn.getresponse()
    buffer = bytearray(MIB)
    received = 0
    while True:
        n = resp.readinto(buffer)
        if not n:
            break
        received += n
    conn.close()
    seconds = time.perf_counter() - start
    return {
        "status": resp.status,
        "bytes": received,
        "seconds": seconds,
        "mb_per_s": received / seconds / 1e6,
    }


def upload(base: str, size: int) -> dict[str, Any]:
    host, port = base.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    block = memoryview(bytes(range(256)) * 4096)
    start = time.perf_counter()
    conn.putrequest("POST", "/upload")
    conn.putheader("Content-Length", str(size))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.endheaders()
    left = size
    try:
        while left:
            chunk = block[: min(left, len(block))]
            conn.send(chunk)
            left -= len(chunk)
    except OSError as exc:  # the proxy may refuse the body early (413) and close
        sent_error = repr(exc)
    else:
        sent_error = None
    sent_at = time.time()
    resp = conn.getresponse()
    body = resp.read()
    seconds = time.perf_counter() - start
    conn.close()
    result: dict[str, Any] = {
        "status": resp.status,
        "seconds": seconds,
        "sent_bytes": size - left,
        "send_error": sent_error,
    }
    if resp.status == 200:
        info = json.loads(body)
        result["backend_bytes"] = info["bytes"]
        if info["first_byte_at"]:
            # > 0: the backend saw the first byte only after the client had sent the last.
            result["backend_first_byte_after_client_done_s"] = info["first_byte_at"] - sent_at
    else:
        result["answer"] = body[:200].decode(errors="replace")
    return result


def part_stream(
    results: dict[str, Any],
    size: int,
    procs: bench.Processes,
    workdir: Path,
    cpus: tuple[int | None, int | None],
    kinds: list[str],
) -> None:
    say(f"\n== stream: {size / GIB:g} GiB response and {size / GIB:g} GiB upload ==")
    port = bench.free_port()
    backend = procs.start(
        [sys.executable, __file__, "--serve-stream-backend", str(port)],
        cpu=cpus[1],
        log=workdir / "stream-backend.out",
    )
    bench.wait_http(f"http://127.0.0.1:{port}/health", 15, backend)
    rows = []
    for kind in kinds:
        # Room for the upload: the default max_request_body (10 MiB) would answer 413.
        extra = {
            "limits": {"max_request_body": f"{2 * size}"},
            "timeouts": {"total": "10m", "read": "60s"},
        }
        proc, listen = start_proxy(kind, f"http://127.0.0.1:{port}", procs, workdir, cpus[0], extra)
        try:
            baseline = bench.memory_kib(proc.pid, "VmRSS")
            with Sampler(proc.pid) as down_sampler:
                down = download(listen, size)
            with Sampler(proc.pid) as up_sampler:
                up = upload(listen, size)
        finally:
            procs.stop(proc)
        row = {
            "proxy": kind,
            "baseline_rss_mib": baseline / 1024,
            "download": {**down, "peak_rss_mib": down_sampler.peak_rss_kib / 1024},
            "upload": {
                **up,
                "peak_rss_mib": up_sampler.peak_rss_kib / 1024,
                "peak_spooled_mib": up_sampler.peak_tempfile_bytes / MIB,
            },
        }
        rows.append(row)
        d, u = row["download"], row["upload"]
        say(
            f"{kind:<8} idle RSS {row['baseline_rss_mib']:.0f} MiB | download: {d['status']}, "
            f"{d['bytes'] / MIB:.0f} MiB, peak RSS {d['peak_rss_mib']:.0f} MiB, "
            f"{d['mb_per_s']:.0f} MB/s"
        )
        say(
            f"{'':<8} upload: {u['status']}, peak RSS {u['peak_rss_mib']:.0f} MiB, "
            f"spooled to temp files {u['peak_spooled_mib']:.0f} MiB, backend got "
            f"{u.get('backend_bytes', 0) / MIB:.0f} MiB"
            + (
                f", its first byte {u['backend_first_byte_after_client_done_s']:+.2f} s after "
                "the client sent its last"
                if "backend_first_byte_after_client_done_s" in u
                else ""
            )
            + (f"; answer: {u['answer']!r}" if "answer" in u else "")
        )
    procs.stop(backend)
    results["stream"] = rows


# ---------------------------------------------------------------------------
# Part 4: 1,000 idle client connections plus load.
# ---------------------------------------------------------------------------


def one_request(sock: socket.socket) -> int:
    """Send GET /1k on a kept-alive socket, read the whole answer, return its status."""
    sock.sendall(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return int(head.split(b" ", 2)[1])


def part_idle(
    results: dict[str, Any],
    idle: int,
    seconds: int,
    procs: bench.Processes,
    workdir: Path,
    cpus: tuple[int | None, int | None],
    kinds: list[str],
    tools: dict[str, str],
) -> None:
    say(f"\n== idle: {idle:,} idle keep-alive client connections plus wrk at c=16 ==")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < idle + 500:  # our sockets; the proxy inherits the raised limit too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, idle + 1000), hard))
    (workdir / "idle-backend").mkdir()
    nginx = bench.find_or_install("nginx", "nginx-light", required=False)
    backend = bench.start_backend(procs, workdir / "idle-backend", nginx, cpus[1])
    script = workdir / "summary.lua"
    script.write_text(bench.WRK_SCRIPT)
    rig = bench.Rig(tools["wrk"], script, cpus[0], cpus[1], procs)
    rows = []
    for kind in kinds:
        # max_connections: room for the idle ones *and* the load (the default is 1,000).
        extra = {"limits": {"max_connections": idle + 200, "client_idle_timeout": "10m"}}
        proc, listen = start_proxy(kind, backend.url, procs, workdir, cpus[0], extra)
        sockets: list[socket.socket] = []
        try:
            base = f"http://{listen}/1k"
            alone = bench.run_wrk(rig, base, 16, seconds, proc.pid)
            opened = failed_open = 0
            for _ in range(idle):
                try:
                    host, port = listen.split(":")
                    sock = socket.create_connection((host, int(port)), timeout=10)
                    sockets.append(sock)
                    if one_request(sock) == 200:
                        opened += 1
                    else:
                        failed_open += 1
                except OSError:
                    failed_open += 1
            threads_with_idle = thread_count(proc.pid)
            loaded = bench.run_wrk(rig, base, 16, seconds, proc.pid)
            still_served = 0
            for sock in sockets:
                with contextlib.suppress(OSError):
                    still_served += one_request(sock) == 200
            alive = proc.poll() is None
            rss = bench.memory_kib(proc.pid, "VmHWM") / 1024 if alive else None
        finally:
            for sock in sockets:
                sock.close()
            procs.stop(proc)
        row = {
            "proxy": kind,
            "idle_requested": idle,
            "idle_opened_and_served": opened,
            "idle_failed": failed_open,
            "rps_alone": alone.rps,
            "rps_with_idle": loaded.rps,
            "p50_ms_alone": alone.p50_ms,
            "p50_ms_with_idle": loaded.p50_ms,
            "cpu_us_per_request_alone": cpu_per_request(alone),
            "cpu_us_per_request_with_idle": cpu_per_request(loaded),
            "errors_with_idle": loaded.errors,
            "idle_served_after_load": still_served,
            "proxy_threads": threads_with_idle,
            "peak_rss_mib": rss,
            "proxy_alive": alive,
        }
        rows.append(row)
        say(
            f"{kind:<8} {opened:,}/{idle:,} idle connections opened; req/s with them "
            f"{loaded.rps / alone.rps:.2f}x of without; p50 {ratio(loaded.p50_ms, alone.p50_ms)}; "
            f"CPU/request {ratio(cpu_per_request(loaded), cpu_per_request(alone))}; "
            f"{loaded.errors} load errors; "
            f"{still_served:,} idle connections still served afterwards; "
            f"{threads_with_idle} threads; peak RSS "
            + (f"{rss:.0f} MiB" if rss else "n/a (proxy died)")
        )
    procs.stop(backend.proc)
    results["idle"] = rows


def cpu_per_request(load: bench.LoadResult) -> float | None:
    """The proxy's CPU microseconds per completed request during one wrk run."""
    if load.proxy_cpu_s is None or not load.requests:
        return None
    return load.proxy_cpu_s / load.requests * 1e6


def ratio(with_idle: float | None, alone: float | None) -> str:
    return f"{with_idle / alone:.2f}x" if with_idle and alone else "n/a"


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="pyproxy at scale (issue 3, item 3)")
    parser.add_argument("--parts", default="client,routes,selection,limiter,stream,idle")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--stream-size", type=int, default=GIB, help="bytes (default 1 GiB)")
    parser.add_argument("--keys", type=int, default=1_000_000, help="limiter client keys")
    parser.add_argument("--idle", type=int, default=1000, help="idle client connections")
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load")
    parser.add_argument("--requests", type=int, default=5000, help="requests per client layer")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--serve-stream-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stream_backend:
        serve_stream_backend(args.serve_stream_backend)
        return 0
    if args.quick:
        args.stream_size, args.keys, args.idle, args.duration = 128 * MIB, 200_000, 300, 2
        args.requests = 1000
    parts = [p.strip() for p in args.parts.split(",")]
    info = bench.machine()
    say(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}")
    results: dict[str, Any] = {
        "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
        "machine": info,
    }
    cpus = bench.pick_cpus()
    if cpus[1] is not None:
        os.sched_setaffinity(0, {cpus[1]})  # our client side stays off the proxy's CPU
    procs = bench.Processes()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-scale-"))
    try:
        with bench.sigterm_as_interrupt():
            if "client" in parts:
                part_client(results, procs, workdir, cpus, args.requests)
            if "routes" in parts:
                part_routes(results)
            if "selection" in parts:
                part_selection(results)
            if "limiter" in parts:
                part_limiter(results, args.keys)
            if "stream" in parts or "idle" in parts:
                problem = pyproxy_available()
                kinds = ["pyproxy", "naive"] if problem is None else ["naive"]
                if problem:
                    say(f"\n(pyproxy not runnable yet: {problem}; measuring the naive proxy only)")
                if "stream" in parts:
                    part_stream(results, args.stream_size, procs, workdir, cpus, kinds)
                if "idle" in parts:
                    wrk = bench.find_or_install("wrk", "wrk", required=True) or "wrk"
                    part_idle(
                        results, args.idle, args.duration, procs, workdir, cpus, kinds, {"wrk": wrk}
                    )
    except KeyboardInterrupt:
        say("\nbench_scale: interrupted; stopping everything we started")
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
