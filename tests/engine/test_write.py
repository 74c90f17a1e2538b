import tarfile

import pytest

from dedup.engine.write import _tarfile_header, member_header


@pytest.mark.parametrize(
    "name, size",
    [
        ("a.jpg", 0),
        ("000001.jpg", 123_456),
        ("dir/sub/key.seg.png", 8**11 - 1),
        ("x" * 100, 5),
        ("x" * 101, 5),  # PAX path record
        ("ключ.txt", 7),  # non-ASCII: PAX path record
        ("big.bin", 8**11),  # PAX size record
    ],
)
def test_header_fast_path_equals_tarfile(name, size):
    assert member_header(name, size) == _tarfile_header(name, size)


def test_headers_have_no_clock_or_host_fields():
    info = tarfile.TarInfo.frombuf(member_header("k.jpg", 10), "utf-8", "surrogateescape")
    assert (info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname) == (
        0,
        0o644,
        0,
        0,
        "",
        "",
    )
