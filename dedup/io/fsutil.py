"""Files appear at their final path only when complete and synced.

A temporary file lives in a `.dedup-tmp/` folder beside its final path (same filesystem,
so the rename is atomic) under a name no other process uses. dedup only ever sweeps
that folder, never a name in a user's folder that merely looks like a temporary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dedup.core.errors import OUTPUT_ERRNOS, OutputError, output_error
from dedup.io import storage

TEMP_DIR = ".dedup-tmp"


@contextlib.contextmanager
def atomic_path(final: str, durable: bool = True, sync_folder: bool = True) -> Iterator[str]:
    """Yield a temporary path for `final`; on success fsync it and rename it into place,
    then fsync the folder (the rename made durable).

    `durable=False`, for scratch files that one run writes and reads back (the global
    phase's runs and edges): renamed into place whole, but not synced; a machine that
    loses power loses them, and the next run writes them again (nothing reuses them).
    `sync_folder=False`: the file is synced before its rename, the folder left to the
    caller, who syncs it once for many files (sync_folders: one journal commit, not one
    a file); until then a power loss can lose the new name, never leave it partial.

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
        _create_temporary(temp_dir, tmp)
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        if durable and sync_folder:
            _fsync_dir(directory)
    except OSError as e:
        _unlink(tmp)
        if e.errno in OUTPUT_ERRNOS or e.filename in (tmp, temp_dir, directory, final):
            raise output_error(e, final) from None
        raise
    except BaseException:
        _unlink(tmp)
        raise


def _create_temporary(temp_dir: str, tmp: str) -> None:
    """Create `tmp` empty in `temp_dir` (the folder first). While a temporary is being
    written its folder is not empty, so a task that removes the folder once it is empty
    (remove_empty_temp_dir: fan-out tasks share OUT and run at once) never removes it
    from under this one; a removal between the two steps is retried."""
    for _ in range(1000):
        # makedirs can also lose the race itself: its mkdir finds the folder, which is
        # gone again when it checks that it is one (FileExistsError): retried too.
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.makedirs(temp_dir, exist_ok=True)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return
    os.makedirs(temp_dir, exist_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def write_atomic(final: str, data: bytes, durable: bool = True, sync_folder: bool = True) -> None:
    """Write `data` to `final` (a path or URL) atomically (`durable`, `sync_folder`: as
    atomic_path)."""
    if storage.is_url(final):
        storage.put_bytes(final, data)
        return
    with atomic_path(final, durable, sync_folder) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def read_file(path: str) -> bytes:
    """The bytes of a small file at a path or URL."""
    if storage.is_url(path):
        return storage.read_bytes(path, OutputError)
    with open(path, "rb") as fh:
        return fh.read()


class NotARegularFile(OSError):
    """A path naming a FIFO, device, socket or directory: never read (a FIFO with no
    writer blocks for ever, /dev/zero never ends)."""


class FileTooLarge(OSError):
    """A regular file larger than its reader's limit: never read whole."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def check_regular(st: os.stat_result, path: str) -> os.stat_result:
    """`st` when it describes a regular file; else NotARegularFile naming what it is."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        raise NotARegularFile(errno.EINVAL, f"not a regular file ({kind})", path)
    return st


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file at `path` (a symbolic link followed).

    Anything else is refused before it is opened; the open itself does not wait on a
    FIFO swapped in meanwhile (O_NONBLOCK), and the opened descriptor is checked again.
    """
    check_regular(os.stat(path), path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        check_regular(os.fstat(fd), path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str, limit: int | None = None) -> bytes:
    """The bytes of a user's file at a path or URL: a local path must name a regular file
    (NotARegularFile); with `limit`, one larger than `limit` bytes is FileTooLarge, and
    no more than that is ever read."""
    if storage.is_url(path):
        return read_file(path)
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        if limit is not None and os.fstat(fd).st_size > limit:
            raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", path)
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:  # grew since fstat
        raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", path)
    return data


def read_table(
    path: str, columns: list[str] | None = None, page_checksum_verification: bool = False
) -> pa.Table:
    """A Parquet file at a path or URL, read whole (`columns`: only those, in that order).

    One file's reader, not pyarrow.parquet.read_table's dataset machinery: a few
    milliseconds less per file, which a run reading hundreds of small per-shard files
    pays once a file."""
    source = pa.BufferReader(read_file(path)) if storage.is_url(path) else path
    parquet = pq.ParquetFile(source, page_checksum_verification=page_checksum_verification)
    with contextlib.closing(parquet):
        return parquet.read(columns=columns)


@contextlib.contextmanager
def staged_folder(final: str, scratch: str | None = None) -> Iterator[str]:
    """A local folder to make a set of files in: `final` itself when it is local; for a
    store, a staging folder whose files are put under `final` when the block ends without
    error, object by object, summary.json last (whoever sees the summary sees the rest)."""
    if not storage.is_url(final):
        yield final
        return
    with tempfile.TemporaryDirectory(dir=scratch) as staging:
        yield staging
        for name in sorted(os.listdir(staging), key=lambda n: n == "summary.json"):
            if os.path.isfile(os.path.join(staging, name)):
                storage.put_file(os.path.join(staging, name), storage.join(final, name))


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


def remove_empty_temp_dir(directory: str) -> None:
    """Remove `directory`'s temporary folder if it is empty, and only then: a task that
    runs beside others sharing the folder (fan-out parts) leaves no empty folder behind
    and never removes another's temporary. One removed or made meanwhile is no error."""
    if storage.is_url(directory):
        return
    with contextlib.suppress(OSError):  # not empty (in use), gone, or never made
        os.rmdir(os.path.join(directory, TEMP_DIR))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sync_folders(folders) -> None:
    """fsync each local folder once (see atomic_path's `sync_folder`); URLs have none."""
    for folder in sorted({f or "." for f in folders if not storage.is_url(f)}):
        _fsync_dir(folder)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
