#!/usr/bin/env python3
"""scripts/bench_workers.py: how pyproxy's throughput grows with `workers`.

    python scripts/bench_workers.py                   # workers 1 and 2, 3 rounds, 5 s per run
    python scripts/bench_workers.py --workers 1,2,4   # any list of worker counts
    python scripts/bench_workers.py --quick           # smoke run, under a minute
    python scripts/bench_workers.py --json out.json   # also keep every figure as JSON

What it measures: req/s through pyproxy with its default config (bench.py's "default"
settings, plus a text access log to a file) at `workers: 1` (the single process),
`workers: 2` and so on, under wrk at 16 and 64 connections; and the CPU every process
of the proxy spent per request. It reproduces the performance issue's check "on this
2-core machine, with the load generator light, `workers: 2` serves >= 1.6x the req/s
of `workers: 1` at c64", and prints whether that check holds.

How: one backend (nginx, or bench.py's Python stand-in) and one pyproxy at a time,
started with bench.py's functions (imported, not copied). Each pyproxy gets a 64-
connection warm-up once all its workers serve, then one wrk run at c16 and one at c64,
`--duration` seconds each, one wrk thread (bench.py's "light" load generator). The
whole series runs `--rounds` times, each round starting one config later, so slow
drift of the machine hits every config alike; the tables show medians over rounds.

Nothing is pinned to a CPU, unlike bench.py: the workers need every core. So wrk and
the backend compete with the workers for the same cores (on a 2-core machine, two
workers, nginx and wrk share two CPUs), and req/s is what the proxy serves beside its
load generator, not what it could serve alone. That is why the second table shows
where the CPUs went during each c64 run.

How to read the tables:

    req/s c16, c64      medians over rounds
    x c16, x c64        req/s against the smallest worker count (the issue's ratio: x c64)
    spread c64          (highest - lowest) / median req/s c64 over the rounds: a ratio
                        that differs from 1.00x by less than this is not a finding
    CPU us/req          CPU time of the master and all its workers (utime + stime from
                        /proc, every thread, every process) over both runs, divided by the
                        requests wrk completed: the cost per request, near constant if
                        the workers scale; the master's own share of it is small
    cores busy (c64)    CPU seconds per second of each party: the proxy (master +
                        workers), wrk (getrusage of the reaped wrk), the backend (nginx
                        and its worker), others (the rest of the machine's busy time,
                        other people's jobs included) and idle. Others above 0.1 core:
                        the machine was busy and the req/s figures are noisy.

With `workers: N > 1` pyproxy is a master plus N worker processes; the script counts
the proxy's processes before and after every run and warns if a worker was replaced
meanwhile (its CPU before it exited is then missing). Stopping the master (SIGTERM)
stops its workers; after each config the script checks that none is left, warns if
one is, and stops it by its PID. Loopback only; every process it starts is stopped by
its PID, also on Ctrl-C. On a shared machine use --quick only: the figures mean
something from a quiet machine and several rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the sibling script: processes, /proc, wrk, nginx, the pyproxy configs

CONNECTIONS = (16, 64)
WARMUP_CONNECTIONS = 64  # the upstream pools grow to one connection per busy thread
TARGET = (2, 1, 1.6)  # the check: workers 2 serves >= 1.6x workers 1 at c64
NOISY_CORES = 0.1  # other processes using more than this: the run is noisy

# ---------------------------------------------------------------------------
# The proxy's processes: a master and its workers, found through /proc.
# ---------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (the master and its workers), by walking /proc
    for parent PIDs (this kernel may lack /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # a process that exited meanwhile
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # field 4 of proc(5)
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU time so far of each of these processes that still exists."""
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # exited meanwhile
            found[pid] = bench.cpu_seconds(pid)
    return found


def cpu_since(before: dict[int, float], pids: list[int]) -> float:
    """CPU that `pids` spent since `before` was read; a process that started meanwhile
    counts whole, one that exited meanwhile not at all."""
    return sum(now - before.get(pid, 0.0) for pid, now in cpu_by_pid(pids).items())


def machine_busy_seconds() -> float:
    """Busy (not idle, not iowait) seconds of every CPU since boot."""
    return sum(bench.cpu_busy_seconds(cpu) for cpu in range(os.cpu_count() or 1))


