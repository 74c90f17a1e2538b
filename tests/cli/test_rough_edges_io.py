"""Rough edges of reading and running (issue 27), each through the real CLI on the
default path: several shards, two workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import FLAGS, dedup, error_line, outputs

NOT_A_TAR = b'{"note": "a small file that is not a tar"}\n'


def copy_inputs(five_shards, dest: Path) -> Path:
    shutil.copytree(five_shards[0] / "in", dest, copy_function=shutil.copy2)
    return dest


@pytest.mark.parametrize(
    "damage, message",
    [
        ("small file", f"not a tar archive ({len(NOT_A_TAR)} bytes, less than one header)"),
        ("cut in its first header", "at byte 0: tar is truncated inside a header"),
    ],
)
def test_a_small_file_named_tar_is_not_called_a_truncated_tar(
    five_shards, tmp_path, damage, message
):
    inputs = copy_inputs(five_shards, tmp_path / "in")
    bad = inputs / "shard-000002.tar"
    bad.write_bytes(NOT_A_TAR if damage == "small file" else bad.read_bytes()[:300])
    expected = f"{bad}: {message}" if damage == "small file" else f"{bad} {message}"
    result = dedup(inputs, "--out", tmp_path / "out", *FLAGS, check=3)
    assert error_line(result) == f"dedup: error: {expected}"
    skipped = dedup(
        inputs, "--out", tmp_path / "out2", "--skip-bad-shards", "--json", *FLAGS, check=5
    )
    summary = json.loads(skipped.stdout)
    assert summary["skipped_shards"] == [{"shard": str(bad), "error": expected}]
    assert sorted(p.name for p in (tmp_path / "out2").glob("*.tar")) == [
        f"shard-00000{n}.tar" for n in (0, 1, 3, 4)
    ]


def test_an_out_named_tar_inside_the_input_folder_is_not_an_input(five_shards, tmp_path):
    inputs = copy_inputs(five_shards, tmp_path / "in")
    out = inputs / "clean.tar"
    dedup(inputs, "--out", out, *FLAGS)
    first = outputs(out)
    again = dedup(inputs, "--out", out, *FLAGS)
    assert "5 shards" in again.stderr
    assert outputs(out) == first
    clean = five_shards[0] / "clean"
    assert {n: b for n, b in first.items() if n.endswith(".tar")} == {
        p.name: p.read_bytes() for p in sorted(clean.glob("*.tar"))
    }
    # An OUT whose run was killed before its job file was written (its state folder
    # made first) is dedup's too: left out of the scan, and the rerun finishes it.
    early = inputs / "early.tar"
    (early / ".dedup").mkdir(parents=True)
    finished = dedup(inputs, "--out", early, *FLAGS)
    assert "5 shards" in finished.stderr
    shards = {n: b for n, b in outputs(early).items() if n.endswith(".tar")}
    assert shards == {n: b for n, b in first.items() if n.endswith(".tar")}
