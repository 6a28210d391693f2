"""`python -m pyproxy --demo`: its own world, and a clean way out.

Run as a user runs it, in a subprocess whose working directory holds somebody else's
`config.yaml`: the demo must neither read nor watch that file, and every reload
trigger (SIGHUP, `POST /admin/reload`, a write to the file) must leave the demo's
backends and admin token in force. Every way out (SIGTERM, SIGINT, a second signal)
ends without a traceback. The banner is the test's only source of URLs and token, so
the tests also show that what it prints is true.

The last test drives the demo backends in-process, holding one's event loop at the
moment that made shutdown print a traceback before (see `DemoBackends`).
Every process started here is waited for with a timeout and killed by its PID if it
outlives the test.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from backends import EchoBackend, wait_for
from conftest import REPO, admin_backends, admin_reload

from pyproxy.demo import DemoBackends
from pyproxy.edge import poller

# Several times the watcher's debounce (0.25 s): the window in which a watched file's
# change would have been applied.
QUIET_WINDOW = 1.5


def stranger_config(backend: EchoBackend, name: str) -> str:
    """Somebody else's config.yaml: other backends, no admin token."""
    return yaml.safe_dump(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "health_check": {"enabled": False},
            "backends": [{"url": backend.url, "name": name}],
        }
    )


