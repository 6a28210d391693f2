#!/usr/bin/env python3
"""scripts/bench.py: measure pyproxy side by side with a bare forwarder, a naive proxy
and no proxy.

One command, a few minutes, loopback only:

    python scripts/bench.py                 # full run: 2 interleaved rounds, 5 s per load
    python scripts/bench.py --quick         # smoke run, under a minute
    python scripts/bench.py --json out.json # also keep every number as JSON

What it does, in order:

1. Finds `wrk` and `nginx` (installs the Debian packages `wrk` and `nginx-light` when
   they are missing and we are root). nginx runs from its own config in a temp dir,
   never the system service; without nginx a small Python backend stands in (and the
   run says so loudly, because then the backend, not the proxy, may be the limit).
2. Runs every candidate in turn, and the whole sequence `--rounds` times, so slow drift
   of the machine (other jobs, thermal) hits every candidate alike:
     direct      wrk -> nginx, no proxy: the ceiling
     waitress    a WSGI app on waitress answering by itself: the ceiling of any proxy
                 built on waitress (what is left below it is the cost of forwarding)
     naive       scripts/naive_proxy.py: waitress + Session.request, the obvious way
     bare        scripts/bare_forwarder.py: waitress + the Session adapter's urllib3
                 pool + read1, no features: the same stack as pyproxy, so what pyproxy
                 costs above it is what its features cost
     pyproxy     `python -m pyproxy` with a minimal config (every default)
     pyproxy+    pyproxy with every production feature turned on
3. For each candidate: req/s with 1 KiB bodies at 1, 16 and 64 connections, MB/s with
   1 MiB bodies, latency percentiles (wrk), the proxy process's CPU time per request
   and peak RSS (from /proc), backend connections opened per 1,000 requests (nginx
   stub_status "accepts"), and errors (non-2xx answers + socket errors).
4. Prints the figures, their ratios to naive, to bare and to direct, the cost of
   pyproxy's features (pyproxy and pyproxy+ against bare), and the issue-3 targets.

Pinning: with two or more CPUs the proxy runs on the first CPU alone, and wrk plus the
backend on the second, so the proxy's core measures the proxy and nothing else.
Every process this script starts is stopped by its PID, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB, MIB = 1024, 1024 * 1024
DEFAULT_THREADS = 32  # waitress worker threads of every waitress-based candidate

# ---------------------------------------------------------------------------
# Processes: everything we start goes through here, so everything can be stopped.
# ---------------------------------------------------------------------------


class Processes:
    """The child processes of this run. `stop_all()` ends each one by PID."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: list[str],
        *,
        cpu: int | None = None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]  # taskset execs: the PID stays ours
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            # A new session: Ctrl-C in the terminal reaches only us, and we stop the
            # children in order (a proxy before its backend).
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        finally:
            if log:
                out.close()  # the child has its own copy of the descriptor
        self.track(proc)
        return proc

    def track(self, proc: subprocess.Popen[bytes]) -> None:
        """Add a process started elsewhere, so that `stop_all()` stops it too."""
        self._running.append(proc)

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            self.stop(proc)


def free_port() -> int:
    """A port the OS had free a moment ago (bind to 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200, or fail (early if `proc` has died)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                if resp.status == 200:
                    return
                last = resp.status
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s (last: {last})")


# ---------------------------------------------------------------------------
# /proc: what a process costs. utime+stime cover every thread of the process.
# ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far, in seconds (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in (...) may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds CPU `cpu` spent on anything but idle and iowait, since boot (/proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(x) for x in line.split()[1:]]
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # minus idle, iowait
    return 0.0


def memory_kib(pid: int, field_name: str = "VmHWM") -> int:
    """A Vm* line of /proc/<pid>/status in KiB: VmHWM = peak RSS, VmRSS = current."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------
# Tools: wrk and nginx from Debian.
# ---------------------------------------------------------------------------


