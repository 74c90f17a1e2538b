import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup.commands.run import run
from dedup.core.errors import OutputError
from dedup.io.fsutil import TEMP_DIR
from tests.helpers import cfg, read_tar, write_tar


def expected_survivors(samples, keep="largest"):
    """The documented rule, applied to the planted groups: most pixels, then larger file,
    then first in input order (keep=first: first in input order)."""
    order = {
        (s.shard, s.key): n for n, s in enumerate(sorted(samples, key=lambda s: (s.shard, s.key)))
    }
    groups = {}
    for s in samples:
        if s.group is not None:
            groups.setdefault(s.group, []).append(s)
    survivors = set()
    for members in groups.values():

        def rank(s):
            image = next(d for e, d in s.members.items() if e in ("jpg", "png", "webp"))
            w, h = Image.open(io.BytesIO(image)).size
            if keep == "first":
                return (order[(s.shard, s.key)],)
            return (-w * h, -len(image), order[(s.shard, s.key)])

        survivors.add(min(members, key=rank).key)
    return survivors


@pytest.fixture(scope="module")
def result(planted, tmp_path_factory):
    samples, paths, shard_dir = planted
    out = str(tmp_path_factory.mktemp("run") / "clean")
    summary = run([shard_dir], out, cfg(workers=2, keep=("largest",)))
    return samples, paths, out, summary


def test_exact_survivor_set(result):
    samples, paths, out, _ = result
    table = pq.read_table(os.path.join(out, "dedup-report", "samples.parquet")).to_pylist()
    passthrough = {
        r["key"]: r["reason"] for r in table if r["reason"] in ("no_image", "undecodable")
    }
    assert sorted(passthrough.values()) == ["no_image", "undecodable"]
    # `kept` is true exactly for the samples in the output, pass-through included.
    kept = {r["key"] for r in table if r["kept"]}
    assert kept == expected_survivors(samples) | set(passthrough)
    outputs = [os.path.join(out, os.path.basename(p)) for p in paths]
    in_output = {n.split(".")[0] for p in outputs for n, _ in read_tar(p)}
    assert kept == in_output


def test_output_members_are_input_members_byte_for_byte(result):
    samples, paths, out, _ = result
    table = pq.read_table(os.path.join(out, "dedup-report", "samples.parquet")).to_pylist()
    in_output = {r["key"] for r in table if r["kept"]}
    for path in paths:
        want = [(n, d) for n, d in read_tar(path) if n.split(".")[0] in in_output]
        got = read_tar(os.path.join(out, os.path.basename(path)))
        assert got == want


def test_counts_add_up_per_shard_and_in_total(result):
    samples, paths, out, summary = result
    c = summary["counts"]
    assert c["samples"] == len(samples)
    assert c["samples"] == c["kept"] + c["removed"] + c["passthrough"]
    assert c["passthrough_by_reason"] == {"no_image": 1, "undecodable": 1}
    copies = sum(1 for s in samples if s.edit not in ("original", "no_image", "undecodable"))
    assert c["removed"] == copies
    assert sum(c["removed_by_reason"].values()) == copies
    for shard in summary["shards"]:
        assert shard["samples"] == shard["kept"] + shard["removed"] + shard["passthrough"]
        names = {n.split(".")[0] for n, _ in read_tar(shard["output"])}
        assert len(names) == shard["kept"] + shard["passthrough"]
    assert sum(s["samples"] for s in summary["shards"]) == len(samples)