def reaped_children_cpu_seconds() -> float:
    """CPU of this script's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def is_pyproxy(pid: int) -> bool:
    """True while `pid` is a running pyproxy process (not a zombie, not a reused PID)."""
    try:
        return b"pyproxy" in Path(f"/proc/{pid}/cmdline").read_bytes()  # empty for a zombie
    except OSError:
        return False


def stop_leftovers(pids: set[int]) -> list[int]:
    """The workers in `pids` still running after their master exited, stopped by PID."""
    left = sorted(pid for pid in pids if is_pyproxy(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while any(is_pyproxy(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.1)
    return left


def wait_for_workers(admin: str, workers: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the master lists `workers` serving workers (GET /admin/backends)."""
    deadline = time.monotonic() + 60
    serving: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://{admin}/admin/backends", timeout=5) as resp:
                serving = json.loads(resp.read()).get("workers", [])
            if len(serving) == workers:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{len(serving)} of {workers} workers serving after 60 s")


# ---------------------------------------------------------------------------
# One config, one round.
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """One measured wrk run against one worker count in one round."""

    workers: int
    round: int
    connections: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers + socket errors
    wall_s: float  # the time the CPU figures below were counted over
    proxy_cpu_s: float  # the master and every worker
    wrk_cpu_s: float
    backend_cpu_s: float
    machine_cpu_s: float  # every CPU's busy time, whoever used it
    proxy_processes: int
    replaced: bool  # the proxy's processes changed during the run

    @property
    def other_cpu_s(self) -> float:
        """The machine's busy time that none of ours used: other people's jobs."""
        return max(0.0, self.machine_cpu_s - self.proxy_cpu_s - self.wrk_cpu_s - self.backend_cpu_s)


def measured_run(
    rig: bench.Rig, url: str, connections: int, seconds: int, proxy: int, backend: int
) -> dict:
    """One wrk run, with the CPU each party spent meanwhile: the fields of `Run` but
    for `workers` and `round`."""
    proxy_before, backend_tree = process_tree(proxy), process_tree(backend)
    proxy_cpu, backend_cpu = cpu_by_pid(proxy_before), cpu_by_pid(backend_tree)
    machine, wrk, started = machine_busy_seconds(), reaped_children_cpu_seconds(), time.monotonic()
    load = bench.run_wrk(rig, url, connections, seconds)  # wrk is the only child reaped here
    wall = time.monotonic() - started
    wrk = reaped_children_cpu_seconds() - wrk
    machine = machine_busy_seconds() - machine
    proxy_after = process_tree(proxy)
    return {
        "connections": connections,
        "requests": load.requests,
        "rps": load.rps,
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "errors": load.errors,
        "wall_s": wall,
        "proxy_cpu_s": cpu_since(proxy_cpu, proxy_after),
        "wrk_cpu_s": wrk,
        "backend_cpu_s": cpu_since(backend_cpu, backend_tree),
        "machine_cpu_s": machine,
        "proxy_processes": len(proxy_after),
        "replaced": sorted(proxy_before) != sorted(proxy_after),
    }


def measure(
    workers: int,
    config: Path,
    round_no: int,
    rig: bench.Rig,
    args: argparse.Namespace,
    backend: bench.Backend,
) -> tuple[list[Run], list[int]]:
    """Start pyproxy with `config`, wait for its workers, warm up, run wrk at each of
    CONNECTIONS, stop it. Returns the runs and the workers left behind (stopped now)."""
    settings = json.loads(config.read_text())
    url = f"http://{settings['listen']}/1k"
    proc = rig.procs.start(
        [sys.executable, "-m", "pyproxy", "-c", str(config)],
        env=bench.proxy_environment(),
        log=config.with_suffix(".out"),
    )
    seen: set[int] = set()
    try:
        bench.wait_http(url, 30, proc)
        if workers > 1:  # workers: 1 is the single process, with no master
            wait_for_workers(settings["admin"]["listen"], workers, proc)
        seen.update(process_tree(proc.pid))
        if len(seen) != (workers + 1 if workers > 1 else 1):
            # The CPU figures sum these processes: a miscount would make them wrong.
            raise RuntimeError(f"expected {workers} worker(s), found processes {sorted(seen)}")
        bench.run_wrk(rig, url, WARMUP_CONNECTIONS, args.warmup)
        runs = []
        for connections in CONNECTIONS:
            figures = measured_run(rig, url, connections, args.duration, proc.pid, backend.proc.pid)
            seen.update(process_tree(proc.pid))
            runs.append(Run(workers, round_no, **figures))
    finally:
        rig.procs.stop(proc)
        left = stop_leftovers(seen - {proc.pid})
    return runs, left


