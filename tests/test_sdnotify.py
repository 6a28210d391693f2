"""systemd's notify protocol: a real `python -m pyproxy` under a fake `$NOTIFY_SOCKET`.

The test plays systemd: it binds a Unix datagram socket (a file in tmp_path, or an
abstract `@name`), starts pyproxy with `NOTIFY_SOCKET` naming it, and reads what
arrives. sd_notify(3) defines the messages; systemd >= 253 wants `MONOTONIC_USEC`
next to `RELOADING=1` for Type=notify-reload.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import free_ports
from test_cli import GOOD, cli_env, write

from pyproxy.process.sdnotify import Notifier, socket_address


class FakeSystemd:
    """A bound datagram socket that collects sd_notify messages."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(30)  # generous: 8 engineers share 2 cores

    def next_message(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    if request.param == "path":
        env_value = str(tmp_path / "notify")
        fake = FakeSystemd(env_value)
    else:
        name = f"pyproxy-test-{secrets.token_hex(6)}"
        env_value = "@" + name
        fake = FakeSystemd("\0" + name)
    yield fake, env_value
    fake.close()


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_ready_reloading_and_stopping_reach_the_notify_socket(
    tmp_path: Path, systemd: tuple[FakeSystemd, str]
) -> None:
    fake, env_value = systemd
    port, admin_port = free_ports(2)
    config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "pyproxy", "-c", str(config)],
            cwd=tmp_path, env=cli_env(NOTIFY_SOCKET=env_value),
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        ready = fake.next_message()
        assert ready == {"READY": "1"}, stderr.read_text()
        # READY=1 means started: both listeners take connections the moment it arrives.
        assert accepts(port) and accepts(admin_port)

        os.kill(process.pid, signal.SIGHUP)
        reloading = fake.next_message()
        assert reloading["RELOADING"] == "1"
        usec = int(reloading["MONOTONIC_USEC"])
        # The sender's CLOCK_MONOTONIC, which this process shares (the same boot).
        assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert fake.next_message() == {"READY": "1"}

        os.kill(process.pid, signal.SIGTERM)
        assert fake.next_message() == {"STOPPING": "1"}
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert "Traceback" not in stderr.read_text()


def test_socket_address_reads_paths_and_abstract_names() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@pyproxy/notify") == "\0pyproxy/notify"
    assert socket_address("") is None
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None  # not spoken here: ignored, not crashed


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier(env={})

    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_an_unreachable_socket_is_logged_once_at_debug_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})

    with caplog.at_level(logging.DEBUG, logger="pyproxy.process.sdnotify"):
        sent = [notifier.send("READY=1"), notifier.send("STOPPING=1")]

    assert sent == [False, False]
    records = [r for r in caplog.records if r.name == "pyproxy.process.sdnotify"]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG


def test_a_notifier_sends_one_datagram_per_message(tmp_path: Path) -> None:
    fake = FakeSystemd(str(tmp_path / "notify"))
    try:
        notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        notifier.ready()
        notifier.reloading()
        notifier.stopping()

        assert fake.next_message() == {"READY": "1"}
        assert set(fake.next_message()) == {"RELOADING", "MONOTONIC_USEC"}
        assert fake.next_message() == {"STOPPING": "1"}
    finally:
        fake.close()