def test_report_schema_and_reasons(result):
    samples, _, out, _ = result
    report = os.path.join(out, "dedup-report")
    rows = pq.read_table(os.path.join(report, "samples.parquet")).to_pylist()
    by_key = {r["key"]: r for r in rows}
    edit_of = {s.key: s.edit for s in samples}
    for r in rows:
        if r["reason"] in ("exact", "phash"):
            survivor = by_key[r["duplicate_of"]]
            assert survivor["kept"] and survivor["cluster_id"] == r["cluster_id"]
            assert r["cluster_size"] == survivor["cluster_size"] >= 2
            if r["reason"] == "exact":
                assert r["digest"] == survivor["digest"]
            else:
                assert r["digest"] != survivor["digest"]
                assert 0 <= r["phash_distance"] <= 8
        if edit_of[r["key"]] in ("reencode", "resize", "png", "webp", "brighten"):
            assert r["cluster_size"] >= 2
    clusters = pq.read_table(os.path.join(report, "clusters.parquet")).to_pylist()
    ids = {r["cluster_id"] for r in rows if r["cluster_size"] > 1}
    assert {c["cluster_id"] for c in clusters} == ids
    for c in clusters:
        members = [r for r in rows if r["cluster_id"] == c["cluster_id"]]
        assert c["size"] == len(members)
        assert sum(m["kept"] for m in members) == 1
        assert by_key[c["survivor_key"]]["kept"]
        assert "phash" in c["signals"]
    summary = json.loads(Path(report, "summary.json").read_text())
    assert summary["clusters"]["count"] == len(clusters)
    assert sum(summary["clusters"]["size_histogram"].values()) == len(clusters)
    assert summary["thresholds"] == {"phash": 8}
    assert summary["config"]["signals"] == ["exact", "phash"]


def test_two_runs_give_identical_bytes(planted, tmp_path, result):
    _, paths, out1, _ = result
    out2 = str(tmp_path / "again")
    run([planted[2]], out2, cfg(workers=1, keep=("largest",)))
    for name in [os.path.basename(p) for p in paths] + [
        "dedup-report/samples.parquet",
        "dedup-report/clusters.parquet",
    ]:
        with open(os.path.join(out1, name), "rb") as a, open(os.path.join(out2, name), "rb") as b:
            assert a.read() == b.read(), name


def test_keep_first(planted, tmp_path):
    samples, _, shard_dir = planted
    out = str(tmp_path / "first")
    run([shard_dir], out, cfg(keep="first", workers=1))
    rows = pq.read_table(os.path.join(out, "dedup-report", "samples.parquet")).to_pylist()
    judged = {r["key"] for r in rows if r["kept"] and r["reason"] in ("unique", "survivor")}
    assert judged == expected_survivors(samples, "first")


def test_exact_only_keeps_near_duplicates(planted, tmp_path):
    samples, _, shard_dir = planted
    summary = run([shard_dir], str(tmp_path / "x"), cfg(signals=("exact",), workers=1))
    assert summary["counts"]["removed"] == sum(1 for s in samples if s.edit == "exact")
    assert summary["counts"]["removed_by_reason"] == {"exact": summary["counts"]["removed"]}


def test_dry_run_writes_report_but_no_shards(planted, tmp_path):
    out = tmp_path / "dry"
    summary = run([planted[2]], str(out), cfg(workers=1), dry_run=True)
    assert not list(out.glob("*.tar"))
    assert (out / "dedup-report" / "samples.parquet").exists()
    assert summary["output"]["dry_run"] is True


def test_shard_with_every_sample_removed_is_an_empty_tar(tmp_path):
    from dedup.synth import encode, make_image

    image = encode(make_image(1, 64, 64))
    write_tar(str(tmp_path / "in/a.tar"), [("x.jpg", image), ("x.txt", b"first")])
    write_tar(str(tmp_path / "in/b.tar"), [("y.jpg", image), ("y.txt", b"copy")])
    summary = run([str(tmp_path / "in")], str(tmp_path / "out"), cfg(workers=1))
    assert read_tar(str(tmp_path / "out/a.tar")) == [("x.jpg", image), ("x.txt", b"first")]
    assert read_tar(str(tmp_path / "out/b.tar")) == []
    assert [s["kept"] for s in summary["shards"]] == [1, 0]


def test_out_refusals(planted, tmp_path):
    _, paths, shard_dir = planted
    with pytest.raises(OutputError, match="directory of input shard"):
        run([shard_dir], shard_dir, cfg(workers=1))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and was not written by dedup"):
        run([paths[0]], str(foreign), cfg(workers=1))
    run([paths[0]], str(foreign), cfg(workers=1), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert (foreign / os.path.basename(paths[0])).exists()
    # A second run into our own OUT is fine, and drops shards of the earlier input set.
    run([paths[1]], str(foreign), cfg(workers=1))
    assert not (foreign / os.path.basename(paths[0])).exists()
    assert (foreign / os.path.basename(paths[1])).exists()


def test_no_temporary_files_left(result):
    _, _, out, _ = result
    leftovers = [d for d, _, _ in os.walk(out) if TEMP_DIR in d]
    assert leftovers == []