# ---------------------------------------------------------------------------
# Summary: medians over rounds.
# ---------------------------------------------------------------------------


def cores(runs: list[Run], part: str) -> float:
    """Median over `runs` of CPU seconds per wall second: how many cores `part` used."""
    return statistics.median(getattr(r, part) / r.wall_s for r in runs)


def summarize(runs: list[Run], counts: list[int]) -> dict[int, dict[str, float]]:
    """Per worker count: the medians over rounds, and ratios to the smallest count."""
    rows: dict[int, dict[str, float]] = {}
    for workers in counts:
        mine = [r for r in runs if r.workers == workers]
        c16 = [r for r in mine if r.connections == 16]
        c64 = [r for r in mine if r.connections == 64]
        rps64 = [r.rps for r in c64]
        # Per round, the proxy's CPU over both runs / the requests of both runs.
        per_round = [
            [r for r in mine if r.round == round_no] for round_no in {r.round for r in mine}
        ]
        rows[workers] = {
            "rps_c16": statistics.median(r.rps for r in c16),
            "rps_c64": statistics.median(rps64),
            "spread_c64": (max(rps64) - min(rps64)) / statistics.median(rps64),
            "p50_c64_ms": statistics.median(r.p50_ms for r in c64),
            "p99_c64_ms": statistics.median(r.p99_ms for r in c64),
            "cpu_us_per_req": statistics.median(
                sum(r.proxy_cpu_s for r in both) * 1e6 / max(sum(r.requests for r in both), 1)
                for both in per_round
            ),
            "proxy_cores": cores(c64, "proxy_cpu_s"),
            "wrk_cores": cores(c64, "wrk_cpu_s"),
            "backend_cores": cores(c64, "backend_cpu_s"),
            "other_cores": cores(c64, "other_cpu_s"),
            "idle_cores": statistics.median(
                max(0.0, (os.cpu_count() or 1) - r.machine_cpu_s / r.wall_s) for r in c64
            ),
            "errors": float(sum(r.errors for r in mine)),
        }
    base = rows[min(counts)]
    for row in rows.values():
        row["ratio_c16"] = row["rps_c16"] / base["rps_c16"]
        row["ratio_c64"] = row["rps_c64"] / base["rps_c64"]
    return rows


def print_tables(rows: dict[int, dict[str, float]]) -> None:
    base = min(rows)
    columns = [
        ("req/s c16", "rps_c16", "{:.0f}"),
        ("req/s c64", "rps_c64", "{:.0f}"),
        (f"x c16 vs {base}", "ratio_c16", "{:.2f}x"),
        (f"x c64 vs {base}", "ratio_c64", "{:.2f}x"),
        ("spread c64", "spread_c64", "{:.0%}"),
        ("p50 c64 ms", "p50_c64_ms", "{:.1f}"),
        ("p99 c64 ms", "p99_c64_ms", "{:.1f}"),
        ("CPU us/req", "cpu_us_per_req", "{:.0f}"),
        ("errors", "errors", "{:.0f}"),
    ]
    print("\nworkers" + "".join(f"{h:>14}" for h, _, _ in columns))
    for workers, row in rows.items():
        print(f"{workers:>7}" + "".join(f"{fmt.format(row[k]):>14}" for _, k, fmt in columns))
    parties = ("proxy", "wrk", "backend", "other", "idle")
    print(f"\ncores busy during the c64 runs (of {os.cpu_count()} CPUs, shared by all):")
    print("workers" + "".join(f"{p:>10}" for p in parties))
    for workers, row in rows.items():
        print(f"{workers:>7}" + "".join(f"{row[p + '_cores']:>10.2f}" for p in parties))


def check_target(rows: dict[int, dict[str, float]]) -> dict | None:
    """The issue's check, when both worker counts were measured."""
    more, fewer, bound = TARGET
    if more not in rows or fewer not in rows:
        return None
    ratio = rows[more]["rps_c64"] / rows[fewer]["rps_c64"]
    return {"check": f"workers {more} / workers {fewer} req/s at c64 >= {bound}",
            "ratio": ratio, "met": ratio >= bound}  # fmt: skip


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def worker_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of worker counts >= 1")
    return counts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="pyproxy req/s by number of workers")
    parser.add_argument(
        "--workers", type=worker_counts, default=[1, 2], help="worker counts (default 1,2)"
    )
    bench.add_run_options(parser, warmup=2, threads_help="threads per worker")
    return bench.run_options(parser)


