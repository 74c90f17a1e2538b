import io
import os
import tarfile
from pathlib import Path

import pytest

from dedup.core.errors import InputError, ShardError
from dedup.io.shards import Shard, iter_samples, list_shards, split_member_name
from dedup.synth import encode, make_image
from tests.helpers import cfg, write_tar


@pytest.mark.parametrize(
    "name, key, ext",
    [
        ("a/b/c.d.jpg", "a/b/c", "d.jpg"),
        ("000001.jpg", "000001", "jpg"),
        ("x.y/z.txt", "x.y/z", "txt"),
        ("noext", "noext", ""),
        ("dir/ключ.json", "dir/ключ", "json"),
    ],
)
def test_key_rule_matches_webdataset(name, key, ext):
    from webdataset.tariterators import base_plus_ext

    assert split_member_name(name) == (key, ext)
    if ext:
        assert base_plus_ext(name) == (key, ext)


def test_list_dirs_globs_braces_sorted(tmp_path):
    for n in (2, 0, 1):
        write_tar(str(tmp_path / f"s-{n:03d}.tar"), [("a.txt", b"x")])
    (tmp_path / "notes.md").write_text("not a shard")
    want = [str(tmp_path / f"s-{n:03d}.tar") for n in range(3)]
    assert [s.path for s in list_shards([str(tmp_path)])] == want
    assert [s.path for s in list_shards([str(tmp_path / "s-*.tar")])] == want
    assert [s.path for s in list_shards([str(tmp_path / "s-{000..002}.tar")])] == want
    assert [s.path for s in list_shards([str(tmp_path / "s-{002,000}.tar")])] == [want[2], want[0]]


@pytest.mark.parametrize(
    "spec, message",
    [
        (["missing.tar"], "no such file"),
        (["{d}/*.tgz"], "matches no files"),
        (["{d}/s.tar", "{d}/s.tar"], "listed twice"),
        (["{d}/s.tar", "{d}/other/s.tar"], "would collide"),
        (["{d}/empty"], "holds no"),
        (["pipe:cat {d}/notes.md"], "not a .tar shard"),
        (["{d}/notes.md"], "not a .tar shard"),
    ],
)
def test_list_errors(tmp_path, spec, message):
    write_tar(str(tmp_path / "s.tar"), [("a.txt", b"x")])
    write_tar(str(tmp_path / "other" / "s.tar"), [("a.txt", b"x")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match=message):
        list_shards([s.format(d=tmp_path) for s in spec])


def test_reads_webdataset_shardwriter_output(tmp_path):
    import webdataset as wds

    img = make_image(9, 64, 48)
    records = [
        {"__key__": "s0", "jpg": encode(img, "JPEG"), "txt": "a caption", "json": {"k": 1}},
        {"__key__": "s1", "png": encode(img, "PNG"), "txt": "second"},
        {"__key__": "s2", "webp": encode(img, "WEBP"), "json": {"caption": "c"}},
    ]
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=2) as sink:
        for r in records:
            sink.write(r)
    shards = list_shards([str(tmp_path)])
    assert [s.name for s in shards] == ["wds-000000.tar", "wds-000001.tar"]
    got = [(s.key, [m.name for m in s.members]) for sh in shards for s in iter_samples(sh)]
    # ShardWriter writes a sample's members sorted by extension.
    assert got == [
        ("s0", ["s0.jpg", "s0.json", "s0.txt"]),
        ("s1", ["s1.png", "s1.txt"]),
        ("s2", ["s2.json", "s2.webp"]),
    ]
    # And end to end: the three are one picture, and the JPEG, PNG and WebP link by pHash.
    from dedup.commands.run import run

    summary = run([str(tmp_path)], str(tmp_path / "out"), cfg(workers=1))
    assert summary["counts"]["removed"] == 2


def _shard(tmp_path, members):
    return Shard(write_tar(str(tmp_path / "t.tar"), members))


def test_non_adjacent_members_are_an_error(tmp_path):
    shard = _shard(tmp_path, [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"3")])
    with pytest.raises(ShardError, match=r"t.tar at byte \d+: members of sample 'a' are not adj"):
        list(iter_samples(shard))


