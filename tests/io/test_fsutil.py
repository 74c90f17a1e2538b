"""Atomic files and their temporary folders, shared by tasks that run at once."""

from __future__ import annotations

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