def write_configs(workdir: Path, backend: bench.Backend, args: argparse.Namespace) -> dict:
    """One config per worker count: bench.py's default settings (own ports each), the
    access log to a file; each must pass `python -m pyproxy --check`."""
    paths = {}
    for workers in args.workers:
        config = {
            **bench.pyproxy_settings(workdir, backend, args.threads)["default"],
            "workers": workers,
            "access_log": {"enabled": True, "path": str(workdir / f"access-w{workers}.log")},
        }
        path = workdir / f"workers-{workers}.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
        problem = bench.pyproxy_check(path)
        if problem:
            sys.exit(f"bench_workers: the config for workers {workers} fails --check: {problem}")
        paths[workers] = path
    return paths


def main() -> int:
    args = parse_args()
    wrk = bench.find_or_install("wrk", "wrk", required=True) or "wrk"
    nginx = bench.find_or_install("nginx", "nginx-light", required=False)
    info = bench.machine()
    print(
        f"{info['nproc']} CPUs ({info['cpu_model']}); no pinning: the workers need the "
        f"cores, so wrk and the backend share the {info['nproc']} CPUs with them"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    procs = bench.Processes()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-workers-"))
    (workdir / "summary.lua").write_text(bench.WRK_SCRIPT)
    rig = bench.Rig(wrk, workdir / "summary.lua", None, None, procs)
    runs: list[Run] = []
    leftovers: list[int] = []
    with bench.run_and_clean_up(procs, workdir, args.keep, "bench_workers"):
        backend = bench.start_backend(procs, workdir, nginx, None)
        paths = write_configs(workdir, backend, args)
        counts = list(paths)
        print(
            f"backend: {backend.kind}; workers {', '.join(map(str, counts))} x {args.rounds} "
            f"round(s) x ({args.warmup} s warm-up + {args.duration} s at each of "
            f"{', '.join(f'c{c}' for c in CONNECTIONS)})",
            flush=True,
        )
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(counts)  # none is always first or last
            for workers in counts[shift:] + counts[:shift]:
                measured, left = measure(workers, paths[workers], round_no, rig, args, backend)
                runs.extend(measured)
                if left:
                    leftovers.extend(left)
                    print(f"WARNING: workers {left} outlived their master; stopped by PID")
                shown = ", ".join(f"{r.rps:.0f} req/s at c{r.connections}" for r in measured)
                print(f"round {round_no}: workers {workers}: {shown}", flush=True)

    rows = summarize(runs, counts)
    command = " ".join(["python scripts/bench_workers.py", *sys.argv[1:]])
    print(f"\ncommand: {command}")
    print(
        f"backend {backend.kind}; threads {args.threads} per worker; wrk -t1; {args.rounds} "
        f"round(s) x {args.duration} s per run; medians over rounds; "
        f"load average after: {os.getloadavg()[0]:.2f}"
    )
    print_tables(rows)
    target = check_target(rows)
    if target:
        verdict = "met" if target["met"] else "MISSED"
        print(f"\nthe issue's check: {target['check']}: {target['ratio']:.2f}x, {verdict}")
    if any(r["other_cores"] > NOISY_CORES for r in rows.values()):
        print(
            f"WARNING: other processes used more than {NOISY_CORES} of a core during the "
            "c64 runs: the machine was busy, the req/s figures are noisy"
        )
    if any(r.replaced for r in runs):
        print("WARNING: a worker was replaced during a run: its CPU before it exited is missing")
    if any(r["errors"] for r in rows.values()):
        print("WARNING: some runs had errors (see the errors column): those rows mean little")
    if leftovers:
        print(f"WARNING: {len(leftovers)} worker(s) outlived their master (stopped by PID)")
    else:
        print("no worker outlived its master")
    if args.json:
        report = {
            "command": command,
            "machine": info,
            "backend": backend.kind,
            "settings": {
                "workers": counts,
                "rounds": args.rounds,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "threads_per_worker": args.threads,
                "connections": CONNECTIONS,
                "pinning": None,
            },
            "runs": [asdict(r) for r in runs],
            "summary": rows,
            "target": target,
            "leftover_workers": leftovers,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
