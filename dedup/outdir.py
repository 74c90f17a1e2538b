"""The output directory: refuse what would clobber, lock it, clean what a crash left."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator

from dedup.errors import OutputError
from dedup.fsutil import TEMP_PATTERN, write_atomic
from dedup.shards import Shard

STATE_DIR = ".dedup"
JOB_FILE = "job.json"
LOCK_FILE = "lock"
FEATURES_DIR = "features"


def feature_store(out: str) -> str:
    return os.path.join(out, STATE_DIR, FEATURES_DIR)


@contextlib.contextmanager
def claim_output(
    out: str, shards: list[Shard], overwrite: bool, report_dir: str, dry_run: bool = False
) -> Iterator[None]:
    """Check OUT, take its lock for the run, remove leftovers of an interrupted run.

    OUT is refused when it is an input shard's directory, or not empty and not made by
    dedup (unless `overwrite`). An OUT that dedup made, finished or not, is resumed.
    """
    out_real = os.path.realpath(out)
    for shard in shards:
        if os.path.realpath(os.path.dirname(os.path.abspath(shard.path))) == out_real:
            raise OutputError(
                f"{out}: is the directory of input shard {shard.path}; choose another --out"
            )
        if os.path.realpath(shard.path) == os.path.realpath(os.path.join(out, shard.name)):
            raise OutputError(f"{out}: its {shard.name} is the input shard {shard.path}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"{out}: exists and is not a directory")
    job_path = os.path.join(out, STATE_DIR, JOB_FILE)
    ours = os.path.isfile(job_path)
    if os.path.isdir(out) and os.listdir(out) and not ours and not overwrite:
        raise OutputError(
            f"{out}: is not empty and was not written by dedup; "
            "pass --overwrite to write into it anyway"
        )
    try:
        os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
        os.makedirs(report_dir, exist_ok=True)
        lock = os.open(os.path.join(out, STATE_DIR, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"{out}: cannot create ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{out}: another dedup run is writing here") from None
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
        for directory in (out, feature_store(out), report_dir, os.path.join(out, STATE_DIR)):
            remove_temporaries(directory)
        if overwrite:
            _clear(feature_store(out))
        # Until this run ends, OUT is a mix of old and new shards: no summary may claim
        # otherwise, and job.json says the run is not complete.
        for name in ("summary.json", "report.html"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(report_dir, name))
        _write_job(job_path, current, complete=False)
        yield
        _write_job(job_path, current, complete=True)
    finally:
        os.close(lock)


def _write_job(job_path: str, outputs: set[str], complete: bool) -> None:
    job = {"tool": "dedup", "complete": complete, "outputs": sorted(outputs)}
    write_atomic(job_path, json.dumps(job, indent=1).encode())


def remove_temporaries(directory: str) -> list[str]:
    """Delete the temporary files an interrupted run left in `directory`; return them."""
    removed = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if re.fullmatch(TEMP_PATTERN, name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def _previous_outputs(job_path: str) -> list[str]:
    try:
        with open(job_path, encoding="utf-8") as fh:
            outputs = json.load(fh).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [o for o in outputs if isinstance(o, str)]


def _clear(store: str) -> None:
    if os.path.isdir(store):
        for name in os.listdir(store):
            os.unlink(os.path.join(store, name))
