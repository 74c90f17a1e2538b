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
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator

from dedup.core.errors import ConfigError, DedupError, OutputError
from dedup.io import storage
from dedup.io.fsutil import (
    TEMP_DIR,
    read_file,
    remove_empty_temp_dir,
    remove_temporaries,
    write_atomic,
)
from dedup.io.shards import JOB_FILE, SPOOL_DIR, STATE_DIR, Shard, remove_spool, sidecars

log = logging.getLogger("dedup")

LOCK_FILE = "lock"
FEATURES_DIR = "features"
GLOBAL_DIR = "global"  # the global phase's files while it runs
PARTS_DIR = "parts"  # samples.parquet parts from the write tasks, until merged
REFERENCES_DIR = "references"  # features of --against shard sets and image folders
WRITTEN_DIR = "written"  # per output shard: the plan it was written from, its identity
FANOUT_DIR = "fanout"  # dedup extract / cluster / write: the job, each part's results
CANARIES_DIR = "canaries"  # --canaries: the planted shards and their features, while used
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
    "matches.parquet",
)


def feature_store(out: str, state_dir: str | None = None) -> str:
    """Where per-shard features live: `--state-dir`, else OUT/.dedup/features."""
    return state_dir or storage.join(storage.join(out, STATE_DIR), FEATURES_DIR)


def _same_place(a: str, b: str) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return storage.normal_url(a) == storage.normal_url(b)
    return os.path.realpath(a) == os.path.realpath(b)


def _parent(path: str) -> str:
    if storage.is_url(path):
        return storage.normal_url(path).rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


@contextlib.contextmanager
def claim_output(
    out: str,
    shards: list[Shard],
    overwrite: bool,
    report_dir: str,
    dry_run: bool = False,
    state_dir: str | None = None,
) -> Iterator[None]:
    """Check OUT and the report directory, lock both for the run, remove what an
    interrupted run left; mark the job complete when the body returns.

    Each is refused when it is an input shard's directory, or not empty and not made by
    dedup (unless `overwrite`), or locked by another run. An OUT that dedup made,
    finished or not, is resumed. Either may be a local directory or an object-store
    prefix (s3://, gs://).
    """
    job_path, ours = check_output(out, shards, overwrite, report_dir, state_dir)
    store = feature_store(out, state_dir)
    with contextlib.ExitStack() as locks:
        locks.enter_context(_locked(storage.join(storage.join(out, STATE_DIR), LOCK_FILE), out))
        locks.enter_context(_locked(storage.join(report_dir, REPORT_LOCK), report_dir))
        if state_dir is not None:  # the default store is inside OUT, under OUT's lock
            locks.enter_context(_locked(storage.join(state_dir, STATE_LOCK), state_dir))
        mark_report(report_dir, out)
        current = output_names(shards)
        if dry_run:  # a dry run leaves the shards it does not write alone
            current |= set(_previous_outputs(job_path) if ours else [])
        else:
            retire_outputs(out, job_path if ours else None, current)
        sweep(out, report_dir, store)
        if overwrite:
            _clear_store(store)
        # Until this run ends, OUT is a mix of old and new shards: no summary may claim
        # otherwise, and job.json says the run is not complete.
        for name in ("summary.json", "report.html"):
            remove_output(storage.join(report_dir, name))
        _write_job(job_path, current, complete=False, report=report_dir, dry_run=dry_run)
        try:
            yield
            _write_job(job_path, current, complete=True, report=report_dir, dry_run=dry_run)
        finally:
            sweep(out, report_dir, store)


def check_index_folder(out: str, manifest: str, overwrite: bool) -> None:
    """An index's folder: local (an index is read from local disk), and empty or an index
    already (its `manifest` there), unless `overwrite`."""
    if storage.is_url(out):
        raise ConfigError(f"--out {out}: an index is written to a local folder")
    foreign = os.path.isdir(out) and not os.path.isfile(os.path.join(out, manifest))
    if foreign and _listdir(out) and not overwrite:
        raise OutputError(f"{out}: not empty and not a dedup index (--overwrite to use it)")


def output_names(shards: list[Shard]) -> set[str]:
    """The files a run writes into OUT: a shard per input, and its img2dataset sidecars."""
    current = {s.name for s in shards}
    return current | {storage.basename(path) for s in shards for path in sidecars(s)}


