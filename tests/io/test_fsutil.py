"""Atomic files and their temporary folders, shared by tasks that run at once."""

from __future__ import annotations

import multiprocessing
import os
import time

from dedup.io.fsutil import TEMP_DIR, atomic_path, remove_empty_temp_dir, write_atomic


def test_a_temporary_folder_in_use_is_not_removed_as_empty(tmp_path):
    final = tmp_path / "a.bin"
    with atomic_path(str(final)) as tmp:
        remove_empty_temp_dir(str(tmp_path))  # another task ending meanwhile
        with open(tmp, "wb") as fh:
            fh.write(b"written")
    assert final.read_bytes() == b"written"
    assert sorted(p.name for p in tmp_path.iterdir()) == [TEMP_DIR, "a.bin"]
    remove_empty_temp_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    remove_empty_temp_dir(str(tmp_path))  # gone already: no error
    write_atomic(str(tmp_path / "b.bin"), b"again")  # the folder is made again
    assert (tmp_path / "b.bin").read_bytes() == b"again"


def _write_many(folder: str, prefix: str, count: int) -> None:
    for k in range(count):
        write_atomic(os.path.join(folder, f"{prefix}-{k}.bin"), b"x")


def _remove_until(folder: str, stop) -> None:
    while not stop.is_set():  # as often as parts could end: every 0.2 ms
        remove_empty_temp_dir(folder)
        time.sleep(0.0002)


def test_writers_and_removers_of_one_temporary_folder_at_once(tmp_path):
    """Fan-out parts write into OUT while others, ending, remove its temporary folder
    when empty: every write lands, none fails (a removal between makedirs' mkdir and its
    check that the folder exists is retried like one after it)."""
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    removers = [ctx.Process(target=_remove_until, args=(str(tmp_path), stop)) for _ in range(2)]
    writers = [
        ctx.Process(target=_write_many, args=(str(tmp_path), f"w{k}", 1500)) for k in range(2)
    ]
    for p in removers + writers:
        p.start()
    for p in writers:
        p.join()
    stop.set()
    for p in removers:
        p.join()
    assert [p.exitcode for p in writers] == [0, 0]
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != TEMP_DIR)
    assert len(written) == 3000