def test_duplicate_member_name_is_an_error(tmp_path):
    shard = _shard(tmp_path, [("a.jpg", b"1"), ("a.jpg", b"2")])
    with pytest.raises(ShardError, match="has the member 'a.jpg' twice"):
        list(iter_samples(shard))


def test_truncated_tar_is_an_error(tmp_path):
    shard = _shard(tmp_path, [("a.jpg", b"x" * 5000), ("b.jpg", b"y" * 5000)])
    data = Path(shard.path).read_bytes()
    for cut in (700, 5632, 6000):
        with open(shard.path, "wb") as fh:
            fh.write(data[:cut])
        with pytest.raises(ShardError, match="t.tar"):
            list(iter_samples(shard))


def test_garbage_in_the_middle_is_an_error(tmp_path):
    shard = _shard(tmp_path, [("a.jpg", b"x" * 10), ("b.jpg", b"y" * 10)])
    data = bytearray(Path(shard.path).read_bytes())
    data[1024:1100] = b"\x07" * 76  # the second member's header
    Path(shard.path).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="byte 1024"):
        list(iter_samples(shard))


def test_not_a_tar_and_empty_file(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"hello world" * 100)
    with pytest.raises(ShardError, match="not a readable tar"):
        list(iter_samples(Shard(str(tmp_path / "bad.tar"))))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="empty file"):
        list(iter_samples(Shard(str(tmp_path / "empty.tar"))))


def test_a_small_file_is_not_a_tar_and_a_cut_first_header_is_truncated(tmp_path):
    """Below one 512-byte block, a tar cut inside its first header (long name, ustar and
    PAX headers) is a truncated tar; a small file of another kind is not a tar at all."""
    for name in ("a.jpg", "x" * 90 + ".jpg", "ключ.jpg"):
        data = Path(_shard(tmp_path, [(name, b"x" * 10)]).path).read_bytes()
        for cut in range(data.index(0) + 1, 512):  # past the first header's name
            Path(tmp_path / "t.tar").write_bytes(data[:cut])
            with pytest.raises(ShardError, match="at byte 0: tar is truncated inside a header"):
                list(iter_samples(Shard(str(tmp_path / "t.tar"))))
    small = [b"hello\n", b"{}" * 100, encode(make_image(1, 4, 4), "PNG"), b"\x00" * 300]
    for data in small:
        (tmp_path / "small.tar").write_bytes(data)
        with pytest.raises(ShardError) as error:
            list(iter_samples(Shard(str(tmp_path / "small.tar"))))
        assert str(error.value) == (
            f"{tmp_path / 'small.tar'}: not a tar archive ({len(data)} bytes, less than one header)"
        )


def test_non_regular_members_are_counted_not_read(tmp_path):
    import tarfile
    from collections import Counter

    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        for name, kind in [("d", tarfile.DIRTYPE), ("l.jpg", tarfile.SYMTYPE)]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info)
        info = tarfile.TarInfo("a.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    skipped = Counter()
    samples = list(iter_samples(Shard(str(path)), skipped))
    assert [(s.key, [(m.name, m.data) for m in s.members]) for s in samples] == [
        ("a", [("a.txt", b"hi")])
    ]
    assert skipped == {"directory": 1, "link": 1}
    # Nothing was created or followed: the folder holds only the tar.
    assert os.listdir(tmp_path) == ["links.tar"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_agrees_with_tarfile_on_names_and_bytes(tmp_path, fmt):
    names = [
        "plain.jpg",
        "deep/" * 20 + "long.key.txt",  # over 100 characters: prefix, GNU L or PAX path
        "k/" + "x" * 90 + ".json",  # base name alone near the ustar limit
    ]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("ünïcödé/ключ.txt")
    path = tmp_path / "f.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for n, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = bytes([n]) * (n * 700 + 1)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        want = [(i.name, tar.extractfile(i).read()) for i in tar if i.isreg()]
    got = [(m.name, m.data) for s in iter_samples(Shard(str(path))) for m in s.members]
    assert got == want
    offsets = [m.offset for s in iter_samples(Shard(str(path))) for m in s.members]
    raw = path.read_bytes()
    assert [raw[o : o + len(d)] for o, (_, d) in zip(offsets, got, strict=True)] == [
        d for _, d in got
    ]
