"""Where a reload reads the config it applies: a `ConfigSource`.

A reload asks its source for a whole Config and applies it only if it is valid
(swap.py). The source is the config file (`FileSource`), or a config built in code
that a reload re-applies as it is (`FixedSource`, for `--demo`); a worker of
`workers: N` reads the config its master validated (`WorkerSource` in
process/worker.py).
"""

from __future__ import annotations

from typing import Protocol

from pyproxy.config.load import load_config
from pyproxy.config.schema import Config
from pyproxy.runtime.watcher import file_digest


class ConfigSource(Protocol):
    """Where a reload reads the config to apply."""

    name: str  # for log lines: the file's path, or what the config is

    def read(self) -> Config:
        """The config to apply now; raises ConfigError if it is unusable."""
        ...


class FileSource:
    """The config file at `path`. `digest` is the SHA-256 of the bytes the last read
    saw (valid or not; None if unreadable): the watcher compares the file with it, so
    bytes a reload already read are not read again, whichever trigger read them."""

    def __init__(self, path: str) -> None:
        self.path = self.name = path
        self.digest = file_digest(path)

    def read(self) -> Config:
        # Hashed before parsing: if a write lands in between, the digest is the older
        # bytes', and the watcher reloads once more rather than miss the write.
        self.digest = file_digest(self.path)
        return load_config(self.path)


class FixedSource:
    """A config built in code (`--demo`): a reload re-applies it, so nothing changes."""

    name = "the built-in config"

    def __init__(self, config: Config) -> None:
        self.config = config

    def read(self) -> Config:
        return self.config
