"""The command line, run as a user runs it: `python -m pyproxy ...` in a
subprocess, with config files in a temporary directory and ports picked free.

Every process started here is waited for with a timeout and killed by its PID if it
outlives the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from backends import EchoBackend, free_ports
from conftest import REPO

import pyproxy


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPROXY_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path, timeout: float = 20, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyproxy", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


GOOD = """\
listen: "127.0.0.1:{port}"
strategy: round_robin
backends:
  - url: http://127.0.0.1:9
    name: app1
admin:
  listen: "127.0.0.1:{admin_port}"
  token: test-token
"""

BAD = """\
listen: "127.0.0.1:notaport"
strategy: fastest
bogus_key: 1
backends:
  - url: http://127.0.0.1:9001
    weight: -1
  - url: ftp://example.test
timeouts:
  read: "abc"
"""
BAD_PATHS = [
    "listen",
    "strategy",
    "bogus_key",
    "backends[0].weight",
    "backends[1].url",
    "timeouts.read",
]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- --version and bad usage ---------------------------------------------------------------


def test_version_prints_the_version_and_exits_0(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)

    assert result.returncode == 0
    assert pyproxy.__version__ in result.stdout + result.stderr
    assert "pyproxy" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "args", [["--no-such-flag"], ["--log-level", "LOUD"], ["-c"], ["stray-argument"]]
)
def test_bad_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(*args, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "usage" in result.stderr.lower()
    assert_no_traceback(result)


@pytest.mark.parametrize("args", [["-c", "demo.yaml"], ["--check"]])
def test_demo_takes_no_config_file_and_says_so(tmp_path: Path, args: list[str]) -> None:
    # --demo runs on its own built-in settings (tests/test_demo.py): a file given with
    # it would be silently ignored, so it is refused before anything starts.
    write(tmp_path / "demo.yaml", "backends: []\n")

    result = run_cli("--demo", *args, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "--demo" in result.stderr and "usage" in result.stderr.lower()
    assert_no_traceback(result)


def test_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path: Path) -> None:
    # The config is a named pipe nobody writes to: pyproxy blocks reading it, before its
    # signal handlers exist, which is when Ctrl-C used to print a KeyboardInterrupt.
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "pyproxy", "-c", str(fifo)],
            cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    writer = -1
    try:
        deadline = time.monotonic() + 20
        while writer < 0 and time.monotonic() < deadline:
            try:  # succeeds once pyproxy has opened the pipe to read it
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        assert writer >= 0, stderr.read_text()
        os.kill(process.pid, signal.SIGINT)
        code = process.wait(timeout=20)
    finally:
        if writer >= 0:
            os.close(writer)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    assert code == 130, stderr.read_text()
    assert "Traceback" not in stderr.read_text()


# -- --check --------------------------------------------------------------------------------


def test_check_accepts_a_valid_config_and_starts_nothing(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))

    result = run_cli("--check", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    with socket.socket() as probe:  # nothing was left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_check_reports_every_problem_on_its_own_line_with_its_field_path(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yaml", BAD)

    result = run_cli("--check", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 1
    assert_no_traceback(result)
    lines = (result.stdout + result.stderr).splitlines()
    for path in BAD_PATHS:
        matching = [line for line in lines if line.startswith(f"{path}:") or f" {path}:" in line]
        assert len(matching) == 1, (path, lines)


def test_check_reports_a_missing_file_without_a_traceback(tmp_path: Path) -> None:
    result = run_cli("--check", "-c", str(tmp_path / "absent.yaml"), cwd=tmp_path)

    assert result.returncode == 1
    assert_no_traceback(result)
    assert "absent.yaml" in result.stdout + result.stderr


def test_check_requires_backends_but_accepts_an_empty_list(tmp_path: Path) -> None:
    missing = write(tmp_path / "missing.yaml", 'listen: "127.0.0.1:8080"\n')
    empty = write(tmp_path / "empty.yaml", "backends: []\n")

    without = run_cli("--check", "-c", str(missing), cwd=tmp_path)
    with_empty = run_cli("--check", "-c", str(empty), cwd=tmp_path)

    assert without.returncode == 1
    assert "backends" in without.stderr + without.stdout
    assert with_empty.returncode == 0, with_empty.stderr
    assert "warning" in (with_empty.stderr + with_empty.stdout).lower()


def test_config_path_defaults_to_env_then_config_yaml(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    write(tmp_path / "config.yaml", BAD)  # ./config.yaml: invalid
    from_env = write(tmp_path / "env.yaml", GOOD.format(port=port, admin_port=admin_port))

    default = run_cli("--check", cwd=tmp_path)
    via_env = run_cli("--check", cwd=tmp_path, PYPROXY_CONFIG=str(from_env))
    explicit = run_cli("--check", "-c", "config.yaml", cwd=tmp_path, PYPROXY_CONFIG=str(from_env))

    assert default.returncode == 1  # it read ./config.yaml
    assert via_env.returncode == 0, via_env.stderr  # $PYPROXY_CONFIG wins over ./config.yaml
    assert explicit.returncode == 1  # -c wins over $PYPROXY_CONFIG


def test_log_level_is_accepted_in_any_case(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))

    result = run_cli("--check", "--log-level", "debug", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr


def test_an_invalid_config_refuses_to_start_with_exit_1(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yaml", BAD)

    result = run_cli("-c", str(config), cwd=tmp_path)

    assert result.returncode == 1
    assert_no_traceback(result)
    for path in BAD_PATHS:
        assert f"{path}:" in result.stderr


# -- serving --------------------------------------------------------------------------------


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_a_port_in_use_exits_1_with_one_line_and_no_traceback(tmp_path: Path, taken: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        busy = blocker.getsockname()[1]
        (free,) = free_ports(1)
        port, admin_port = (busy, free) if taken == "listen" else (free, busy)
        config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))

        result = run_cli("-c", str(config), cwd=tmp_path)

    assert result.returncode == 1
    assert_no_traceback(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(busy) in lines[0]  # which of the two listeners could not start


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(), self.stderr.read_text()


@pytest.fixture
def start_cli(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*args: str) -> Running:
        index = len(started)
        stdout, stderr = tmp_path / f"out{index}.txt", tmp_path / f"err{index}.txt"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "pyproxy", *args],
                cwd=tmp_path,
                env=cli_env(),
                stdout=out,
                stderr=err,
            )
        running = Running(process, stdout, stderr)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            os.kill(running.process.pid, signal.SIGKILL)
            running.process.wait(timeout=10)


def wait_until_serving(url: str, running: Running, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with requests.Session() as session:
        session.trust_env = False
        while time.monotonic() < deadline:
            assert running.process.poll() is None, running.output()
            try:
                session.get(url, timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
    raise AssertionError(f"{url} not serving after {timeout}s: {running.output()}")


def stop(running: Running, timeout: float = 15) -> int:
    os.kill(running.process.pid, signal.SIGTERM)
    return running.process.wait(timeout=timeout)


def test_serves_logs_to_stderr_and_exits_0_on_sigterm(
    tmp_path: Path, start_cli: Callable[..., Running], echo_backend: EchoBackend
) -> None:
    port, admin_port = free_ports(2)
    config = GOOD.format(port=port, admin_port=admin_port).replace(
        "http://127.0.0.1:9", echo_backend.url
    )
    running = start_cli("-c", str(write(tmp_path / "ok.yaml", config)))
    proxy_url = f"http://127.0.0.1:{port}"
    wait_until_serving(f"http://127.0.0.1:{admin_port}/livez", running)

    with requests.Session() as session:
        session.trust_env = False
        response = session.get(proxy_url + "/through-the-cli", timeout=5)
    assert response.status_code == 200
    assert [r.target for r in echo_backend.requests() if r.target != "/health"] == [
        "/through-the-cli"
    ]

    assert stop(running) == 0
    _, stderr = running.output()
    assert_no_traceback(subprocess.CompletedProcess([], 0, "", stderr))
    # One line per event, with the logger name.
    assert any("pyproxy" in line and "serving" in line for line in stderr.splitlines()), stderr
