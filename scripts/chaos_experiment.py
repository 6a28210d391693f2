#!/usr/bin/env python3
"""scripts/chaos_experiment.py: watch retries hide failures and a circuit breaker open.

One command, about 30 seconds, loopback only, no arguments needed:

    python scripts/chaos_experiment.py           # the full run (~30 s)
    python scripts/chaos_experiment.py --quick   # shorter phases (~13 s)

What runs (all in this process, all on 127.0.0.1, ephemeral ports):

    clients (4 threads, ~100 req/s) -> pyproxy -> app1
                                              -> app2
                                              -> chaos sidecar (a 2nd pyproxy) -> app3

The main pyproxy has retries on (2 extra attempts, each to a backend not yet tried)
and its circuit breaker on (5 consecutive failures open a backend's circuit for 2 s,
doubling up to 4 s). Health checks are off so that only the breaker reacts.
pyproxy's `chaos` section applies to every attempt it makes; to break *one* backend,
app3 is reached through a second pyproxy whose own config turns chaos on. Each phase
is a config change applied the way an operator applies one: rewrite the YAML file and
reload.

Phases:
  baseline      no chaos anywhere.
  chaos 30%     the main proxy fails 30% of its attempts on purpose (error_status 503).
                Clients still see ~97%: a request fails only if all 3 attempts do (0.3^3).
  app3 broken   the sidecar fails 100% of app3's requests. Retries move each one to
                app1/app2; after 5 in a row app3's circuit opens, then half-opens for one
                trial request every 2-4 s, which fails and re-opens it.
  recovered     the sidecar's chaos is off again. The next trial succeeds and the circuit
                closes.

Every second it prints what clients saw next to what was injected, the retries, and
each backend's circuit (from /admin/backends and /metrics). It stops every server and
thread it started, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pyproxy.config.load import load_config
from pyproxy.demo import DemoBackends
from pyproxy.process.service import Service

CLIENTS = 4
CLIENT_RATE = 25.0  # requests per second per client thread (~100/s in all)


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    proxy_error_rate: float  # chaos.error_rate of the main proxy (every attempt)
    app3_error_rate: float  # chaos.error_rate of the sidecar in front of app3
    expect: str  # one line for the learner


PHASES = (
    Phase("baseline", 5, 0.0, 0.0, "no chaos: every request should succeed"),
    Phase(
        "chaos 30%", 9, 0.3, 0.0,
        "30% of attempts fail on purpose; retries hide most (clients ~97%)",
    ),
    Phase(
        "app3 broken", 9, 0.0, 1.0,
        "app3 answers 503 to everything; retries hide it, then its circuit opens",
    ),
    Phase("recovered", 7, 0.0, 0.0, "app3 works again; the next trial request closes it"),
)  # fmt: skip


# -- the servers ---------------------------------------------------------------------


def start_backends() -> DemoBackends:
    """Three demo backends (pyproxy.demo's) on ephemeral ports. DemoBackends stops each
    loop before closing its sockets; waitress's own server.run() cannot be stopped."""
    return DemoBackends(ports=(0, 0, 0))


def main_proxy_yaml(urls: list[str], sidecar_url: str, error_rate: float) -> str:
    return f"""\
# The main pyproxy: retries and the breaker on, chaos on every attempt it makes.
listen: "127.0.0.1:0"
admin: {{listen: "127.0.0.1:0"}}
threads: 16
backends:
  - {{url: "{urls[0]}", name: app1}}
  - {{url: "{urls[1]}", name: app2}}
  - {{url: "{sidecar_url}", name: app3}}   # app3, through the chaos sidecar
timeouts: {{connect: 1s, read: 5s, total: 10s}}
health_check: {{enabled: false}}
retries: {{max_retries: 2, backoff: 0s}}
circuit_breaker:
  failure_threshold: 5
  open_duration: 2s
  max_open_duration: 4s
  half_open_requests: 1
chaos: {{error_rate: {error_rate}, error_status: 503}}
access_log: {{enabled: false}}
"""


def sidecar_yaml(app3_url: str, error_rate: float) -> str:
    return f"""\
# The chaos sidecar: a plain pyproxy in front of app3 alone, failing on purpose.
listen: "127.0.0.1:0"
admin: {{listen: "127.0.0.1:0"}}
threads: 16
backends:
  - {{url: "{app3_url}", name: app3-real}}
health_check: {{enabled: false}}
circuit_breaker: {{enabled: false}}
retries: {{max_retries: 0}}
chaos: {{error_rate: {error_rate}, error_status: 503}}
access_log: {{enabled: false}}
"""


def start_service(path: Path, text: str) -> Service:
    path.write_text(text, encoding="utf-8")
    service = Service(load_config(str(path)), registry=CollectorRegistry())
    service.start()
    return service


def apply(service: Service, path: Path, text: str) -> None:
    """What an operator does: rewrite the config file, then reload (SIGHUP would too)."""
    path.write_text(text, encoding="utf-8")
    result = service.reload("chaos experiment")
    if not result.ok:
        raise SystemExit(f"reload of {path} failed: {result.errors}")


# -- the load ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw. Guarded by `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    ok: int = 0  # 2xx
    failed: int = 0  # anything else, or no answer

    def add(self, success: bool) -> None:
        with self.lock:
            self.sent += 1
            if success:
                self.ok += 1
            else:
                self.failed += 1

    def read(self) -> tuple[int, int]:
        with self.lock:
            return self.sent, self.ok


def client_loop(url: str, tally: Tally, stop: threading.Event) -> None:
    interval = 1.0 / CLIENT_RATE
    with requests.Session() as session:
        session.trust_env = False  # loopback only: never a proxy from the environment
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                answer = session.get(url + "/experiment", timeout=5)
                tally.add(200 <= answer.status_code < 300)
            except requests.RequestException:
                tally.add(False)
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))


