"""Named errors and the process exit codes they map to.

Every error here crosses a process boundary intact (worker processes, and later other
executors, pickle it back to the main process): its message and exit code survive.
"""

from __future__ import annotations

import errno

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_OUTPUT = 4
EXIT_SKIPPED_SHARDS = 5
EXIT_MODEL = 6
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class DedupError(Exception):
    """An expected failure: the CLI prints its one-line message and exits with `exit_code`."""

    exit_code = EXIT_INTERNAL

    def __reduce__(self):
        # Rebuilt from the final message and attributes, whatever the constructor takes.
        return _rebuild, (type(self), str(self), self.__dict__)


def _rebuild(cls: type, message: str, state: dict) -> DedupError:
    error = Exception.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


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
    """An output or report directory that is refused or cannot be written."""

    exit_code = EXIT_OUTPUT


class FeatureStoreError(OutputError):
    """A feature file in OUT's state directory that is damaged while a run uses it."""


class ModelError(DedupError):
    """Model weights that cannot be had, or a device that is not there."""

    exit_code = EXIT_MODEL


class ClipNotInstalled(ModelError):
    """torch, torchvision or open_clip is not installed (the light install)."""


class WorkerDied(DedupError):
    """A worker process ended without a result (killed, out of memory, crashed)."""


class TaskFailed(DedupError):
    """A bug in a task run in a worker: its type, message and the worker's traceback
    (printed with --debug)."""

    def __init__(self, message: str, worker_traceback: str = ""):
        super().__init__(message)
        self.worker_traceback = worker_traceback


class Interrupted(DedupError):
    """The run was stopped by a signal: Ctrl-C (SIGINT) or SIGTERM."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"{signal.Signals(signum).name}: stopped; rerun to resume")
        self.exit_code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


# Errors of writing that only a full or read-only destination raises.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def output_error(e: OSError, what: str | None = None) -> OutputError:
    """A one-line OutputError for a failed write."""
    where = what or e.filename or "output"
    return OutputError(f"{where}: cannot write ({e.strerror or e})")
