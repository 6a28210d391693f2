"""`workers: 2`: a master and two worker processes, run as a user runs them.

Real processes (`python -m pyproxy -c cfg`), ports on 127.0.0.1, every process (the
master and each worker it started) stopped by its PID at the end. Which worker served
a request is read from the master's /admin/backends, which shows each backend's
counters in every worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from backends import EchoBackend, free_ports
from test_cli import assert_no_traceback, cli_env, write

from pyproxy.process.slots import backoff

TOKEN = "test-token"
CONFIG = """\
listen: "127.0.0.1:{port}"
workers: 2
strategy: round_robin
backends:
  - url: {backend}
    name: app1
admin:
  listen: "127.0.0.1:{admin_port}"
  token: {token}
  state_file: {state}
"""


@dataclass
class Master:
    process: subprocess.Popen[bytes]
    proxy: str
    admin: str
    config: Path
    stderr: Path

    def backends(self) -> dict[str, object]:
        response = _session().get(self.admin + "/admin/backends", timeout=20)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def workers(self) -> list[int]:
        return [int(pid) for pid in self.backends()["workers"]]  # type: ignore[attr-defined]

    def served_by(self, name: str = "app1") -> dict[int, int]:
        """{worker pid: requests it sent to backend `name`}."""
        for backend in self.backends()["backends"]:  # type: ignore[attr-defined]
            if backend["name"] == name:
                by_pid = backend["workers"]["by_pid"]
                return {int(pid): state["requests_total"] for pid, state in by_pid.items()}
        raise AssertionError(f"no backend {name}")

    def log(self) -> str:
        return self.stderr.read_text()


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.fixture
def start_master(tmp_path: Path, echo_backend: EchoBackend) -> Iterator[Callable[[], Master]]:
    started: list[Master] = []

    def start() -> Master:
        port, admin_port = free_ports(2)
        config = write(tmp_path / "workers.yaml", CONFIG.format(
            port=port, admin_port=admin_port, backend=echo_backend.url, token=TOKEN,
            state=tmp_path / "state.json"))  # fmt: skip
        stderr = tmp_path / "master.err"
        with stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "pyproxy", "-c", str(config)],
                cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        master = Master(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}",
                        config, stderr)  # fmt: skip
        started.append(master)

        def both_serving() -> bool:
            assert process.poll() is None, master.log()
            with contextlib.suppress(requests.RequestException, AssertionError):
                return len(master.workers()) == 2
            return False

        _until(both_serving, "two workers serving")
        return master

    yield start
    for master in started:
        pids = _children(master.process.pid)
        if master.process.poll() is None:
            os.kill(master.process.pid, signal.SIGKILL)
            master.process.wait(timeout=10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The PIDs whose parent is `pid` (the master's workers), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _get_until_both_served(master: Master, limit: int = 400) -> int:
    """GETs on fresh connections until both workers served one; how many were sent."""
    with _session() as session:
        for sent in range(1, limit + 1):
            response = session.get(master.proxy + "/w", timeout=20, headers={"Connection": "close"})
            assert response.status_code == 200
            if sent % 10 == 0 and all(master.served_by().values()):
                return sent
    raise AssertionError(f"{limit} requests did not reach both workers: {master.served_by()}")


def test_both_workers_serve_the_shared_socket(start_master: Callable[[], Master]) -> None:
    master = start_master()
    workers = master.workers()

    _get_until_both_served(master)

    assert sorted(master.served_by()) == sorted(workers)
    assert sorted(_children(master.process.pid)) == sorted(workers)
    assert master.process.pid not in workers
    page = _session().get(master.admin + "/admin/status", timeout=20).text
    assert "app1: available in 2 of 2 workers" in page


def test_connections_are_spread_over_the_workers(start_master: Callable[[], Master]) -> None:
    """Each worker has its own socket on the port (SO_REUSEPORT): the kernel spreads
    connections by a hash of the client's address and port. 40 keep-alive connections
    each send one request; neither worker may take (nearly) all of them. A guard: on
    an idle machine a shared socket spreads these too; under wrk's load it did not
    (one worker held twice the other's connections: scripts/bench_workers.py)."""
    master = start_master()
    sessions = [_session() for _ in range(40)]
    try:
        for session in sessions:  # every connection open before any is reused
            assert session.get(master.proxy + "/s", timeout=20).status_code == 200
    finally:
        for session in sessions:
            session.close()
    counts = sorted(master.served_by().values())
    assert sum(counts) == 40 and counts[0] >= 8, counts  # binomial(40, 1/2): P(<8) ~ 1e-5


def test_a_second_instance_on_the_same_port_is_refused(
    start_master: Callable[[], Master], tmp_path: Path
) -> None:
    """SO_REUSEPORT would let a second group of sockets join the first one's port and
    take half of its connections; the port is tried with a plain bind first."""
    master = start_master()
    port = master.proxy.rsplit(":", 1)[1]
    (admin_port,) = free_ports(1)
    config = write(tmp_path / "second.yaml", CONFIG.format(
        port=port, admin_port=admin_port, backend="http://127.0.0.1:9", token=TOKEN,
        state=tmp_path / "second-state.json"))  # fmt: skip
    second = subprocess.run(
        [sys.executable, "-m", "pyproxy", "-c", str(config)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode != 0
    assert f"127.0.0.1:{port}" in second.stderr, second.stderr
    assert_no_traceback(second)
    assert len(master.workers()) == 2  # the first instance serves on


def test_replacement_backoff_doubles_from_1s_to_30s() -> None:
    assert [backoff(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_metrics_sum_the_request_counters_of_both_workers(
    start_master: Callable[[], Master],
) -> None:
    master = start_master()

    sent = _get_until_both_served(master)

    page = _session().get(master.admin + "/metrics", timeout=20).text
    line = 'proxy_requests_total{backend="app1",code="200",method="GET",pool="default"}'
    (total,) = [float(row.split()[-1]) for row in page.splitlines() if row.startswith(line)]
    assert total == sent == sum(master.served_by().values())
    # The per-backend gauges stay per worker: one series each, labelled with its PID.
    ups = [row for row in page.splitlines() if row.startswith("proxy_backend_up{")]
    assert sorted(row.split('worker="')[1].split('"')[0] for row in ups) == sorted(
        str(pid) for pid in master.workers()
    )


def test_a_killed_worker_is_replaced_and_a_get_client_sees_no_error(
    start_master: Callable[[], Master],
) -> None:
    """One client sends GETs one after another on fresh connections while a worker is
    SIGKILLed. The one request that worker may have accepted when it died is reset; a
    GET is idempotent (RFC 9110 §9.2.2), so the client retries it once, as a load
    balancer in front would. Asserted: every GET ends in a 200, at most one needed
    its retry, and the master replaced the worker."""
    master = start_master()
    victim, survivor = master.workers()
    stop, answered, retried, errors = threading.Event(), [0], [0], []

    def client() -> None:
        with _session() as session:
            for _ in range(2000):
                if stop.is_set():
                    return
                for attempt in range(2):
                    try:
                        response = session.get(master.proxy + "/k", timeout=20,
                                               headers={"Connection": "close"})  # fmt: skip
                    except requests.ConnectionError:
                        retried[0] += 1
                        if attempt:
                            errors.append("a retried GET failed again")
                        continue
                    if response.status_code != 200:
                        errors.append(f"status {response.status_code}")
                    answered[0] += 1
                    break

    thread = threading.Thread(target=client)
    thread.start()
    try:
        _until(lambda: answered[0] >= 20, "the client's first GETs")
        os.kill(victim, signal.SIGKILL)
        _until(lambda: victim not in master.workers() and len(master.workers()) == 2,
               "a replacement worker serving")  # fmt: skip
        before = answered[0]
        _until(lambda: answered[0] >= before + 20, "GETs after the replacement")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert retried[0] <= 1
    assert survivor in master.workers()
    assert "exited (killed by SIGKILL)" in master.log()
    page = _session().get(master.admin + "/metrics", timeout=20).text
    assert "proxy_worker_restarts_total 1.0" in page


def test_a_reload_reaches_both_workers(
    start_master: Callable[[], Master], echo_backend: EchoBackend
) -> None:
    master = start_master()
    text = master.config.read_text()
    added = f"  - url: http://127.0.0.1:{free_ports(1)[0]}\n    name: app2\n"
    write(master.config, text.replace("admin:\n", added + "admin:\n"))

    os.kill(master.process.pid, signal.SIGHUP)

    def both_have_app2() -> bool:
        with contextlib.suppress(AssertionError):
            return sorted(master.served_by("app2")) == sorted(master.workers())
        return False

    _until(both_have_app2, "app2 in both workers")


def test_an_admin_change_reaches_both_workers_and_a_replacement(
    start_master: Callable[[], Master],
) -> None:
    master = start_master()
    url = f"http://127.0.0.1:{free_ports(1)[0]}"

    response = _session().post(master.admin + "/admin/add-backend", timeout=30,
                               headers={"Authorization": f"Bearer {TOKEN}"},
                               data=json.dumps({"url": url, "name": "added"}))  # fmt: skip

    assert response.status_code == 201, response.text
    wrong = _session().post(master.admin + "/admin/add-backend", timeout=30,
                            headers={"Authorization": "Bearer wrong"}, data="{}")  # fmt: skip
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    assert sorted(master.served_by("added")) == sorted(master.workers())
    victim = master.workers()[0]
    os.kill(victim, signal.SIGKILL)
    _until(lambda: victim not in master.workers() and len(master.workers()) == 2,
           "a replacement worker serving")  # fmt: skip
    assert sorted(master.served_by("added")) == sorted(master.workers())


def _add_backend(master: Master, name: str) -> requests.Response:
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    return _session().post(master.admin + "/admin/add-backend", timeout=60,
                           headers={"Authorization": f"Bearer {TOKEN}"},
                           data=json.dumps({"url": url, "name": name}))  # fmt: skip


def test_a_paused_worker_is_named_not_killed_and_applies_the_change_when_resumed(
    start_master: Callable[[], Master],
) -> None:
    master = start_master()
    paused, running = master.workers()
    os.kill(paused, signal.SIGSTOP)
    try:
        response = _add_backend(master, "late")

        assert response.status_code == 502, response.text
        (missing,) = response.json()["not_applied_by_workers"]
        assert missing["pid"] == paused
    finally:
        os.kill(paused, signal.SIGCONT)
    # Its admin socket queued the request: it applies it once it runs again.
    _until(lambda: sorted(master.served_by("late")) == sorted([paused, running]),
           "the resumed worker has the change")  # fmt: skip
    assert master.workers() == [paused, running]  # the same processes: nobody was replaced


def test_a_reload_the_master_refuses_reaches_no_worker(
    start_master: Callable[[], Master],
) -> None:
    master = start_master()
    write(master.config, master.config.read_text().replace("strategy: round_robin",
                                                          "strategy: fastest"))  # fmt: skip

    response = _session().post(master.admin + "/admin/reload", timeout=60,
                               headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip

    assert response.status_code == 400, response.text
    assert response.json()["reloaded"] is False
    assert "reload (admin API)" not in "".join(
        line for line in master.log().splitlines() if "]: " in line  # the workers' lines
    )


def test_sigterm_drains_both_workers_and_the_master_exits_0(
    start_master: Callable[[], Master],
) -> None:
    master = start_master()
    workers = master.workers()
    results: list[int] = []

    def slow_get() -> None:
        with _session() as session:
            results.append(session.get(master.proxy + "/slow?delay=1.5", timeout=30).status_code)

    clients = [threading.Thread(target=slow_get) for _ in range(4)]
    for client in clients:
        client.start()
    _until(lambda: sum(
        state["in_flight"] for state in _by_pid(master).values()) == 4,
        "four slow requests in flight")  # fmt: skip

    os.kill(master.process.pid, signal.SIGTERM)

    assert master.process.wait(timeout=60) == 0
    for client in clients:
        client.join(timeout=30)
    assert results == [200, 200, 200, 200]
    assert not any(_alive(pid) for pid in workers)
    assert_no_traceback(subprocess.CompletedProcess([], 0, "", master.log()))


def test_a_worker_that_died_earlier_does_not_make_a_clean_shutdown_exit_1(
    start_master: Callable[[], Master],
) -> None:
    """SIGTERM while a dead worker waits out its restart backoff: the dead one was
    reported when it died; the drain of the live ones is what the exit code says."""
    master = start_master()
    victim, survivor = master.workers()
    os.kill(victim, signal.SIGKILL)
    _until(lambda: "exited (killed by SIGKILL)" in master.log(), "the death noticed")

    os.kill(master.process.pid, signal.SIGTERM)  # within the 1 s backoff, most likely

    assert master.process.wait(timeout=60) == 0
    assert not _alive(survivor)


def test_workers_drain_and_exit_when_the_master_is_killed(
    start_master: Callable[[], Master],
) -> None:
    master = start_master()
    workers = master.workers()
    try:
        os.kill(master.process.pid, signal.SIGKILL)
        master.process.wait(timeout=10)

        _until(lambda: not any(_alive(pid) for pid in workers), "the orphaned workers gone")
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "the master process exited: draining" in master.log()


def _by_pid(master: Master) -> dict[str, dict[str, int]]:
    (app1,) = [b for b in master.backends()["backends"] if b["name"] == "app1"]  # type: ignore[attr-defined]
    return dict(app1["workers"]["by_pid"])


def test_check_warns_that_a_memory_rate_limit_is_per_worker(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    config = CONFIG.format(port=port, admin_port=admin_port, backend="http://127.0.0.1:9",
                           token=TOKEN, state=tmp_path / "s.json")  # fmt: skip
    config += "rate_limit:\n  per_client: 10/second\n"
    result = subprocess.run(
        [sys.executable, "-m", "pyproxy", "--check", "-c", str(write(tmp_path / "c.yaml", config))],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "up to 2 times the configured one" in result.stderr
    assert "store: redis://" in result.stderr