def retire_outputs(out: str, job_path: str | None, current: set[str]) -> None:
    """Remove the files an earlier run wrote into OUT (listed in its job.json) for inputs
    no longer listed: a downstream glob would read them as current."""
    for name in _previous_outputs(job_path) if job_path else []:
        if name not in current and os.path.basename(name) == name and name:
            remove_output(storage.join(out, name))


def mark_report(report_dir: str, out: str) -> None:
    """The report directory's marker: dedup's, for the run whose OUT is `out`."""
    write_atomic(
        storage.join(report_dir, REPORT_MARKER),
        json.dumps({"tool": "dedup", "out": _absolute(out)}).encode(),
    )


def mark_job(out: str, shards: list[Shard], complete: bool, report_dir: str) -> None:
    """OUT's job.json: the outputs of this input set, and whether the run finished. An
    unfinished run's list keeps the earlier run's outputs too, until they are retired
    (retire_outputs), so that none is forgotten."""
    job_path = storage.join(storage.join(out, STATE_DIR), JOB_FILE)
    outputs = output_names(shards)
    if not complete:
        outputs |= set(_previous_outputs(job_path))
    _write_job(job_path, outputs, complete, report=report_dir)


def refuse_output(out: str, report_dir: str, shards: list[Shard]) -> None:
    """The refusals that need no look inside OUT: a scheme dedup cannot write to, and OUT
    or the report directory where an input shard lies. Nothing is created, so a run asks
    them first, before anything slow (CLIP's weights, a cluster) is set up."""
    for where in (out, report_dir):
        if storage.is_url(where) and storage.scheme(where) not in ("s3", "s3a", "gs", "gcs"):
            raise OutputError(f"{where}: dedup writes to local paths, s3:// or gs:// only")
    _refuse_input_dirs(out, "--out", shards)
    _refuse_input_dirs(report_dir, "--report", shards)


def check_output(
    out: str,
    shards: list[Shard],
    overwrite: bool,
    report_dir: str,
    state_dir: str | None = None,
) -> tuple[str, bool]:
    """OUT, the report directory and the feature store checked and created (no lock):
    (OUT's job.json, whether OUT is dedup's)."""
    refuse_output(out, report_dir, shards)
    job_path = storage.join(storage.join(out, STATE_DIR), JOB_FILE)

    # Each question is asked after the look that raised it: a task starting beside this
    # one (an orchestrator's parts start together) may be making its claim meanwhile,
    # and what it made after an earlier look must not read as someone else's.
    def ours() -> bool:
        return _isfile(job_path) or _only_ours(storage.join(out, STATE_DIR))

    _refuse_foreign(out, ours, overwrite, "--out")
    if _exists(storage.join(out, STATE_DIR)) and not ours():
        raise OutputError(f"{out}: holds a {STATE_DIR} that dedup did not write; remove it")
    inside_out = _same_place(_parent(report_dir), out)

    def report_ours() -> bool:
        return _isfile(storage.join(report_dir, REPORT_MARKER)) or (inside_out and ours())

    if not _same_place(report_dir, out):
        _refuse_foreign(report_dir, report_ours, overwrite, "--report")
    store = feature_store(out, state_dir)
    if state_dir is not None:
        _refuse_input_dirs(state_dir, "--state-dir", shards)
        foreign = [n for n in _names(state_dir) if not STORE_NAME.fullmatch(n)]
        if foreign and not overwrite:
            raise OutputError(
                f"{state_dir}: holds files dedup did not write ({foreign[0]}, ...) "
                "(--state-dir); choose an empty or new directory"
            )
    state = storage.join(out, STATE_DIR)
    _make_dirs(out, state, storage.join(state, WRITTEN_DIR), report_dir, store)
    return job_path, ours()


# What dedup puts in OUT/.dedup before job.json: a run killed in between left only these.
STATE_NAMES = {
    LOCK_FILE,
    JOB_FILE,
    FEATURES_DIR,
    GLOBAL_DIR,
    PARTS_DIR,
    REFERENCES_DIR,
    WRITTEN_DIR,
    FANOUT_DIR,
    CANARIES_DIR,
    SPOOL_DIR,
    ".dedup-tmp",
}


