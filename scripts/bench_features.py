#!/usr/bin/env python3
"""scripts/bench_features.py: what each pyproxy feature costs, one feature at a time.

    python scripts/bench_features.py                  # 3 interleaved rounds, 5 s per run
    python scripts/bench_features.py --quick          # smoke run, about a minute
    python scripts/bench_features.py --json out.json  # also keep every figure as JSON

What it measures: the CPU time the pyproxy process spends per request, with one
feature turned on at a time, so that each feature's price can be read on its own.

How: one backend (nginx, or bench.py's Python stand-in) and one pyproxy at a time,
started exactly as scripts/bench.py starts them (its functions are imported, not
copied): pyproxy on one CPU, wrk and the backend on another, one worker process,
bench.py's default number of threads. Each config gets a warm-up and then one wrk
run at 16 connections for `--duration` seconds against a 1 KiB body; the CPU that
pyproxy used during that run (utime + stime from /proc, every thread) divided by the
requests wrk completed is "CPU us/req". The whole series runs `--rounds` times, each
round starting one config later, so slow drift of the machine hits every config alike;
the table shows medians over rounds. Every config passes `python -m pyproxy --check`
before anything runs.

The configs (the settings are bench.py's production ones):

    minimal            bench.py's default config with every feature that can be
                       switched off switched off: no health checks, no circuit breaker,
                       no retries, no access log. The reference row (1.00x).
    health checks      + health checks every 2 s
    circuit breaker    + the circuit breaker
    retries            + up to 2 retries (GET is idempotent, so every request is eligible)
    rate limits        + per-client and per-backend token buckets, limits so high that
                       they never refuse: the price of the bookkeeping alone
    sticky cookie      + sticky sessions by cookie; wrk sends no cookie back, so every
                       answer sets one: a first visit on every request, the worst case
    access log json    + the access log, JSON lines to a file
    access log text    + the access log, text lines to a file (the alternative to JSON,
                       so it is left out of the sum below)
    least_connections  + the least_connections strategy instead of round_robin
    preserve_host+trusted  + preserve_host (already on by default) and trusted_proxies;
                       wrk's 127.0.0.1 is not among them, so this is the price of the
                       check, not of believing X-Forwarded-For
    default            bench.py's default config: every default, which already turns
                       health checks (every 5 s), the breaker, retries and a text access
                       log to stdout on (stdout goes to a file here)
    production         bench.py's production config: all of the above at once

How to read the table: "ratio" is CPU per request against minimal (1.30x = 30 % more
CPU per request); "delta" is the same in microseconds, the price of the feature per
request; "spread" is the highest minus the lowest CPU us/req over the rounds (0 with
one round); "req/s ratio" is throughput against minimal (below 1.00x = slower);
"busy" is the largest share of pyproxy's CPU that other processes took during a run
(above 10 %, the machine was busy and the row is noisy). A delta smaller than the
spreads of its row and of minimal is not a finding.

The line under the table adds up the single-feature deltas; production's own delta
should be close to that sum. A large gap means features cost more (or less) together
than apart, or that production's other settings (the line names them) cost something.
Mind that every delta subtracts the same minimal figure, so an error of e in it is an
error of 8e in the sum of eight parts: trust the comparison only from a quiet machine
and several rounds (the default 3, or more).

Loopback only. Every process this script starts is stopped by its PID, also on Ctrl-C.
Do not run it on a busy machine for figures you mean to publish: use --quick there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the sibling script: processes, /proc, wrk, nginx, the pyproxy configs

CONNECTIONS = 16  # wrk connections: half of pyproxy's 32 threads, every one busy
REFERENCE = "minimal"

# What "minimal" switches off. Metrics, the admin listener and preserve_host have no
# off switch (or are on in both of bench.py's configs), so every row pays for them.
SWITCHED_OFF = {
    "health_check": {"enabled": False},
    "circuit_breaker": {"enabled": False},
    "retries": {"max_retries": 0},
    "access_log": {"enabled": False},
}

# Production logs JSON: the text row is the other choice, not one of its parts.
NOT_IN_THE_SUM = {"access log text"}


def feature_configs(workdir: Path, backend: bench.Backend, threads: int) -> dict[str, dict]:
    """Every config to measure, by row name, in the order of the table."""
    settings = bench.pyproxy_settings(workdir, backend, threads)
    default, production = settings["default"], settings["production"]
    minimal = {**default, **SWITCHED_OFF}

    def access_log(log_format: str) -> dict:
        path = str(workdir / f"access-{log_format}.log")
        return {"access_log": {**production["access_log"], "format": log_format, "path": path}}

    one_feature = {
        "health checks": {"health_check": production["health_check"]},
        "circuit breaker": {"circuit_breaker": production["circuit_breaker"]},
        "retries": {"retries": production["retries"]},
        "rate limits": {"rate_limit": production["rate_limit"]},
        "sticky cookie": {"sticky": production["sticky"]},
        "access log json": access_log("json"),
        "access log text": access_log("text"),
        "least_connections": {"strategy": production["strategy"]},
        "preserve_host+trusted": {
            key: production[key] for key in ("preserve_host", "trusted_proxies")
        },
    }
    configs = {REFERENCE: minimal}
    configs.update({name: {**minimal, **extra} for name, extra in one_feature.items()})
    configs["default"] = default
    configs["production"] = production
    return configs


def not_measured_alone(configs: dict[str, dict]) -> list[str]:
    """Production's settings that no single-feature row turns on (ports aside)."""
    reference, production = configs[REFERENCE], configs["production"]

    def changed(config: dict) -> set[str]:
        return {key for key in config if config[key] != reference.get(key)}

    covered = {"listen"}  # every config has its own port
    for name, config in configs.items():
        if name not in (REFERENCE, "default", "production"):
            covered |= changed(config)
    return sorted(changed(production) - covered)


