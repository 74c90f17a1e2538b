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


def test_windowed_and_streamed_copies_give_the_same_bytes(tmp_path, monkeypatch):
    """The writer reads a local shard a window at a time and streams what does not fit
    one: any window size (all samples in windows, some streamed, all streamed) writes
    the same bytes and captures the same members, and the output holds exactly the kept
    samples' members, long and non-ASCII names included."""
    import numpy as np

    import dedup.engine.write as write
    from dedup.engine.extract import extract_shard
    from dedup.io.shards import Shard
    from dedup.synth import encode, make_image
    from tests.helpers import cfg, read_tar, write_tar

    rng = np.random.default_rng(5)
    members = []
    for k in range(40):
        key = f"s{k:03d}" if k % 7 else f"{'long-key-' * 14}{k:03d}"  # PAX names too
        side = 24 + 8 * (k % 5)
        image = encode(make_image(k, side * 2, side), "JPEG" if k % 3 else "PNG")
        members.append((f"{key}.{'jpg' if k % 3 else 'png'}", image))
        members.append((f"{key}.txt", f"caption {k} é".encode() * int(rng.integers(1, 300))))
        if k == 17:  # a member far larger than the small windows below
            members.append((f"{key}.bin", rng.bytes(70_000)))
    shard = write_tar(str(tmp_path / "in" / "a.tar"), members)
    features = extract_shard(Shard(shard), cfg(), str(tmp_path / "store"))
    keep = [k % 4 != 1 for k in range(features.rows)]
    capture = frozenset({1, 17, 30})
    results = {}
    for window in (1 << 24, 20_000, 600):
        monkeypatch.setattr(write, "WINDOW", window)
        monkeypatch.setattr(write, "FLUSH", 5_000)  # many writes of gathered pieces
        monkeypatch.setattr(write, "_window", None)
        out = str(tmp_path / f"out-{window}.tar")
        written, captured = write.write_shard(features, keep, out, capture)
        with open(out, "rb") as fh:
            results[window] = (written, captured, fh.read())
    assert len({r[2] for r in results.values()}) == 1
    assert len({repr(r[1]) for r in results.values()}) == 1
    written, captured, _ = results[600]
    kept_keys = {
        f"s{k:03d}" if k % 7 else f"{'long-key-' * 14}{k:03d}" for k in range(40) if k % 4 != 1
    }
    expected = [(n, d) for n, d in members if n.rsplit(".", 1)[0] in kept_keys]
    assert written == 30
    assert read_tar(str(tmp_path / "out-600.tar")) == expected
    by_name = dict(members)
    for row in capture:
        key = f"s{row:03d}" if row % 7 else f"{'long-key-' * 14}{row:03d}"
        names = [n for n, _ in members if n.rsplit(".", 1)[0] == key]
        assert captured[row] == [by_name[n] for n in names]
