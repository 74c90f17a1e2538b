"""The output and report directories: refuse what would clobber, lock them, clean up.

A directory is dedup's when dedup's marker is in it: `OUT/.dedup/job.json` for OUT,
`REPORT/.dedup-report.json` for a report directory elsewhere. dedup writes into a
directory that is its own, or empty, or named with --overwrite; it deletes only files
it wrote (shards listed in job.json, its own temporary folders), never a user's file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator

from dedup.errors import OutputError
from dedup.fsutil import remove_temporaries, write_atomic
from dedup.shards import Shard

STATE_DIR = ".dedup"
JOB_FILE = "job.json"
LOCK_FILE = "lock"
FEATURES_DIR = "features"
REPORT_MARKER = ".dedup-report.json"
REPORT_LOCK = ".dedup-report.lock"
# Report files a run replaces; a new run first removes the summary so that none is seen
# describing a half-written OUT.
REPORT_FILES = (
    "summary.json",
    "report.html",
    "samples.parquet",
    "clusters.parquet",
    "previews.parquet",
    "calibration.parquet",
)


def feature_store(out: str) -> str:
    return os.path.join(out, STATE_DIR, FEATURES_DIR)


@contextlib.contextmanager
def claim_output(
    out: str, shards: list[Shard], overwrite: bool, report_dir: str, dry_run: bool = False
) -> Iterator[None]:
    """Check OUT and the report directory, lock both for the run, remove what an
    interrupted run left; mark the job complete when the body returns.

    Each is refused when it is an input shard's directory, or not empty and not made by
    dedup (unless `overwrite`), or locked by another run. An OUT that dedup made,
    finished or not, is resumed.
    """
    _refuse_input_dirs(out, "--out", shards)
    _refuse_input_dirs(report_dir, "--report", shards)
    job_path = os.path.join(out, STATE_DIR, JOB_FILE)
    ours = os.path.isfile(job_path)
    _refuse_foreign(out, ours, overwrite, "--out")
    if not ours and os.path.lexists(os.path.join(out, STATE_DIR)):
        raise OutputError(f"{out}: holds a {STATE_DIR} that dedup did not write; remove it")
    inside_out = os.path.realpath(os.path.dirname(os.path.abspath(report_dir))) == (
        os.path.realpath(out)
    )
    report_ours = os.path.isfile(os.path.join(report_dir, REPORT_MARKER)) or (ours and inside_out)
    same_dir = os.path.realpath(report_dir) == os.path.realpath(out)
    if not same_dir:
        _refuse_foreign(report_dir, report_ours, overwrite, "--report")
    _make_dirs(out, os.path.join(out, STATE_DIR), report_dir)
    out_lock = _lock(os.path.join(out, STATE_DIR, LOCK_FILE), out)
    try:
        report_lock = _lock(os.path.join(report_dir, REPORT_LOCK), report_dir)
        try:
            write_atomic(
                os.path.join(report_dir, REPORT_MARKER),
                json.dumps({"tool": "dedup", "out": os.path.abspath(out)}).encode(),
            )
            previous = _previous_outputs(job_path) if ours else []
            current = {s.name for s in shards}
            if dry_run:
                current |= set(previous)  # a dry run leaves the shards it does not write alone
            else:
                for name in previous:
                    # Shards written for an earlier input set would mislead a downstream glob.
                    if name not in current and os.path.basename(name) == name:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(out, name))
            sweep(out, report_dir)
            if overwrite:
                shutil.rmtree(feature_store(out), ignore_errors=True)
            # Until this run ends, OUT is a mix of old and new shards: no summary may claim
            # otherwise, and job.json says the run is not complete.
            for name in ("summary.json", "report.html"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(report_dir, name))
            _write_job(job_path, current, complete=False)
            try:
                yield
                _write_job(job_path, current, complete=True)
            finally:
                sweep(out, report_dir)
        finally:
            os.close(report_lock)
    finally:
        os.close(out_lock)


def sweep(out: str, report_dir: str) -> None:
    """Remove the temporary folders of OUT, its state and the report directory."""
    for directory in (
        out,
        os.path.join(out, STATE_DIR),
        feature_store(out),
        report_dir,
        os.path.join(report_dir, ".parts"),
    ):
        remove_temporaries(directory)


def _refuse_input_dirs(directory: str, option: str, shards: list[Shard]) -> None:
    real = os.path.realpath(directory)
    for shard in shards:
        if os.path.realpath(os.path.dirname(os.path.abspath(shard.path))) == real:
            raise OutputError(
                f"{directory}: is the directory of input shard {shard.path}; "
                f"choose another {option}"
            )
        if os.path.realpath(shard.path) == os.path.realpath(os.path.join(directory, shard.name)):
            raise OutputError(f"{directory}: its {shard.name} is the input shard {shard.path}")


def _refuse_foreign(directory: str, ours: bool, overwrite: bool, option: str) -> None:
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise OutputError(f"{directory}: exists and is not a directory ({option})")
    if os.path.isdir(directory) and not ours and not overwrite and _listdir(directory):
        raise OutputError(
            f"{directory}: is not empty and was not written by dedup ({option}); "
            "choose an empty or new directory, or pass --overwrite to write into it anyway"
        )


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError as e:
        raise OutputError(f"{directory}: cannot read ({e.strerror or e})") from None


def _make_dirs(*directories: str) -> None:
    for directory in directories:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{directory}: cannot create ({e.strerror or e})") from None


def _lock(path: str, what: str) -> int:
    """An exclusive POSIX lock on `path`, held until the descriptor is closed.

    POSIX record locks belong to the process: forked workers do not inherit them, and
    the kernel drops them when the process dies however it dies, so a lock whose owner
    is gone is never in the way of a rerun.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"{what}: cannot create a lock file ({e.strerror or e})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            pid = f" (pid {owner})" if owner.isdigit() else ""
            raise OutputError(f"{what}: another dedup run{pid} is writing here") from None
        raise OutputError(f"{what}: cannot lock ({e.strerror or e})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _write_job(job_path: str, outputs: set[str], complete: bool) -> None:
    job = {"tool": "dedup", "complete": complete, "outputs": sorted(outputs)}
    write_atomic(job_path, json.dumps(job, indent=1).encode())


def _previous_outputs(job_path: str) -> list[str]:
    try:
        with open(job_path, encoding="utf-8") as fh:
            outputs = json.load(fh).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [o for o in outputs if isinstance(o, str)]