def find_binary(binary: str) -> str | None:
    """`binary` on PATH, or in /usr/sbin (nginx lives there and root's PATH may lack it)."""
    sbin = f"/usr/sbin/{binary}"
    return shutil.which(binary) or (sbin if os.access(sbin, os.X_OK) else None)


def find_or_install(binary: str, package: str, *, required: bool) -> str | None:
    """Find `binary`; if missing and we are root on Debian, apt-get install `package`."""
    path = find_binary(binary)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: installing the Debian package {package} ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", package]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            # The package lists may be missing or stale: update once, then try again.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        path = find_binary(binary)
    if path is None and required:
        sys.exit(f"bench: {binary} not found and not installable; install {package!r}")
    return path


# ---------------------------------------------------------------------------
# The backend: nginx in a temp dir, or a Python stand-in with the same URLs.
# ---------------------------------------------------------------------------

# /1k -> 1 KiB body, /1m -> a 1 MiB file, /health -> 200, /nginx_status -> counters.
# One worker: it shares the load CPU with wrk and is still far faster than any proxy.
NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
        location = /1k {{ default_type text/plain; return 200 "{body_1k}"; }}
        location = /1m {{ default_type application/octet-stream; }}
        location = /health {{ default_type text/plain; return 200 "ok"; }}
        location = /nginx_status {{ stub_status; }}
        location / {{ default_type text/plain; return 200 "ok"; }}
    }}
}}
"""


@dataclass
class Backend:
    kind: str  # "nginx" or "python"
    url: str
    proc: subprocess.Popen[bytes]

    def accepts(self) -> int:
        """Connections the backend accepted so far (stub_status "accepts").

        This very query is one accepted connection; callers subtract it."""
        with urllib.request.urlopen(self.url + "/nginx_status", timeout=5) as resp:
            text = resp.read().decode()
        return int(text.splitlines()[2].split()[0])


def start_backend(procs: Processes, workdir: Path, nginx: str | None, cpu: int | None) -> Backend:
    port = free_port()
    www = workdir / "www"
    www.mkdir()
    (www / "1m").write_bytes(os.urandom(MIB))
    if nginx:
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, port=port, body_1k="x" * 1023 + "\n"))
        # As root, nginx's workers switch to an unprivileged user: let it read our files.
        for path in (workdir, www, www / "1m"):
            path.chmod(0o755)
        proc = procs.start(
            [nginx, "-p", str(workdir), "-c", str(conf)], cpu=cpu, log=workdir / "nginx.out"
        )
        kind = "nginx"
    else:
        print(
            "\n" + "!" * 78 + "\n! nginx is not available: using a Python backend. It is much"
            " slower than\n! nginx and may be the bottleneck; ratios to direct mean little.\n"
            + "!" * 78
            + "\n",
            flush=True,
        )
        proc = procs.start(
            [sys.executable, __file__, "--serve-backend", str(port), "--www", str(www)],
            cpu=cpu,
            log=workdir / "backend.out",
        )
        kind = "python"
    backend = Backend(kind, f"http://127.0.0.1:{port}", proc)
    wait_http(backend.url + "/health", 15, proc)
    return backend


def serve_waitress(listen: str, threads: int, www: Path) -> None:
    """The "waitress" candidate: a WSGI app on waitress that answers by itself.

    No upstream at all, so it is the ceiling of any proxy built on waitress: what is
    left between this and pyproxy is what forwarding costs."""
    import logging

    import waitress

    bodies = {"/1k": b"x" * 1023 + b"\n", "/1m": (www / "1m").read_bytes()}

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        body = bodies.get(environ["PATH_INFO"], b"ok")
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))],
        )
        return [body]

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    waitress.serve(app, listen=listen, threads=threads, connection_limit=1000, _quiet=True)


def serve_python_backend(port: int, www: Path) -> None:
    """The fallback backend: the same URLs as the nginx config, stdlib only."""
    body_1k = b"x" * 1023 + b"\n"
    body_1m = (www / "1m").read_bytes()
    counters = {"accepts": 0, "requests": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def setup(self) -> None:
            with lock:
                counters["accepts"] += 1
            super().setup()

        def do_GET(self) -> None:
            with lock:
                counters["requests"] += 1
            if self.path == "/nginx_status":
                a, r = counters["accepts"], counters["requests"]
                body = f"Active connections: 0 \nserver accepts handled requests\n {a} {a} {r} \n"
                payload = body.encode()
            else:
                payload = {"/1k": body_1k, "/1m": body_1m}.get(self.path, b"ok")
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


# ---------------------------------------------------------------------------
# Candidates: how to start each proxy.
# ---------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    listen: str  # host:port that wrk loads
    argv: list[str] | None  # how to start it; None = no proxy (direct)


def pyproxy_configs(workdir: Path, backend: Backend, threads: int) -> dict[str, Path]:
    """Write the two pyproxy configs: every default, and every production feature on."""
    paths = {}
    for name, config in pyproxy_settings(workdir, backend, threads).items():
        paths[name] = workdir / f"pyproxy-{name}.yaml"
        # JSON is valid YAML, and needs no third-party module in this script.
        paths[name].write_text(json.dumps(config, indent=2) + "\n")
    return paths


def pyproxy_settings(workdir: Path, backend: Backend, threads: int) -> dict[str, dict]:
    """The two pyproxy configs as dicts: "default" (every default) and "production"
    (every production feature on). scripts/bench_features.py builds on both."""
    default = {
        "listen": f"127.0.0.1:{free_port()}",
        "threads": threads,
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "backends": [{"url": backend.url}],
    }
    production = {
        "listen": f"127.0.0.1:{free_port()}",
        "threads": threads,
        "strategy": "least_connections",
        "preserve_host": True,
        "trusted_proxies": ["10.0.0.0/8"],
        "backends": [{"url": backend.url, "name": "nginx", "weight": 1, "max_connections": 1000}],
        "timeouts": {"connect": "2s", "read": "30s", "total": "60s"},
        "health_check": {
            "enabled": True,
            "path": "/health",
            "interval": "2s",
            "timeout": "1s",
            "healthy_threshold": 2,
            "unhealthy_threshold": 3,
            "expected_status": "200-399",
        },
        "circuit_breaker": {
            "enabled": True,
            "failure_threshold": 5,
            "open_duration": "30s",
            "max_open_duration": "5m",
            "half_open_requests": 1,
            "failure_statuses": [502, 503, 504],
        },
        "retries": {
            "max_retries": 2,
            "retry_on": ["connect_error", "reset", "timeout", 502, 503, 504],
            "idempotent_only": True,
            "max_body": "1MiB",
            "backoff": "0s",
            "budget_percent": 20,
        },
        # Limits high enough never to refuse the benchmark, so we pay the bucket cost only.
        "rate_limit": {
            "per_client": "100000000/second",
            "burst": 100000000,
            "client_key": "ip",
            "per_backend": "100000000/second",
            "max_clients": 100000,
            "store": "memory",
        },
        "sticky": {"mode": "cookie", "cookie_name": "pyproxy_backend", "cookie_max_age": 3600},
        "admin": {
            "listen": f"127.0.0.1:{free_port()}",
            "token": "bench-token",
            "state_file": str(workdir / "state.json"),
        },
        "limits": {
            "max_request_body": "10MiB",
            "max_request_header": "64KiB",
            "client_idle_timeout": "60s",
            "header_timeout": "10s",
            "send_timeout": "60s",
            "max_connections": 1000,
        },
        "shutdown": {"delay": "0s", "drain_timeout": "30s"},
        "access_log": {
            "enabled": True,
            "format": "json",
            "path": str(workdir / "access-production.log"),
        },
    }
    return {"default": default, "production": production}


def pyproxy_check(config: Path) -> str | None:
    """None when `python -m pyproxy --check` accepts the config, else why not."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pyproxy", "--check", "-c", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "--check timed out"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return "; ".join(lines[-3:]) or f"exit {done.returncode}"