# -- what we read each second ----------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    sent: int
    ok: int
    attempts: int  # upstream attempts of the main proxy (sum of requests_total)
    injected: float  # chaos failures: main proxy + sidecar
    retries: float
    opens: dict[str, float]
    circuits: dict[str, str]


def scrape(admin_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = requests.get(admin_url + "/metrics", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def summed(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **want: str
) -> float:
    return sum(
        value
        for (sample_name, labels), value in samples.items()
        if sample_name == name and all((k, v) in labels for k, v in want.items())
    )


def read(tally: Tally, proxy: Service, sidecar: Service) -> Reading:
    sent, ok = tally.read()
    backends = requests.get(proxy.admin_url + "/admin/backends", timeout=5).json()["backends"]
    main, side = scrape(proxy.admin_url), scrape(sidecar.admin_url)
    names = [b["name"] for b in backends]
    return Reading(
        sent=sent,
        ok=ok,
        attempts=sum(b["requests_total"] for b in backends),
        injected=summed(main, "proxy_errors_total", reason="chaos")
        + summed(side, "proxy_errors_total", reason="chaos"),
        retries=summed(main, "proxy_retries_total"),
        opens={n: summed(main, "proxy_circuit_opens_total", backend=n) for n in names},
        circuits={b["name"]: b["circuit"] for b in backends},
    )


def percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


CIRCUIT = {"closed": "closed", "open": "OPEN", "half_open": "half-open"}
HEADER = (
    f"{'t':>4}  {'phase':<12} {'req/s':>5}  {'clients ok':>10}  {'injected':>8}  "
    f"{'retries':>7}  {'app1':<10}{'app2':<10}{'app3':<10}{'opens':>5}"
)


def line(t: float, phase: str, before: Reading, now: Reading) -> str:
    sent, ok = now.sent - before.sent, now.ok - before.ok
    attempts = now.attempts - before.attempts
    states = "".join(
        f"{CIRCUIT.get(now.circuits.get(n, '?'), '?'):<10}" for n in ("app1", "app2", "app3")
    )
    return (
        f"{t:4.0f}  {phase:<12} {sent:5d}  {percent(ok, sent):>10}  "
        f"{percent(now.injected - before.injected, attempts):>8}  "
        f"{now.retries - before.retries:7.0f}  {states}{sum(now.opens.values()):5.0f}"
    )


# -- the experiment --------------------------------------------------------------------------


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[tuple[DemoBackends, Service, Service, Path, Path]]:
    backends = start_backends()
    services: list[Service] = []
    try:
        sidecar_path, proxy_path = workdir / "sidecar.yaml", workdir / "pyproxy.yaml"
        sidecar = start_service(sidecar_path, sidecar_yaml(backends.urls[2], 0.0))
        services.append(sidecar)
        proxy = start_service(proxy_path, main_proxy_yaml(backends.urls, sidecar.proxy_url, 0.0))
        services.append(proxy)
        yield backends, proxy, sidecar, proxy_path, sidecar_path
    finally:
        for service in reversed(services):
            service.close()
        backends.close()


def run(phases: tuple[Phase, ...]) -> None:
    logging.basicConfig(level=logging.WARNING, format="        ! %(name)s: %(message)s")
    logging.getLogger("pyproxy.proxy.attempt").setLevel(logging.INFO)  # circuit transitions
    stop = threading.Event()
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="pyproxy-chaos-") as tmp, running(Path(tmp)) as (
        backends, proxy, sidecar, proxy_path, sidecar_path,
    ):  # fmt: skip
        print(
            f"backends: app1 {backends.urls[0]}  app2 {backends.urls[1]}  app3 {backends.urls[2]}"
        )
        print(f"chaos sidecar in front of app3: {sidecar.proxy_url}")
        print(f"pyproxy: {proxy.proxy_url}   admin: {proxy.admin_url}/admin/status")
        print("injected = attempts failed on purpose / upstream attempts; clients ok = 2xx / sent")
        clients = [
            threading.Thread(
                target=client_loop, args=(proxy.proxy_url, tally, stop),
                name=f"experiment-client-{i}", daemon=True,
            )
            for i in range(CLIENTS)
        ]  # fmt: skip
        totals: list[tuple[Phase, Reading, Reading]] = []
        started = time.monotonic()
        try:
            for thread in clients:
                thread.start()
            for phase in phases:
                apply(
                    proxy,
                    proxy_path,
                    main_proxy_yaml(backends.urls, sidecar.proxy_url, phase.proxy_error_rate),
                )
                apply(sidecar, sidecar_path, sidecar_yaml(backends.urls[2], phase.app3_error_rate))
                print(f"\n== {phase.name}: {phase.expect}")
                print(HEADER)
                first = previous = read(tally, proxy, sidecar)
                ends = time.monotonic() + phase.seconds
                tick = time.monotonic()
                while (left := ends - time.monotonic()) > 0:
                    tick += 1.0
                    time.sleep(max(0.0, min(tick - time.monotonic(), left)))
                    now = read(tally, proxy, sidecar)
                    print(line(time.monotonic() - started, phase.name, previous, now), flush=True)
                    previous = now
                totals.append((phase, first, previous))  # fmt: skip
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=10)
        summary(totals)


