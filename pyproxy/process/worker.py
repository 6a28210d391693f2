"""One worker process of a master (process/master.py): a full proxy on an inherited socket.

    python -m pyproxy.process.worker LISTEN_FD READY_FD ALIVE_FD CONFIG   (the master starts it)

The master writes, pickled on the worker's stdin, what the worker serves: the
config the master validated, the admin changes it keeps, the workers' admin token and
the master's admin address (no admin-added backend may be dialled there). The worker
then serves the proxy socket the master bound (file descriptor LISTEN_FD, inherited),
with its own health checks, breaker states, least-connections counts and rate buckets,
and answers its master on an admin listener of its own on 127.0.0.1, an ephemeral
port. It writes that port on the pipe READY_FD ("admin PORT") once it serves: the
master's control channel is plain HTTP to the worker's own admin API (a reload, an
admin change, a state query), with a random bearer token only the master knows.

Only the master writes the admin state file (several writers would race on it), so
the worker's config has none. On a reload the worker applies the config the master
has just validated and applied, which the master keeps in the file CONFIG
(`WorkerSource`): the file is validated once, and every worker runs what the master
runs. SIGTERM drains as a single pyproxy does (docs/shutdown.md); SIGHUP and SIGINT
are the master's. A worker whose master exited (ALIVE_FD reads end-of-file) drains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from types import FrameType

from pyproxy.config.schema import Address, Config
from pyproxy.process.service import Service
from pyproxy.runtime.admin_changes import AdminChanges

log = logging.getLogger(__name__)


def worker_config(config: Config, token: str) -> Config:
    """The master's config as a worker runs it: its admin API on a private port with
    the master's token, no state file."""
    admin = dataclasses.replace(
        config.admin, listen=Address("127.0.0.1", 0), state_file=None, token=token
    )
    return dataclasses.replace(config, admin=admin)


class WorkerSource:
    """Where a worker's reload reads its config: the one its master validated and
    runs (pickled in the master's private directory), run as a worker runs it."""

    def __init__(self, path: str, token: str) -> None:
        self.path = path
        self.name = "the master's config"
        self.token = token

    def read(self) -> Config:
        with open(self.path, "rb") as file:
            config = pickle.load(file)
        assert isinstance(config, Config)
        return worker_config(config, self.token)


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("PYPROXY_LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s",
    )
    logging.getLogger("waitress").setLevel(logging.WARNING)
    # The master owns the terminal's Ctrl-C and SIGHUP; it tells the workers what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config, admin, token, master_admin = pickle.load(sys.stdin.buffer)
    assert isinstance(config, Config) and isinstance(admin, AdminChanges)
    listen = socket.socket(fileno=int(sys.argv[1]))
    source = WorkerSource(sys.argv[4], token)
    service = Service(
        worker_config(config, token), source=source, listen_socket=listen, restored=admin,
        also_own=[master_admin],
    )  # fmt: skip

    def on_term(signum: int, frame: FrameType | None) -> None:
        service.request_shutdown()

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=_drain_when_orphaned, args=(int(sys.argv[3]), service),
                     name="pyproxy-master-watch", daemon=True).start()  # fmt: skip
    service.start()
    with open(int(sys.argv[2]), "w") as master:
        master.write(f"admin {service.admin_server.address[1]}\n")
    service.serve()
    return 0


def _drain_when_orphaned(alive_fd: int, service: Service) -> None:
    """The master never writes to this pipe: end-of-file means it exited."""
    with contextlib.suppress(OSError):
        while os.read(alive_fd, 1):
            pass
    log.error("the master process exited: draining")
    service.request_shutdown()


if __name__ == "__main__":
    sys.exit(main())