def make_candidates(
    workdir: Path, backend: Backend, threads: int, wanted: list[str]
) -> list[Candidate]:
    """The candidates named in `wanted`; a pyproxy whose config fails --check is skipped."""
    naive_listen = f"127.0.0.1:{free_port()}"
    found = [
        Candidate("direct", backend.url.removeprefix("http://"), None),
        Candidate(
            "naive",
            naive_listen,
            [
                sys.executable,
                str(REPO / "scripts" / "naive_proxy.py"),
                "--listen",
                naive_listen,
                "--backend",
                backend.url,
                "--threads",
                str(threads),
            ],
        ),
    ]
    bare_listen = f"127.0.0.1:{free_port()}"
    found.append(
        Candidate(
            "bare",
            bare_listen,
            [
                sys.executable,
                str(REPO / "scripts" / "bare_forwarder.py"),
                "--listen",
                bare_listen,
                "--backend",
                backend.url,
                "--threads",
                str(threads),
            ],
        )
    )
    hello_listen = f"127.0.0.1:{free_port()}"
    found.append(
        Candidate(
            "waitress",
            hello_listen,
            [
                sys.executable,
                __file__,
                "--serve-waitress",
                hello_listen,
                "--threads",
                str(threads),
                "--www",
                str(workdir / "www"),
            ],
        )
    )
    configs = pyproxy_configs(workdir, backend, threads)
    for name, label in (("default", "pyproxy"), ("production", "pyproxy+")):
        if label not in wanted:
            continue
        problem = pyproxy_check(configs[name])
        if problem:
            print(
                f"bench: SKIPPING {label}: `python -m pyproxy --check -c {configs[name]}` "
                f"failed: {problem}",
                flush=True,
            )
            continue
        listen = json.loads(configs[name].read_text())["listen"]
        found.append(
            Candidate(label, listen, [sys.executable, "-m", "pyproxy", "-c", str(configs[name])])
        )
    return [c for name in wanted for c in found if c.name == name]  # in the order asked


