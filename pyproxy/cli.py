"""The command line: arguments -> one of check, dump, reload, demo, serve.

    pyproxy [-c PATH] [--listen HOST:PORT] [-t | --dump-config | --reload] [--log-level L]
    pyproxy --demo

The installed `pyproxy` script and `python -m pyproxy` are the same program.
Exit codes: 0 after a clean shutdown, a valid `--check` (as `nginx -t`), a dump or a
reload that applied; 1 for an invalid config, a port already in use or a reload that
did not apply (the reasons, no traceback); 2 for bad usage (argparse's convention).
`--demo` reads no config file, so it takes none of the file's options. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from pyproxy import __version__
from pyproxy.config.dump import dump_config
from pyproxy.config.load import ConfigError, config_warnings, load_config
from pyproxy.config.schema import Address, Config
from pyproxy.config.values import address
from pyproxy.ops.client import request_reload
from pyproxy.process.service import Service

log = logging.getLogger("pyproxy")


def program_name() -> str:
    """`pyproxy` when run as the installed script, `python -m pyproxy` otherwise."""
    return "python -m pyproxy" if sys.argv[0].endswith("__main__.py") else "pyproxy"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="A threaded HTTP/1.1 reverse proxy and load balancer.",
    )
    parser.add_argument(
        "-c", "--config", metavar="PATH",
        help="YAML config file (default: $PYPROXY_CONFIG, else ./config.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--listen", metavar="HOST:PORT",
        help="serve the proxy here instead of the file's `listen`",
    )  # fmt: skip
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "-t", "--check", action="store_true", help="validate the config and exit (nginx -t)"
    )
    action.add_argument(
        "--dump-config", action="store_true",
        help="print the effective config as YAML, defaults filled in, secrets as *** (nginx -T)",
    )  # fmt: skip
    action.add_argument(
        "--reload", action="store_true",
        help="ask the running instance (the file's admin.listen) to reload (nginx -s reload)",
    )  # fmt: skip
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
    file_options = args.config or args.check or args.dump_config or args.reload or args.listen
    if args.demo and file_options:
        parser.error(
            "--demo runs on its own built-in settings: it takes no -c, --listen, --check,"
            " --dump-config or --reload"
        )
    if args.reload and args.listen:
        parser.error("--listen sets where a new instance serves; --reload asks a running one")
    if args.listen is not None:
        try:
            args.listen = address(args.listen)
        except ValueError as error:
            # One line, not argparse's usage block: the mistake is in the value.
            print(f"{parser.prog}: --listen: {error}", file=sys.stderr)
            sys.exit(2)
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


def load(path: str, listen: Address | None = None) -> Config:
    """The file's config, with `--listen` in place of its `listen`; or ConfigError."""
    config = load_config(path)
    if listen is None:
        return config
    admin = config.admin.listen
    wildcard = {listen.host, admin.host} & {"0.0.0.0", "::"}
    if listen.port == admin.port != 0 and (listen.host == admin.host or wildcard):
        raise ConfigError([f"--listen: {listen} is admin.listen's address ({admin})"])
    return dataclasses.replace(config, listen=listen)


def print_problems(path: str, error: ConfigError) -> None:
    for problem in error.problems:
        print(problem, file=sys.stderr)
    print(f"{path}: invalid ({len(error.problems)} problem(s))", file=sys.stderr)


def check(path: str, listen: Address | None = None) -> int:
    """`--check`: every problem on its own line, like `nginx -t`."""
    try:
        config = load(path, listen)
    except ConfigError as exc:
        print_problems(path, exc)
        return 1
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok ({len(config.backends)} backend(s))")
    return 0


def dump(path: str, listen: Address | None = None) -> int:
    """`--dump-config`: the effective config as YAML on stdout and nothing else there,
    so `pyproxy --dump-config > effective.yaml` is a config file (like `nginx -T`)."""
    try:
        config = load(path, listen)
    except ConfigError as exc:
        print_problems(path, exc)
        return 1
    sys.stdout.write(dump_config(config))
    return 0


def reload(path: str) -> int:
    """`--reload`: ask the instance at the file's admin.listen to reload, like
    `nginx -s reload`. A file that is invalid here is not sent: the instance would
    refuse it too, and this way every problem is printed with its field path."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print_problems(path, exc)
        return not_reloaded([])
    token = config.admin.token
    if token is None:
        return not_reloaded(["admin.token: not set (nor $PYPROXY_ADMIN_TOKEN); changes need it"])
    answer = request_reload(config.admin.listen, token)
    if not answer.ok:
        return not_reloaded(answer.lines)
    print(f"reloaded: {len(answer.lines)} change(s)" if answer.lines else "reloaded: no changes")
    for line in answer.lines:
        print(f"  {line}")
    return 0


def not_reloaded(problems: list[str]) -> int:
    for problem in problems:
        print(problem, file=sys.stderr)
    print("not reloaded: the running instance keeps its config", file=sys.stderr)
    return 1


class Supervised(Protocol):
    """What the signals drive: a single-process Service, or the workers' Master."""

    def request_shutdown(self) -> None: ...

    def reload(self, trigger: str) -> object: ...


def install_signal_handlers(
    target: Supervised, *, on_second_signal: Callable[[], None] = lambda: None
) -> None:
    """SIGTERM/SIGINT drain `target`; a second one exits at once (after
    `on_second_signal`), since whoever asks twice (Ctrl-C twice) does not want to
    wait; SIGHUP reloads."""
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            on_second_signal()
            os._exit(1)
        log.info("%s received: draining", signal.Signals(signum).name)
        target.request_shutdown()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        # Reload in a thread of its own: a signal handler should return quickly.
        threading.Thread(target=target.reload, args=("SIGHUP",), name="pyproxy-sighup").start()

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
        return check(path, args.listen)
    if args.dump_config:
        return dump(path, args.listen)
    if args.reload:
        return reload(path)
    try:
        config: Config = load(path, args.listen)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config: %s", problem)
        log.error("%s is invalid; not starting", path)
        return 1
    for warning in config_warnings(config):
        log.warning("config: %s", warning)
    if config.workers > 1:
        return serve_workers(config)
    try:
        service = Service(config)
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return 1
    serve(service)
    log.info("stopped")
    return 0


def serve_workers(config: Config) -> int:
    """`workers: N > 1`: a master and N worker processes (process/master.py)."""
    from pyproxy.process.master import Master

    try:
        master = Master(config)
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return 1
    install_signal_handlers(master, on_second_signal=master.kill_workers)
    code = master.serve()
    log.info("stopped")
    return code


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