def _only_ours(state: str) -> bool:
    """A state folder that holds nothing but names dedup creates there.

    Tasks that start together (an orchestrator's mapped extract parts) each see the
    others' claims half made: a local folder just created (empty) or holding only some of
    dedup's names, an object-store prefix holding only some of dedup's objects. Each is
    dedup's; a name dedup never writes there is not."""
    if storage.is_url(state):
        names = set(storage.listdir(state))
        return bool(names) and names <= STATE_NAMES  # a prefix exists once it holds one
    if os.path.isdir(state) and not os.path.islink(state):
        return set(_listdir(state)) <= STATE_NAMES
    return False


def _absolute(path: str) -> str:
    return path if storage.is_url(path) else os.path.abspath(path)


def _isfile(path: str) -> bool:
    if storage.is_url(path):
        return storage.exists(path)
    return os.path.isfile(path)


def _exists(path: str) -> bool:
    if storage.is_url(path):
        return bool(storage.listdir(path)) or storage.exists(path)
    return os.path.lexists(path)


def remove_output(path: str) -> None:
    """Delete a file dedup wrote (a path or URL); gone already is fine."""
    if storage.is_url(path):
        storage.remove(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# What dedup writes in a feature store: `<digest>.parquet`, its `.done` marker, its lock
# and its temporary folder. Only these names are ever deleted there.
STATE_LOCK = ".dedup-state.lock"
STORE_NAME = re.compile(r"[0-9a-f]{32}\.parquet(\.done)?|\.dedup-tmp|\.dedup-state\.lock")


def _names(directory: str) -> list[str]:
    if storage.is_url(directory):
        return storage.listdir(directory)
    return _listdir(directory) if os.path.isdir(directory) else []


def _clear_store(store: str) -> None:
    """Delete the stored features (--overwrite): dedup's own files only."""
    for name in _names(store):
        if STORE_NAME.fullmatch(name) and name not in (STATE_LOCK, ".dedup-tmp"):
            remove_output(storage.join(store, name))


def _temp_parents(out: str, report_dir: str, store: str) -> list[str]:
    """The folders in which a run or a fan-out task makes temporary folders."""
    state = storage.join(out, STATE_DIR)
    references = storage.join(state, REFERENCES_DIR)
    fanout = storage.join(state, FANOUT_DIR)
    return [
        out,
        state,
        store,
        report_dir,
        storage.join(report_dir, ".parts"),
        storage.join(state, WRITTEN_DIR),
        fanout,
        storage.join(fanout, PARTS_DIR),
        *(storage.join(references, n) for n in _listdir_quiet(references)),
    ]


def sweep(out: str, report_dir: str, store: str) -> None:
    """Remove the temporary folders of OUT, its state and the report directory."""
    for directory in _temp_parents(out, report_dir, store):
        remove_temporaries(directory)
    # A killed run's copies of its pipe: inputs (a finished run removes its own).
    remove_spool(storage.join(storage.join(out, STATE_DIR), SPOOL_DIR))
    if not storage.is_url(report_dir):
        with contextlib.suppress(OSError):  # the report parts' folder, once merged
            os.rmdir(os.path.join(report_dir, ".parts"))


def remove_empty_temporaries(out: str, report_dir: str, store: str) -> None:
    """At the end of a fan-out task, which holds no lock on OUT: the temporary folders
    it may have made, removed where empty (another task may be using one), so a
    fanned-out OUT holds what one run's does."""
    for directory in _temp_parents(out, report_dir, store):
        remove_empty_temp_dir(directory)


def _listdir_quiet(directory: str) -> list[str]:
    """Sub-folders of a local directory ([] for a URL or a missing one)."""
    if storage.is_url(directory) or not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n)))


def _refuse_input_dirs(directory: str, option: str, shards: list[Shard]) -> None:
    if storage.is_url(directory):
        for shard in shards:
            if shard.is_url and _same_place(_parent(shard.path), directory):
                raise OutputError(
                    f"{directory}: holds input shard {shard.path}; choose another {option}"
                )
        return
    real = os.path.realpath(directory)
    for shard in shards:
        if shard.is_url:
            continue
        if os.path.realpath(os.path.dirname(os.path.abspath(shard.path))) == real:
            raise OutputError(
                f"{directory}: is the directory of input shard {shard.path}; "
                f"choose another {option}"
            )
        if os.path.realpath(shard.path) == os.path.realpath(os.path.join(directory, shard.name)):
            raise OutputError(f"{directory}: its {shard.name} is the input shard {shard.path}")


