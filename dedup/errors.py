"""Named errors and the process exit codes they map to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_OUTPUT = 4
EXIT_SKIPPED_SHARDS = 5
EXIT_MODEL = 6


class DedupError(Exception):
    """An expected failure: the CLI prints its one-line message and exits with `exit_code`."""

    exit_code = EXIT_INTERNAL


class ConfigError(DedupError):
    """A bad option, config file or config value."""

    exit_code = EXIT_USAGE


class InputError(DedupError):
    """Input shards that cannot be listed or opened."""

    exit_code = EXIT_BAD_INPUT


class ShardError(InputError):
    """A shard whose tar structure breaks the rules; names the shard and position."""

    def __init__(self, shard: str, message: str, offset: int | None = None):
        where = f"{shard}" if offset is None else f"{shard} at byte {offset}"
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.offset = offset


class OutputError(DedupError):
    """An output directory that is refused or cannot be written."""

    exit_code = EXIT_OUTPUT


class ModelError(DedupError):
    """Model weights that cannot be had, or a device that is not there."""

    exit_code = EXIT_MODEL
