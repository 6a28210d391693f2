#!/usr/bin/env python3
"""scripts/profile_proxy.py: profile first. Where does pyproxy's CPU go under load?

    python scripts/profile_proxy.py                   # cProfile, 20,000 GETs at 16 connections
    python scripts/profile_proxy.py --config default  # every default, not every feature
    python scripts/profile_proxy.py --sampler py-spy  # sampling instead (pip install py-spy)
    python scripts/profile_proxy.py --requests 50000 --top 30 --keep

Starts nginx (as scripts/bench.py does), pyproxy on its own CPU with the "pyproxy+"
config of bench.py (or every default), warms it up, sends a fixed number of 1 KiB GETs
with wrk, stops pyproxy, and prints the top functions by own time and by cumulative
time. Loopback only; every process it starts is stopped by its PID.

Two samplers:

- cprofile (default): every thread gets its own `cProfile.Profile` (a profiler
  follows one thread's calls; waitress serves on 32 worker threads), timed with
  `time.thread_time`, so a thread waiting on a socket or a lock costs nothing and
  own time is CPU time. Deterministic, so it shows call counts, but it slows each
  Python call down: compare functions with each other, not with the bench's figures.
- py-spy: samples the running process from outside (ptrace) 200 times a second,
  without slowing it much; only the thread holding the GIL is sampled (`--gil`), so
  threads parked on a lock or a socket are left out.
  "Own" is the share of samples where a function is the innermost frame;
  "cumulative" where it is anywhere on the stack.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the sibling script: processes, nginx, the pyproxy configs

# wrk has no "-n requests", and wrk.thread:stop() stops sending but still waits out
# -d: the Lua hook says when N answers are in, and we interrupt wrk (it prints its
# summary on SIGINT).
STOP_AFTER = """\
local answered = 0
response = function(status, headers, body)
  answered = answered + 1
  if answered == {requests} then
    io.write("PROFILE-ENOUGH\\n")
    io.flush()
  end
end
"""


def run_wrk_for(argv: list[str], timeout: float) -> str:
    """Run wrk until its Lua hook reports enough answers, then SIGINT it; its output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wrk prints a line or two before the marker
            lines.append(line)
            if "PROFILE-ENOUGH" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines) + rest


def serve_profiled(stats_path: Path, config: Path) -> None:
    """Run pyproxy with one cProfile per thread; at exit, write their merged stats."""
    profiles: list[cProfile.Profile] = []

    def start_profiling(frame: object, event: str, arg: object) -> None:
        # Called once in each new thread: swap this hook for the thread's own profiler.
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start_profiling)
    main_profile = cProfile.Profile(time.thread_time)
    profiles.append(main_profile)
    from pyproxy.cli import main

    main_profile.enable()
    try:
        main(["-c", str(config)])
    except SystemExit:
        pass
    finally:
        main_profile.disable()
        merged = pstats.Stats(main_profile)
        for profile in profiles[1:]:
            merged.add(profile)
        merged.dump_stats(stats_path)


def print_cprofile(stats_path: Path, top: int) -> None:
    stats = pstats.Stats(str(stats_path))
    stats.strip_dirs()
    for order, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        print(f"\n=== top {top} by {title} (CPU seconds, all threads) ===")
        stats.sort_stats(order).print_stats(top)


def print_pyspy(raw_path: Path, top: int) -> None:
    """Own and cumulative shares from py-spy's collapsed stacks ("a;b;c 12" per line)."""
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):  # once per sample, however deep the recursion
            cumulative[frame] += n
    print(f"\n{total} samples of the thread holding the GIL")
    for counter, title in ((own, "own"), (cumulative, "cumulative")):
        print(f"\n=== top {top} by {title} share of samples ===")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / max(total, 1):6.1f}%  {frame}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="profile pyproxy under wrk load")
    parser.add_argument("--requests", type=int, default=20000, help="requests to profile")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--config", choices=("production", "default"), default="production")
    parser.add_argument("--sampler", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--threads", type=int, default=32, help="pyproxy worker threads")
    parser.add_argument("--top", type=int, default=25, help="functions per table")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (stats, logs)")
    parser.add_argument("--serve-profiled", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-config", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.serve_profiled:
        serve_profiled(args.serve_profiled, args.serve_config)
        return 0
    wrk = bench.find_or_install("wrk", "wrk", required=True) or "wrk"
    nginx = bench.find_or_install("nginx", "nginx-light", required=False)
    pyspy = shutil.which("py-spy")
    if args.sampler == "py-spy" and not pyspy:
        sys.exit("profile: py-spy not found; `pip install py-spy` (it needs ptrace)")
    proxy_cpu, load_cpu = bench.pick_cpus()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    procs = bench.Processes()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-profile-"))
    stats_path, raw_path = workdir / "pyproxy.pstats", workdir / "pyspy.txt"
    try:
        backend = bench.start_backend(procs, workdir, nginx, load_cpu)
        config = bench.pyproxy_configs(workdir, backend, args.threads)[args.config]
        url = "http://" + json.loads(config.read_text())["listen"]
        argv = [sys.executable, "-m", "pyproxy", "-c", str(config)]
        if args.sampler == "cprofile":
            profiled = ["--serve-profiled", str(stats_path), "--serve-config", str(config)]
            argv = [sys.executable, __file__, *profiled]
        env = bench.proxy_environment()
        proxy = procs.start(argv, cpu=proxy_cpu, env=env, log=workdir / "pyproxy.out")
        bench.wait_http(url + "/1k", 60, proxy)
        script = workdir / "stop.lua"
        script.write_text(STOP_AFTER.format(requests=min(2000, args.requests)))
        load = [wrk, "-t1", f"-c{args.connections}", "-d600s", "-s", str(script), url + "/1k"]
        if load_cpu is not None:
            load = ["taskset", "-c", str(load_cpu), *load]
        run_wrk_for(load, 300)  # warm-up: the upstream pool grows to its size
        spy = None
        if args.sampler == "py-spy":
            # --gil: only the thread holding the GIL, i.e. running Python (threads parked
            # in a lock otherwise look busy); --function: a row per function, not per line.
            record = [pyspy, "record", "--pid", str(proxy.pid), "--rate", "200", "--gil"]
            record.append("--function")
            spy = procs.start([*record, "--format", "raw", "--output", str(raw_path)])
            time.sleep(1)  # py-spy attaches
        script.write_text(STOP_AFTER.format(requests=args.requests))
        started = time.monotonic()
        output = run_wrk_for(load, 600)
        elapsed = time.monotonic() - started
        if spy is not None:
            procs.stop(spy, signal.SIGINT)  # py-spy writes its output on Ctrl-C
        procs.stop(proxy)  # SIGTERM: pyproxy drains and exits; the profile is written
        summary = [line for line in output.splitlines() if "requests in" in line]
        print(f"wrk: {' '.join(summary).strip()} ({elapsed:.1f} s, {args.connections} conns)")
        print(f"pyproxy config: {args.config}; sampler: {args.sampler}")
        if args.sampler == "cprofile":
            print_cprofile(stats_path, args.top)
        else:
            print_pyspy(raw_path, args.top)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"profile: stats and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