def with_own_ports(configs: dict[str, dict]) -> dict[str, dict]:
    """Each config its own ports (one runs at a time, but a fresh port never meets the
    last run's connections), and one worker process, stated rather than assumed."""
    return {
        name: {
            **config,
            "listen": f"127.0.0.1:{bench.free_port()}",
            "admin": {**config["admin"], "listen": f"127.0.0.1:{bench.free_port()}"},
            "workers": 1,
        }
        for name, config in configs.items()
    }


def write_and_check(workdir: Path, configs: dict[str, dict]) -> dict[str, Path]:
    """Write each config (JSON is valid YAML) and make sure pyproxy accepts it."""
    paths = {}
    for name, config in configs.items():
        path = workdir / f"features-{name.replace(' ', '-').replace('+', '-')}.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")
        problem = bench.pyproxy_check(path)
        if problem:
            sys.exit(f"bench_features: config {name!r} ({path}) fails --check: {problem}")
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------
# One config, one round.
# ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One measured wrk run of one config in one round."""

    config: str
    round: int
    requests: int
    seconds: float
    cpu_s: float  # pyproxy's CPU time during the run
    errors: int  # non-2xx/3xx answers + socket errors
    noise: float | None  # share of pyproxy's CPU used by other processes meanwhile

    @property
    def cpu_us_per_req(self) -> float:
        return self.cpu_s * 1e6 / max(self.requests, 1)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def measure(
    name: str, config: Path, round_no: int, rig: bench.Rig, args: argparse.Namespace
) -> Sample:
    """Start pyproxy with `config`, warm it up, run wrk once, stop it."""
    listen = json.loads(config.read_text())["listen"]
    url = f"http://{listen}/1k"
    proc = rig.procs.start(
        [sys.executable, "-m", "pyproxy", "-c", str(config)],
        cpu=rig.proxy_cpu,
        env=bench.proxy_environment(),
        log=config.with_suffix(".out"),
    )
    try:
        bench.wait_http(url, 30, proc)
        # Warm-up, not counted: the upstream pool grows to one connection per busy
        # thread, the first health probes and the first log lines are behind us.
        bench.run_wrk(rig, url, CONNECTIONS, args.warmup, proc.pid)
        load = bench.run_wrk(rig, url, CONNECTIONS, args.duration, proc.pid)
    finally:
        rig.procs.stop(proc)
    assert load.proxy_cpu_s is not None  # run_wrk measures the process it was given
    return Sample(
        name, round_no, load.requests, load.seconds, load.proxy_cpu_s, load.errors, load.noise
    )


# ---------------------------------------------------------------------------
# Summary: medians over rounds, against the reference.
# ---------------------------------------------------------------------------


def summarize(samples: list[Sample], names: list[str]) -> dict[str, dict[str, float]]:
    """Per config: medians over rounds, and ratio/delta against REFERENCE."""
    rows: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [s for s in samples if s.config == name]
        rows[name] = {
            "cpu_us_per_req": statistics.median(s.cpu_us_per_req for s in mine),
            # How far apart the rounds were: a delta smaller than this is not a finding.
            "spread_us": max(s.cpu_us_per_req for s in mine) - min(s.cpu_us_per_req for s in mine),
            "rps": statistics.median(s.rps for s in mine),
            "errors": float(sum(s.errors for s in mine)),
            "busy": max((s.noise or 0.0) for s in mine),
        }
    base = rows[REFERENCE]
    for row in rows.values():
        row["cpu_ratio"] = row["cpu_us_per_req"] / base["cpu_us_per_req"]
        row["delta_us_per_req"] = row["cpu_us_per_req"] - base["cpu_us_per_req"]
        row["rps_ratio"] = row["rps"] / base["rps"]
    return rows


