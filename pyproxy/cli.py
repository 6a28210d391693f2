"""The command line: `python -m pyproxy [-c PATH] [--check] [--demo] [--log-level L]`.

Exit codes: 0 after a clean shutdown or a valid `--check` (as `nginx -t`), 1 for an
invalid config or a port already in use (one line, no traceback), 2 for bad usage
(argparse's own convention). `--demo` reads no config file, so it takes no `-c`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from pyproxy import __version__
from pyproxy.config.load import ConfigError, config_warnings, load_config
from pyproxy.config.schema import Config
from pyproxy.process.service import Service

log = logging.getLogger("pyproxy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pyproxy",
        description="A threaded HTTP/1.1 reverse proxy and load balancer.",
    )
    parser.add_argument(
        "-c", "--config", metavar="PATH",
        help="YAML config file (default: $PYPROXY_CONFIG, else ./config.yaml)",
    )  # fmt: skip
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument(
        "--demo", action="store_true",
        help="start three demo backends in-process and a proxy in front of them",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    args = parser.parse_args(argv)
    if args.demo and (args.config or args.check):
        parser.error("--demo runs on its own built-in settings: it takes no -c or --check")
    return args


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # waitress logs queue depth at WARNING under normal load spikes; keep it, but
    # its per-connection chatter at INFO is noise for an operator.
    logging.getLogger("waitress").setLevel(max(logging.getLevelName(level), logging.WARNING))


def config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("PYPROXY_CONFIG") or "config.yaml"


def check(path: str) -> int:
    """`--check`: every problem on its own line, like `nginx -t`."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: invalid ({len(exc.problems)} problem(s))", file=sys.stderr)
        return 1
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok ({len(config.backends)} backend(s))")
    return 0


def install_signal_handlers(service: Service) -> None:
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            # A second signal exits at once, drain or not: whoever asks twice
            # (Ctrl-C twice) does not want to wait.
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: draining", signal.Signals(signum).name)
        service.request_shutdown()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        # Reload in a thread of its own: a signal handler should return quickly.
        threading.Thread(target=service.reload, args=("SIGHUP",), name="pyproxy-sighup").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    if args.demo:
        return demo()
    path = config_path(args)
    if args.check:
        return check(path)
    try:
        config: Config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config: %s", problem)
        log.error("%s is invalid; not starting", path)
        return 1
    for warning in config_warnings(config):
        log.warning("config: %s", warning)
    try:
        service = Service(config)
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return 1
    serve(service)
    log.info("stopped")
    return 0


def demo() -> int:
    """`--demo`: its own backends and settings; no config file is read or watched."""
    from pyproxy.demo import DemoBackends, banner, demo_service

    backends = DemoBackends()
    try:
        service = demo_service(backends)
    except OSError as exc:
        backends.close()
        log.error("cannot listen: %s", exc.strerror or exc)
        return 1
    serve(service, on_started=lambda: print(banner(service, backends), flush=True))
    backends.close()  # after the proxy, which may have drained requests to them
    log.info("stopped")
    return 0


def serve(service: Service, on_started: Callable[[], None] = lambda: None) -> None:
    """Start, serve until a signal, drain and stop."""
    install_signal_handlers(service)
    service.start()
    on_started()
    service.serve()


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(run(argv))
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers are installed (while starting): quietly,
        # with the shell's code for "killed by SIGINT" (128 + 2).
        sys.exit(130)