@dataclass
class Demo:
    """A running `python -m pyproxy --demo` and what its banner said."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    proxy: str = ""
    admin: str = ""
    token: str = ""
    backends: tuple[str, ...] = ()

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(), self.stderr.read_text()

    def read_banner(self, timeout: float = 20) -> None:
        def printed() -> bool:
            assert self.process.poll() is None, self.output()
            return "Try:" in self.stdout.read_text()

        assert wait_for(printed, timeout=timeout, interval=0.05), self.output()
        banner = self.stdout.read_text()
        proxy = re.search(r"^  proxy: +(http://\S+)$", banner, re.M)
        admin = re.search(r"^  admin: +(http://\S+) +\(token: (\S+)\)$", banner, re.M)
        backends = re.search(r"^  backends: +(.+)$", banner, re.M)
        assert proxy and admin and backends, banner
        self.proxy, (self.admin, self.token) = proxy[1], admin.groups()
        self.backends = tuple(backends[1].split(", "))

    def send(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def wait_in_log(self, text: str, timeout: float = 10) -> None:
        assert wait_for(lambda: text in self.stderr.read_text(), timeout=timeout), self.output()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.send(signum)
        return self.process.wait(timeout=timeout)


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[[], Demo]]:
    started: list[Demo] = []

    def start() -> Demo:
        index = len(started)
        stdout, stderr = tmp_path / f"out{index}.txt", tmp_path / f"err{index}.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYPROXY_")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "pyproxy", "--demo"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=err,
            )
        demo = Demo(process, stdout, stderr)
        started.append(demo)
        demo.read_banner()
        return demo

    yield start
    for demo in started:
        if demo.process.poll() is None:
            os.kill(demo.process.pid, signal.SIGKILL)
            demo.process.wait(timeout=10)


def backends_of(http: requests.Session, demo: Demo) -> list[tuple[str, str]]:
    return [(name, entry["url"]) for name, entry in admin_backends(demo.admin).items()]


def assert_clean_exit(demo: Demo, code: int, expected: int = 0) -> None:
    stdout, stderr = demo.output()
    assert code == expected, stderr
    assert "Traceback" not in stdout + stderr, stderr


# -- what the banner says ---------------------------------------------------------------


def test_demo_serves_three_backends_in_turn_as_its_banner_says(
    start_demo: Callable[[], Demo], http: requests.Session
) -> None:
    demo = start_demo()

    seen = []
    for index in range(6):
        response = http.get(f"{demo.proxy}/hello/{index}", timeout=5)
        assert response.status_code == 200, response.text
        seen.append(json.loads(response.text)["backend"])
    assert sorted(set(seen)) == ["app1", "app2", "app3"]
    assert seen[:3] * 2 == seen  # round robin, as the banner's first line to try says
    names = ["app1", "app2", "app3"]
    assert backends_of(http, demo) == list(zip(names, demo.backends, strict=True))
    assert admin_reload(http, demo.admin, demo.token).status_code == 200  # the token works
    toggled = http.get(demo.backends[0] + "/toggle-health", timeout=5)
    assert toggled.text == "app1 healthy=False\n"
    stdout, _ = demo.output()
    assert f"curl -s {demo.proxy}/hello" in stdout
    assert f"{demo.admin}/admin/status" in stdout

    assert_clean_exit(demo, demo.stop())


# -- no config file: every reload trigger keeps the demo's settings -----------------------


@pytest.mark.parametrize("trigger", ["SIGHUP", "admin API", "file write"])
def test_a_reload_in_demo_mode_keeps_its_backends_and_token(
    tmp_path: Path,
    start_demo: Callable[[], Demo],
    http: requests.Session,
    echo_backend: EchoBackend,
    trigger: str,
) -> None:
    config_yaml = tmp_path / "config.yaml"
    config_yaml.write_text(stranger_config(echo_backend, "stranger"))
    demo = start_demo()
    demo_backends = list(zip(["app1", "app2", "app3"], demo.backends, strict=True))
    assert backends_of(http, demo) == demo_backends

    if trigger == "SIGHUP":
        demo.send(signal.SIGHUP)
        demo.wait_in_log("reload (SIGHUP)")
    elif trigger == "admin API":
        response = admin_reload(http, demo.admin, demo.token)
        assert response.status_code == 200, response.text
        assert response.json() == {"reloaded": True, "changes": []}
    else:
        config_yaml.write_text(stranger_config(echo_backend, "another-stranger"))
        time.sleep(QUIET_WINDOW)  # nothing may happen: nobody watches the file

    assert backends_of(http, demo) == demo_backends
    assert admin_reload(http, demo.admin, demo.token).status_code == 200  # the token still works
    assert echo_backend.requests() == []  # the stranger's backend saw nothing
    _, stderr = demo.output()
    assert "config.yaml" not in stderr
    assert "file change" not in stderr
    assert_clean_exit(demo, demo.stop())


# -- ways out ---------------------------------------------------------------------------


def test_demo_exits_0_on_sigint_without_a_traceback(
    start_demo: Callable[[], Demo], http: requests.Session
) -> None:
    demo = start_demo()
    assert http.get(demo.proxy + "/", timeout=5).status_code == 200

    assert_clean_exit(demo, demo.stop(signal.SIGINT))


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_during_the_drain_exits_at_once_without_a_traceback(
    start_demo: Callable[[], Demo], second: signal.Signals
) -> None:
    demo = start_demo()
    host, port = demo.proxy.removeprefix("http://").split(":")
    # A request whose body never comes: the drain waits for it, so the second signal
    # lands while the first is still being served. "100 Continue" shows the proxy has
    # read the head, so the request is in progress before the first signal.
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(
            b"POST /slow HTTP/1.1\r\nHost: demo\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert client.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        demo.send(signal.SIGTERM)
        demo.wait_in_log("shutdown requested")

        code = demo.stop(second)

    assert_clean_exit(demo, code, expected=1)
    assert f"second {second.name}: exiting now" in demo.output()[1]


# -- the backends' shutdown race ----------------------------------------------------------


class HeldLoop:
    """Stands in for the `select` module inside the edge server's loop: the loop thread
    named `thread_name` stops right before it waits on its descriptors (select() or
    poll()), having already listed them, until `release` is set."""

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self.arrived, self.release = threading.Event(), threading.Event()

    def _hold(self) -> None:
        if threading.current_thread().name == self.thread_name and not self.arrived.is_set():
            self.arrived.set()
            self.release.wait(10)

    def __getattr__(self, name: str) -> Any:
        return getattr(select, name)  # constants, error classes

    def select(self, *args: Any) -> Any:
        self._hold()
        return select.select(*args)

    def poll(self) -> Any:
        return self._held(select.poll())

    def epoll(self) -> Any:
        return self._held(select.epoll())

    def _held(self, pollster: Any) -> Any:
        hold = self._hold

        class Held:
            def __getattr__(self, name: str) -> Any:
                return getattr(pollster, name)  # register, modify, unregister, close

            def poll(self, *args: Any) -> Any:
                hold()
                return pollster.poll(*args)

        return Held()


def test_closing_the_demo_backends_never_pulls_a_socket_from_under_their_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loop that has listed its descriptors and is about to wait on them must not find
    # them closed: select() fails with EBADF and the loop thread dies with a traceback,
    # the flaky demo shutdown. close() must stop each loop before closing its sockets.
    died: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda hook: died.append(f"{hook.thread}: {hook.exc_value!r}")
    )
    held = HeldLoop("pyproxy-demo-app1")
    monkeypatch.setattr(poller, "select", held)
    backends = DemoBackends(ports=(0, 0, 0))
    closer = threading.Thread(target=backends.close, name="closer")
    try:
        assert held.arrived.wait(10), "the loop never waited on its descriptors"
        closer.start()
        closer.join(1.0)  # the window in which close() must not close under the loop
        assert closer.is_alive(), "close() did not wait for the loop to stop"
        with socket.create_connection(("127.0.0.1", port_of(backends.urls[0])), timeout=5):
            pass  # app1 still listens: nothing was closed under its loop
    finally:
        held.release.set()
    closer.join(20)
    assert not closer.is_alive()
    assert died == []
    for url in backends.urls:  # and then every port was closed
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port_of(url))) != 0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
