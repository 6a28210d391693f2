"""`workers` on the command line: what a config asking for several processes gets.

Real processes (`python -m pyproxy`), ports on 127.0.0.1, every process stopped by PID.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from backends import free_ports
from test_cli import GOOD, assert_no_traceback, cli_env, write


def _config(tmp_path: Path, workers: str) -> Path:
    port, admin_port = free_ports(2)
    return write(
        tmp_path / "workers.yaml", GOOD.format(port=port, admin_port=admin_port) + workers
    )


@pytest.mark.parametrize("workers", ["workers: 2\n", "workers: 3\n"])
def test_several_workers_are_refused_at_startup_not_served_by_one(
    tmp_path: Path, workers: str
) -> None:
    config = _config(tmp_path, workers)
    process = subprocess.Popen(
        [sys.executable, "-m", "pyproxy", "-c", str(config)],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()  # by this Popen's PID: it started serving instead of refusing
            process.wait(timeout=10)
    assert process.returncode == 1
    assert_no_traceback(subprocess.CompletedProcess([], 1, stdout, stderr))
    assert "workers:" in stderr and "set workers: 1" in stderr, stderr


def test_check_fails_for_several_workers_and_passes_for_one(tmp_path: Path) -> None:
    for workers, code in (("workers: 2\n", 1), ("workers: 1\n", 0)):
        result = subprocess.run(
            [sys.executable, "-m", "pyproxy", "--check", "-c", str(_config(tmp_path, workers))],
            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert result.returncode == code, result.stderr
        assert_no_traceback(result)
