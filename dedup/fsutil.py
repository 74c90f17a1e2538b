"""Files appear at their final path only when complete and synced.

A temporary file lives in a `.dedup-tmp/` folder beside its final path (same filesystem,
so the rename is atomic) under a name no other process uses. dedup only ever sweeps
that folder, never a name in a user's folder that merely looks like a temporary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from dedup import storage
from dedup.errors import OUTPUT_ERRNOS, OutputError, output_error

TEMP_DIR = ".dedup-tmp"


@contextlib.contextmanager
def atomic_path(final: str) -> Iterator[str]:
    """Yield a temporary path for `final`; on success fsync it and rename it into place.

    `final` may be a URL: the temporary is then a local file, uploaded when complete (an
    object appears whole or not at all). A full or read-only destination raises
    OutputError naming `final`.
    """
    if storage.is_url(final):
        with _remote_atomic(final) as tmp:
            yield tmp
        return
    directory = os.path.dirname(final) or "."
    temp_dir = os.path.join(directory, TEMP_DIR)
    tmp = os.path.join(temp_dir, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(temp_dir, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as e:
        _unlink(tmp)
        if e.errno in OUTPUT_ERRNOS or e.filename in (tmp, temp_dir, directory, final):
            raise output_error(e, final) from None
        raise
    except BaseException:
        _unlink(tmp)
        raise


def write_atomic(final: str, data: bytes) -> None:
    """Write `data` to `final` (a path or URL) atomically."""
    if storage.is_url(final):
        storage.put_bytes(final, data)
        return
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def read_file(path: str) -> bytes:
    """The bytes of a small file at a path or URL."""
    if storage.is_url(path):
        return storage.read_bytes(path, OutputError)
    with open(path, "rb") as fh:
        return fh.read()


SCRATCH_ENV = "DEDUP_SCRATCH"


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """A local folder for this run's uploads in the making, shared with its workers
    (through the environment, which forked and spawned workers inherit) and deleted
    when the run ends, however it ends but kill -9."""
    path = tempfile.mkdtemp(prefix="dedup-run-")
    previous = os.environ.get(SCRATCH_ENV)
    os.environ[SCRATCH_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(SCRATCH_ENV, None)
        else:
            os.environ[SCRATCH_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _remote_atomic(final: str) -> Iterator[str]:
    scratch = os.environ.get(SCRATCH_ENV)
    fd, tmp = tempfile.mkstemp(prefix="upload-", dir=scratch if scratch else None)
    os.close(fd)
    try:
        yield tmp
        storage.put_file(tmp, final)
    except OSError as e:
        raise output_error(e, final) from None
    finally:
        _unlink(tmp)


def remove_temporaries(directory: str) -> list[str]:
    """Delete `directory`'s temporary folder and what interrupted runs left in it; return
    the names. Call it only on a folder this run has claimed (locked), when no writer of
    this run is active."""
    if storage.is_url(directory):
        return []  # objects are put whole: nothing partial is ever left in a store
    temp_dir = os.path.join(directory, TEMP_DIR)
    if not os.path.isdir(temp_dir) or os.path.islink(temp_dir):
        return []
    names = sorted(os.listdir(temp_dir))
    shutil.rmtree(temp_dir, ignore_errors=True)
    return names


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
