"""Files appear at their final path only when complete and synced."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Temporary names: `.NAME.tmp-PID` beside the final path; a later run removes leftovers.
TEMP_PATTERN = r"\..+\.tmp-\d+"


@contextlib.contextmanager
def atomic_path(final: str) -> Iterator[str]:
    """Yield a temporary path beside `final`; on success fsync it and rename it into place."""
    directory = os.path.dirname(final) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(final)}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(final: str, data: bytes) -> None:
    """Write `data` to `final` atomically."""
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