# ---------------------------------------------------------------------------
# wrk: one load run, its summary printed as JSON by a Lua `done` hook.
# ---------------------------------------------------------------------------

WRK_SCRIPT = """\
done = function(s, latency, requests)
  io.write(string.format(
    'BENCH-JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d}\\n',
    s.requests, s.duration, s.bytes, s.errors.connect, s.errors.read, s.errors.write,
    s.errors.status, s.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


@dataclass
class LoadResult:
    """One wrk run against one candidate, plus what the proxy process spent on it."""

    requests: int
    seconds: float
    bytes: int
    errors: int  # non-2xx/3xx answers + connect/read/write/timeout socket errors
    p50_ms: float
    p90_ms: float
    p99_ms: float
    proxy_cpu_s: float | None  # CPU time of the proxy process during the run
    # Share of the proxy's CPU used by *other* processes during the run (other
    # people's jobs on a shared machine): above a few percent, the figures are noisy.
    noise: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


@dataclass
class Rig:
    """What every load run needs: wrk, its Lua script, the CPUs, the process registry."""

    wrk: str
    script: Path  # holds WRK_SCRIPT
    proxy_cpu: int | None  # where the proxy under test runs (None = not pinned)
    load_cpu: int | None  # where wrk and the backend run
    procs: Processes


def run_wrk(
    rig: Rig, url: str, connections: int, seconds: float, proxy_pid: int | None = None
) -> LoadResult:
    """One wrk run; with `proxy_pid`, also the CPU that process spent meanwhile."""
    # One wrk thread: wrk's event loop on one CPU outruns every proxy measured here.
    duration = f"-d{max(1, round(seconds))}s"  # wrk takes whole seconds
    argv = ["wrk", f"-c{connections}", duration, "--timeout", "5s", "-s", str(rig.script), url]
    argv = [rig.wrk, "-t1", *argv[1:]]
    if rig.load_cpu is not None:
        argv = ["taskset", "-c", str(rig.load_cpu), *argv]
    proxy_before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    core_before = cpu_busy_seconds(rig.proxy_cpu) if rig.proxy_cpu is not None else 0.0
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    rig.procs.track(proc)  # so Ctrl-C stops it too
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        rig.procs.stop(proc)
    elapsed = time.monotonic() - started
    proxy_cpu = cpu_seconds(proxy_pid) - proxy_before if proxy_pid else None
    noise = None
    if rig.proxy_cpu is not None and proxy_pid:  # direct: no proxy, so nothing to disturb
        others = cpu_busy_seconds(rig.proxy_cpu) - core_before - (proxy_cpu or 0.0)
        noise = max(0.0, others / elapsed)
    match = re.search(rb"BENCH-JSON (\{.*\})", out)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out.decode(errors='replace')}")
    s = json.loads(match.group(1))
    errors = s["status"] + s["connect"] + s["read"] + s["write"] + s["timeout"]
    return LoadResult(
        requests=s["requests"],
        seconds=s["duration_us"] / 1e6,
        bytes=s["bytes"],
        errors=errors,
        p50_ms=s["p50_us"] / 1000,
        p90_ms=s["p90_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
        proxy_cpu_s=proxy_cpu,
        noise=noise,
    )


# ---------------------------------------------------------------------------
# One candidate, one round.
# ---------------------------------------------------------------------------

LOADS = [("c1", "/1k", 1), ("c16", "/1k", 16), ("c64", "/1k", 64), ("1mib", "/1m", 8)]


@dataclass
class RoundResult:
    candidate: str
    loads: dict[str, LoadResult] = field(default_factory=dict)
    peak_rss_kib: int | None = None
    backend_conns: int = 0  # connections the backend accepted during the measured loads
    requests: int = 0  # requests completed during the measured loads


def run_candidate(
    candidate: Candidate, rig: Rig, settings: argparse.Namespace, backend: Backend, workdir: Path
) -> RoundResult:
    """Start the candidate, warm it up, run every load of LOADS, stop it."""
    result = RoundResult(candidate.name)
    base = "http://" + candidate.listen
    proc = None
    try:
        if candidate.argv:
            proc = rig.procs.start(
                candidate.argv,
                cpu=rig.proxy_cpu,
                env=proxy_environment(),
                log=workdir / f"{candidate.name}.out",
            )
            wait_http(base + "/1k", 30, proc)
        pid = proc.pid if proc else None
        # Warm-up at the highest concurrency: the proxy's upstream pool grows to its
        # full size (one connection per busy thread) before anything is counted.
        run_wrk(rig, base + "/1k", max(c for _, _, c in LOADS), settings.warmup, pid)
        # From here on a pool that works opens no backend connection; one that does
        # not opens one per request.
        accepts_before = backend.accepts()
        for label, path, connections in LOADS:
            load = run_wrk(rig, base + path, connections, settings.duration, pid)
            result.loads[label] = load
            result.requests += load.requests
        # -1: the accepts() query is itself one accepted connection.
        result.backend_conns = backend.accepts() - accepts_before - 1
        if proc:
            result.peak_rss_kib = memory_kib(proc.pid, "VmHWM")
    finally:
        if proc:
            rig.procs.stop(proc)
    return result


def proxy_environment() -> dict[str, str]:
    """A small fixed environment for the proxies under test.

    requests' Session.request scans every environment variable for proxy settings on
    each request (trust_env), so the size of the caller's environment would change the
    naive proxy's cost from one shell to the next. A fixed one keeps runs comparable.
    """
    keep = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    return {**keep, "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------------------
# Summary: medians over rounds, ratios, targets.
# ---------------------------------------------------------------------------

# (key, column header, how to format, True when higher is better)
COLUMNS = [
    ("rps_c1", "req/s c1", "{:.0f}", True),
    ("rps_c16", "req/s c16", "{:.0f}", True),
    ("rps_c64", "req/s c64", "{:.0f}", True),
    ("mbps_1mib", "MB/s 1MiB", "{:.0f}", True),
    ("p50_c1_ms", "p50 c1 ms", "{:.2f}", False),
    ("p50_c64_ms", "p50 c64 ms", "{:.2f}", False),
    ("p99_c64_ms", "p99 c64 ms", "{:.2f}", False),
    ("cpu_us_per_req", "CPU us/req", "{:.0f}", False),
    ("peak_rss_mib", "peak RSS MiB", "{:.1f}", False),
    ("conns_per_1k", "conns/1k req", "{:.2f}", False),
    ("errors", "errors", "{:.0f}", False),
]


def round_figures(r: RoundResult) -> dict[str, float | None]:
    small = [r.loads[k] for k in ("c1", "c16", "c64")]
    cpu = [load.proxy_cpu_s for load in small]
    return {
        "rps_c1": r.loads["c1"].rps,
        "rps_c16": r.loads["c16"].rps,
        "rps_c64": r.loads["c64"].rps,
        "mbps_1mib": r.loads["1mib"].mb_per_s,
        "p50_c1_ms": r.loads["c1"].p50_ms,
        "p50_c64_ms": r.loads["c64"].p50_ms,
        "p99_c64_ms": r.loads["c64"].p99_ms,
        # CPU of the proxy process over the three 1 KiB runs / requests they completed.
        "cpu_us_per_req": (
            sum(c for c in cpu if c is not None) * 1e6 / sum(load.requests for load in small)
        )
        if all(c is not None for c in cpu)
        else None,
        "peak_rss_mib": r.peak_rss_kib / 1024 if r.peak_rss_kib is not None else None,
        "conns_per_1k": 1000 * r.backend_conns / max(r.requests, 1),
        "errors": float(sum(load.errors for load in r.loads.values())),
    }


def summarize(rounds: list[RoundResult]) -> dict[str, dict[str, float | None]]:
    """Per candidate: the median of each figure over rounds (max for RSS, sum for errors)."""
    by_candidate: dict[str, list[dict[str, float | None]]] = {}
    for r in rounds:
        by_candidate.setdefault(r.candidate, []).append(round_figures(r))
    summary = {}
    for name, figures in by_candidate.items():
        merged: dict[str, float | None] = {}
        for key, *_ in COLUMNS:
            values = [f[key] for f in figures if f[key] is not None]
            if not values:
                merged[key] = None
            elif key == "peak_rss_mib":
                merged[key] = max(values)
            elif key == "errors":
                merged[key] = sum(values)
            else:
                merged[key] = statistics.median(values)
        summary[name] = merged
    return summary


def ratios(summary: dict[str, dict[str, float | None]], base: str) -> dict[str, dict]:
    if base not in summary:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for name, figures in summary.items():
        out[name] = {}
        for key, *_ in COLUMNS:
            a, b = figures[key], summary[base][key]
            out[name][key] = a / b if a is not None and b else None
    return out


# Issue 3's targets for pyproxy+ against naive: (key, operator, bound).
TARGETS = [
    ("rps_c16", ">=", 2.0),
    ("rps_c64", ">=", 2.0),
    ("p99_c64_ms", "<=", 0.5),
    ("cpu_us_per_req", "<=", 0.5),
    ("mbps_1mib", ">=", 1.3),
    ("peak_rss_mib", "<=", 1.5),
]


def print_table(title: str, rows: dict[str, dict[str, float | None]], ratio: bool) -> None:
    print(f"\n{title}")
    names = list(rows)
    width = max(len(n) for n in names) + 2
    print("".ljust(width) + "".join(h.rjust(13) for _, h, _, _ in COLUMNS))
    for name in names:
        cells = []
        for key, _, fmt, _ in COLUMNS:
            value = rows[name][key]
            if value is None:
                cells.append("-")
            elif ratio:
                cells.append(f"{value:.2f}x")
            else:
                cells.append(fmt.format(value))
        print(name.ljust(width) + "".join(c.rjust(13) for c in cells))


def print_feature_cost(ratio_bare: dict) -> dict[str, dict[str, float | None]]:
    """What pyproxy's features cost: pyproxy and pyproxy+ against the bare forwarder.

    The same stack (waitress, the Session adapter's urllib3 pool, read1) with no
    feature, so these ratios are the price of the features alone, not of the stack."""
    keys = ("rps_c1", "rps_c16", "rps_c64", "cpu_us_per_req")
    cost = {
        name: {key: ratio_bare[name][key] for key in keys}
        for name in ("pyproxy", "pyproxy+")
        if name in ratio_bare
    }
    if cost:
        print("\nwhat the features cost, against bare (req/s: higher is better; CPU: lower):")
    for name, row in cost.items():
        shown = {k: "-" if v is None else f"{v:.2f}x" for k, v in row.items()}
        print(
            f"  {name:<9} req/s c1 {shown['rps_c1']}, c16 {shown['rps_c16']}, "
            f"c64 {shown['rps_c64']}; CPU per request {shown['cpu_us_per_req']}"
        )
    return cost


def check_targets(summary: dict, ratio_naive: dict) -> list[dict]:
    if "pyproxy+" not in ratio_naive:
        return []
    rows = []
    for key, op, bound in TARGETS:
        value = ratio_naive["pyproxy+"][key]
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        rows.append({"figure": key, "target": f"{op} {bound}x", "ratio": value, "met": met})
    conns = summary["pyproxy+"]["conns_per_1k"]
    rows.append(
        {
            "figure": "conns_per_1k",
            "target": "~0 (< 1 per 1k)",
            "ratio": conns,
            "met": conns is not None and conns < 1,
        }
    )
    return rows


def machine() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def add_run_options(parser: argparse.ArgumentParser, *, warmup: int, threads_help: str) -> None:
    """The options of the scripts that run pyproxy configs against each other
    (bench_features.py, bench_workers.py); read them with run_options()."""
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, 2 s per run, 1 s warm-up"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument(
        "--warmup", type=int, default=warmup, help=f"seconds of warm-up (default {warmup})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"{threads_help} (default {DEFAULT_THREADS}, as bench.py)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")


def run_options(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, with --quick applied."""
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    return args


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="pyproxy vs naive proxy vs direct (issue 3)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run under a minute: 1 round, 2 s per load"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per load run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"worker threads, the same for every waitress-based candidate "
        f"(default {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--candidates",
        default="direct,waitress,naive,bare,pyproxy,pyproxy+",
        help="comma-separated subset of direct,waitress,naive,bare,pyproxy,pyproxy+",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temp dir (configs, logs) and print where it is",
    )
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-waitress", help=argparse.SUPPRESS)
    parser.add_argument("--www", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    return args


def pick_cpus() -> tuple[int | None, int | None]:
    """(proxy CPU, load CPU): two different CPUs when we have them, else no pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2 and shutil.which("taskset"):
        return allowed[0], allowed[1]
    return None, None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the `finally` blocks stop our children."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def run_and_clean_up(procs: Processes, workdir: Path, keep: bool, script: str) -> Iterator[None]:
    """The body of a benchmark script's run: SIGTERM and Ctrl-C stop it (exit status
    130), every process it started is stopped by its PID, and its temp dir is removed
    unless `keep`."""
    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt:
        print(f"\n{script}: interrupted; stopping everything we started", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        procs.stop_all()
        if keep:
            print(f"{script}: configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    args = parse_args()
    if args.serve_backend:
        serve_python_backend(args.serve_backend, args.www)
        return 0
    if args.serve_waitress:
        serve_waitress(args.serve_waitress, args.threads, args.www)
        return 0
    tools = {"wrk": find_or_install("wrk", "wrk", required=True) or "wrk"}
    nginx = find_or_install("nginx", "nginx-light", required=False)
    cpus = pick_cpus()
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"Linux {info['kernel']}"
    )
    print(
        f"pinning: proxy on CPU {cpus[0]}, wrk + backend on CPU {cpus[1]}"
        if cpus[0] is not None
        else "pinning: off (fewer than 2 CPUs or no taskset)"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if cpus[1] is not None:
        os.sched_setaffinity(0, {cpus[1]})  # this script stays off the proxy's CPU too
    wanted = [c.strip() for c in args.candidates.split(",") if c.strip()]
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-bench-"))
    (workdir / "summary.lua").write_text(WRK_SCRIPT)
    rig = Rig(tools["wrk"], workdir / "summary.lua", cpus[0], cpus[1], procs)
    rounds: list[RoundResult] = []
    with run_and_clean_up(procs, workdir, args.keep, "bench"):
        backend = start_backend(procs, workdir, nginx, cpus[1])
        print(f"backend: {backend.kind} at {backend.url} (pid {backend.proc.pid})")
        candidates = make_candidates(workdir, backend, args.threads, wanted)
        per_candidate = args.warmup + len(LOADS) * args.duration
        print(
            f"candidates: {', '.join(c.name for c in candidates)}; {args.rounds} round(s);"
            f" about {per_candidate * len(candidates) * args.rounds / 60:.1f} min of load",
            flush=True,
        )
        for round_no in range(1, args.rounds + 1):
            for candidate in candidates:
                print(f"round {round_no}: {candidate.name} ...", end=" ", flush=True)
                r = run_candidate(candidate, rig, args, backend, workdir)
                rounds.append(r)
                f = round_figures(r)
                noise = max(load.noise or 0.0 for load in r.loads.values())
                print(
                    f"{f['rps_c16']:.0f} req/s at c16, {f['mbps_1mib']:.0f} MB/s, "
                    f"{f['errors']:.0f} errors; other load on the proxy CPU up to "
                    f"{noise:.0%}",
                    flush=True,
                )

    summary = summarize(rounds)
    ratio_naive, ratio_direct = ratios(summary, "naive"), ratios(summary, "direct")
    ratio_bare = ratios(summary, "bare")
    command = "python scripts/bench.py " + " ".join(sys.argv[1:])
    print(
        f"\ncommand: {command.strip()}\nbackend: {backend.kind}; threads {args.threads}; "
        f"{args.rounds} round(s) x {args.duration:g}s per load; medians over rounds"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    noisy = [r for r in rounds if any((x.noise or 0) > 0.1 for x in r.loads.values())]
    if noisy:
        print(
            f"WARNING: in {len(noisy)} of {len(rounds)} candidate runs other processes used "
            "more than 10% of the proxy's CPU: the machine was busy, the figures are noisy"
        )
    print_table("figures (these depend on the machine; compare the ratios)", summary, False)
    if ratio_naive:
        print_table(
            "ratio to naive (higher is better for req/s and MB/s, lower for the rest)",
            ratio_naive,
            True,
        )
    if ratio_bare:
        print_table("ratio to bare (the same stack without features)", ratio_bare, True)
    if ratio_direct:
        print_table("ratio to direct", ratio_direct, True)
    feature_cost = print_feature_cost(ratio_bare)
    targets = check_targets(summary, ratio_naive)
    if targets:
        print("\nissue 3 targets, pyproxy+ vs naive:")
        for t in targets:
            shown = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
            print(
                f"  {t['figure']:<16} {t['target']:<16} {shown:>8}  "
                f"{'met' if t['met'] else 'MISSED'}"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command.strip(),
                    "machine": info,
                    "backend": backend.kind,
                    "settings": {
                        "rounds": args.rounds,
                        "duration_s": args.duration,
                        "warmup_s": args.warmup,
                        "threads": args.threads,
                        "pinning": {"proxy_cpu": cpus[0], "load_cpu": cpus[1]},
                        "loads": LOADS,
                    },
                    "rounds": [{**asdict(r), "figures": round_figures(r)} for r in rounds],
                    "summary": summary,
                    "ratio_to_naive": ratio_naive,
                    "ratio_to_direct": ratio_direct,
                    "ratio_to_bare": ratio_bare,
                    "feature_cost": feature_cost,
                    "targets": targets,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