def _refuse_foreign(directory: str, ours, overwrite: bool, option: str) -> None:
    """Refuse a directory that holds something and is not dedup's. `ours()` is asked
    after the directory was listed."""
    if storage.is_url(directory):
        held = [n for n in storage.listdir(directory) if n != TEMP_DIR]
        if held and not overwrite and not ours():
            raise OutputError(
                f"{directory}: is not empty and was not written by dedup ({option}); "
                "choose an empty or new prefix, or pass --overwrite to write into it anyway"
            )
        return
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise OutputError(f"{directory}: exists and is not a directory ({option})")
    if os.path.isdir(directory) and not overwrite and _holds_anything(directory) and not ours():
        raise OutputError(
            f"{directory}: is not empty and was not written by dedup ({option}); "
            "choose an empty or new directory, or pass --overwrite to write into it anyway"
        )


def _holds_anything(directory: str) -> bool:
    """Anything but a folder of dedup's temporaries (a task starting beside this one
    writing its marker there)."""
    return any(name != TEMP_DIR for name in _listdir(directory))


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError as e:
        raise OutputError(f"{directory}: cannot read ({e.strerror or e})") from None


def _make_dirs(*directories: str) -> None:
    for directory in directories:
        if storage.is_url(directory):
            continue  # a prefix exists once an object is put under it
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{directory}: cannot create ({e.strerror or e})") from None


@contextlib.contextmanager
def _locked(path: str, what: str) -> Iterator[None]:
    if storage.is_url(path):
        with _object_lock(path, what):
            yield
        return
    fd = _lock(path, what)
    try:
        yield
    finally:
        os.close(fd)


# An object-store lock is an object created only if absent (a conditional PUT); its
# owner rewrites it every LOCK_REFRESH_SECONDS, and one not rewritten for
# LOCK_STALE_SECONDS belongs to a run that is gone and is taken over.
LOCK_REFRESH_SECONDS = 30.0
LOCK_STALE_SECONDS = 300.0


@contextlib.contextmanager
def _object_lock(url: str, what: str) -> Iterator[None]:
    owner = json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    ).encode()
    if not storage.create_exclusive(url, owner):
        age = storage.modified_seconds_ago(url)
        if age is not None and age < LOCK_STALE_SECONDS:
            try:
                holder = json.loads(storage.read_bytes(url, OutputError))
                who = f" (pid {holder['pid']} on {holder['host']})"
            except (DedupError, ValueError, KeyError, TypeError):
                who = ""
            raise OutputError(
                f"{what}: another dedup run{who} is writing here (its lock is taken over "
                f"once not refreshed for {LOCK_STALE_SECONDS:.0f} s)"
            )
        storage.remove(url)  # stale: its owner stopped refreshing it
        if not storage.create_exclusive(url, owner):
            raise OutputError(f"{what}: another dedup run is writing here")
    stop = threading.Event()

    def still_ours() -> bool:
        try:
            return storage.read_bytes(url, OutputError) == owner
        except DedupError:
            return False

    def refresh() -> None:
        # Rewritten only while it is still ours: a run that was taken over (frozen for
        # longer than LOCK_STALE_SECONDS) never overwrites or deletes the new owner's lock.
        while not stop.wait(LOCK_REFRESH_SECONDS):
            if not still_ours():
                log.warning("%s: this run's lock was taken over by another run", what)
                return
            with contextlib.suppress(DedupError):
                storage.put_bytes(url, owner)

    thread = threading.Thread(target=refresh, daemon=True, name="dedup-lock-refresh")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if still_ours():
            with contextlib.suppress(DedupError):
                storage.remove(url)


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


def _write_job(
    job_path: str, outputs: set[str], complete: bool, report: str, dry_run: bool = False
) -> None:
    """OUT's own record of its run: the outputs it wrote, whether it finished, whether it
    was a dry run, and where its report went (`--report` may put it outside OUT)."""
    job = {
        "tool": "dedup",
        "complete": complete,
        "dry_run": dry_run,
        "report": _absolute(report),
        "outputs": sorted(outputs),
    }
    write_atomic(job_path, json.dumps(job, indent=1).encode())


def _previous_outputs(job_path: str) -> list[str]:
    try:
        outputs = json.loads(read_file(job_path)).get("outputs", [])
    except (OSError, DedupError, ValueError, AttributeError):
        return []
    return [o for o in outputs if isinstance(o, str)]