def summary(totals: list[tuple[Phase, Reading, Reading]]) -> None:
    print("\n== summary")
    print(f"{'phase':<12} {'sent':>6}  {'clients ok':>10}  {'injected':>8}  {'retries':>7}  opens")
    for phase, first, last in totals:
        sent, ok = last.sent - first.sent, last.ok - first.ok
        opens = {n: last.opens[n] - first.opens.get(n, 0.0) for n in last.opens}
        opened = ", ".join(f"{n} x{v:.0f}" for n, v in opens.items() if v) or "none"
        print(
            f"{phase.name:<12} {sent:6d}  {percent(ok, sent):>10}  "
            f"{percent(last.injected - first.injected, last.attempts - first.attempts):>8}  "
            f"{last.retries - first.retries:7.0f}  {opened}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (~13 s in all)")
    args = parser.parse_args()
    phases = PHASES
    if args.quick:
        phases = tuple(Phase(p.name, max(2, p.seconds // 2), p.proxy_error_rate,
                             p.app3_error_rate, p.expect) for p in PHASES)  # fmt: skip
    os.environ.pop("PYPROXY_ADMIN_TOKEN", None)  # the experiment changes nothing via the API
    try:
        run(phases)
    except KeyboardInterrupt:
        print("\ninterrupted; everything was stopped")


if __name__ == "__main__":
    main()