def sum_of_parts(rows: dict[str, dict[str, float]]) -> float:
    """The single-feature deltas added up: what production would cost if they added."""
    parts = [n for n in rows if n not in (REFERENCE, "default", "production", *NOT_IN_THE_SUM)]
    return sum(rows[n]["delta_us_per_req"] for n in parts)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    header = ("CPU us/req", "ratio", "delta us/req", "spread", "req/s", "req/s ratio", "errors")
    print(f"\n{'config':<22}" + "".join(f"{h:>13}" for h in header) + "     busy")
    for name, r in rows.items():
        print(
            f"{name:<22}{r['cpu_us_per_req']:>13.1f}{r['cpu_ratio']:>12.2f}x"
            f"{r['delta_us_per_req']:>+13.1f}{r['spread_us']:>13.1f}"
            f"{r['rps']:>13.0f}{r['rps_ratio']:>12.2f}x{r['errors']:>13.0f}{r['busy']:>9.0%}"
        )


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="what each pyproxy feature costs")
    bench.add_run_options(parser, warmup=1, threads_help="pyproxy's worker threads")
    return bench.run_options(parser)


def main() -> int:
    args = parse_args()
    wrk = bench.find_or_install("wrk", "wrk", required=True) or "wrk"
    nginx = bench.find_or_install("nginx", "nginx-light", required=False)
    proxy_cpu, load_cpu = bench.pick_cpus()
    info = bench.machine()
    pinning = (
        f"pyproxy on CPU {proxy_cpu}, wrk + backend on CPU {load_cpu}"
        if proxy_cpu is not None
        else "no pinning (fewer than 2 CPUs or no taskset)"
    )
    print(f"{info['nproc']} CPUs ({info['cpu_model']}); {pinning}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # this script stays off pyproxy's CPU too
    procs = bench.Processes()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-features-"))
    (workdir / "summary.lua").write_text(bench.WRK_SCRIPT)
    rig = bench.Rig(wrk, workdir / "summary.lua", proxy_cpu, load_cpu, procs)
    samples: list[Sample] = []
    with bench.run_and_clean_up(procs, workdir, args.keep, "bench_features"):
        backend = bench.start_backend(procs, workdir, nginx, load_cpu)
        configs = feature_configs(workdir, backend, args.threads)
        extra = not_measured_alone(configs)
        configs = with_own_ports(configs)
        paths = write_and_check(workdir, configs)
        names = list(paths)
        print(
            f"backend: {backend.kind}; {len(names)} configs x {args.rounds} round(s) x "
            f"({args.warmup} s warm-up + {args.duration} s at c{CONNECTIONS})",
            flush=True,
        )
        for round_no in range(args.rounds):
            # Each round starts one config later: none is always first or last.
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                sample = measure(name, paths[name], round_no + 1, rig, args)
                samples.append(sample)
                print(
                    f"round {round_no + 1}: {name:<22} {sample.cpu_us_per_req:7.1f} us/req "
                    f"{sample.rps:7.0f} req/s, {sample.errors} errors",
                    flush=True,
                )

    rows = summarize(samples, names)
    command = " ".join(["python scripts/bench_features.py", *sys.argv[1:]])
    print(f"\ncommand: {command}")
    print(
        f"backend {backend.kind}; threads {args.threads}; {args.rounds} round(s) x "
        f"{args.duration} s at c{CONNECTIONS}; medians over rounds; "
        f"load average after: {os.getloadavg()[0]:.2f}"
    )
    print_table(rows)
    parts = sum_of_parts(rows)
    print(
        f"\nsum of the single-feature deltas (all but {', '.join(sorted(NOT_IN_THE_SUM))}): "
        f"{parts:+.1f} us/req\nproduction's delta: {rows['production']['delta_us_per_req']:+.1f}"
        f" us/req (production also sets, not measured alone: {', '.join(extra) or 'nothing'})"
    )
    if any(r["busy"] > 0.1 for r in rows.values()):
        print(
            "WARNING: other processes used more than 10% of pyproxy's CPU during some runs: "
            "the machine was busy, the figures are noisy"
        )
    if any(r["errors"] for r in rows.values()):
        print("WARNING: some runs had errors (see the errors column): those rows mean little")
    if args.json:
        report = {
            "command": command,
            "machine": info,
            "backend": backend.kind,
            "settings": {
                "rounds": args.rounds,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "threads": args.threads,
                "connections": CONNECTIONS,
                "pinning": {"proxy_cpu": proxy_cpu, "load_cpu": load_cpu},
            },
            "configs": configs,
            "samples": [{**asdict(s), "cpu_us_per_req": s.cpu_us_per_req} for s in samples],
            "summary": rows,
            "sum_of_single_feature_deltas_us": parts,
            "production_not_measured_alone": extra,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
