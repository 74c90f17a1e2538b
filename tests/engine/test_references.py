"""Matching against what you already have: --against (evaluation images as files, shard
sets, an earlier OUT, a `dedup index`), --blocklist, and the two-stage incremental run
that equals one full run."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup.commands.run import run
from dedup.core.errors import EXIT_USAGE
from dedup.engine.references import ReferencesError
from dedup.io import storage
from dedup.io.shards import MAX_FILE_BYTES
from dedup.synth import (
    PlantedSample,
    encode,
    make_image,
    planted_dataset,
    write_shards,
)
from tests.helpers import (
    FLAGS,
    VIEWS,
    captioned,
    cfg,
    dedup,
    error_line,
    outputs,
    render_in_chromium,
    rotated,
    textured,
    upload,
    write_tar,
)


def rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "dedup-report" / "samples.parquet").to_pylist()
    return {r["key"]: r for r in table}


def summary(out: Path) -> dict:
    return json.loads((out / "dedup-report" / "summary.json").read_text())


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder: bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def against_eval(decontam, tmp_path_factory):
    """One run of the training shards --against the evaluation folder (views on, two
    workers), and every file of that folder as it was before the run: (OUT, tree)."""
    root, _, _ = decontam
    before = tree(root / "eval")
    out = tmp_path_factory.mktemp("against-eval") / "clean"
    dedup(root / "train", "--out", out, "--against", root / "eval", *VIEWS)
    return out, before


def test_copies_of_evaluation_files_are_removed_and_named(decontam, against_eval):
    root, samples, truth = decontam
    out, before = against_eval
    got = rows(out)
    removed = {k: r["reference_key"] for k, r in got.items() if r["reason"] == "reference"}
    assert removed == truth  # every planted copy, nothing else, each with its file
    for key in truth:
        r = got[key]
        assert (r["kept"], r["reference"], r["duplicate_of"]) == (
            False,
            str(root / "eval"),
            truth[key],
        )
        assert r["duplicate_of_shard"] == str(root / "eval")
        assert r["reference_signal"] in ("exact", "phash", "views", "verified")
    # Within-INPUT dedup goes on as before: each planted group keeps one sample.
    kept_groups = [s.group for s in samples if got[s.key]["kept"] and s.group is not None]
    assert sorted(kept_groups) == sorted(
        {s.group for s in samples if s.group is not None and s.group < 1000}
    )
    in_output = {
        name.split(".")[0]
        for shard in sorted(out.glob("*.tar"))
        for name in subprocess.run(
            ["tar", "tf", shard], capture_output=True, text=True
        ).stdout.split()
    }
    assert not in_output & set(truth)
    section = summary(out)["references"]["against"]
    assert section == [
        {
            "reference": str(root / "eval"),
            "kind": "files",
            "items": 13,
            "usable": 12,
            "skipped_by_reason": {"undecodable": 1},
            "matched": len(truth),
            "matched_by_signal": section[0]["matched_by_signal"],
        }
    ]
    assert sum(section[0]["matched_by_signal"].values()) == len(truth)
    edit = {s.key: s.edit for s in samples}
    for key in truth:  # a pHash misses mirror images and letterboxes; the views do not
        hard = edit[key] in ("mirror", "letterbox")
        expected = (
            ("views", "verified") if hard else ("exact",) if edit[key] == "exact" else ("phash",)
        )
        assert got[key]["reference_signal"] in expected, (edit[key], got[key])
    assert tree(root / "eval") == before  # reference items are only read
    # The report shows the closest and farthest matches, each beside its item.
    report = out / "dedup-report"
    matches = pq.read_table(report / "matches.parquet").to_pylist()
    assert [m["side"] for m in matches] == ["closest"] * 6 + ["farthest"] * (len(truth) - 6)
    assert {m["key"]: m["reference_key"] for m in matches} == truth
    distances = [m["phash_distance"] or 0 for m in matches if m["side"] == "closest"]
    assert distances == sorted(distances)
    thumbs = {
        (r["shard"], r["key"]): r["thumbnail"]
        for r in pq.read_table(report / "previews.parquet").to_pylist()
    }
    for m in matches:
        assert (
            thumbs[(m["shard"], m["key"])] and thumbs[(m["reference_shard"], m["reference_item"])]
        )
    page = (report / "report.html").read_text()
    assert page.count("<span class=pair>") >= len(truth) and "eval: farthest matches" in page


@pytest.mark.slow  # three runs
def test_the_same_bytes_whatever_the_workers_and_on_a_rerun(decontam, tmp_path):
    root, _, _ = decontam
    flags = ["--against", root / "eval", "--signals", "exact,phash,views"]
    dedup(root / "train", "--out", tmp_path / "one", *flags, "--workers", "1")
    dedup(root / "train", "--out", tmp_path / "two", *flags, "--workers", "2")
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    again = dedup(root / "train", "--out", tmp_path / "two", *flags, "--workers", "2")
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    assert summary(tmp_path / "two")["shards"][0]["features_reused"] is True
    assert "extract: 12 samples" not in again.stderr  # the folder's features were reused


def test_an_index_serves_as_the_folder_does(decontam, against_eval, tmp_path):
    root, _, truth = decontam
    direct, _ = against_eval
    index = tmp_path / "index"
    made = dedup("index", root / "eval", "--out", index, *VIEWS, "--json")
    manifest = json.loads(made.stdout)
    assert manifest["items"] == 12 and manifest["config"]["signals"] == ["exact", "phash", "views"]
    used = dedup(root / "train", "--out", tmp_path / "via", "--against", index, *VIEWS)
    assert "extract: 12 samples" not in used.stderr  # nothing decoded again
    a, b = rows(direct), rows(tmp_path / "via")
    assert {k: r["kept"] for k, r in a.items()} == {k: r["kept"] for k, r in b.items()}
    assert {k: r["reference_key"] for k, r in b.items() if r["reference"]} == truth
    assert {r["reference"] for r in b.values() if r["reference"]} == {str(index)}
    # Other settings than the index was built with: exit 2, naming it.
    other = dedup(
        root / "train",
        "--out",
        tmp_path / "x",
        "--against",
        index,
        "--signals",
        "exact,phash",
        check=2,
    )
    assert str(index) in error_line(other) and "other settings" in error_line(other)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------ incremental


@pytest.fixture(scope="module")
def two_crawls(tmp_path_factory):
    """One crawl in two halves: copies within each half and across them."""
    root = tmp_path_factory.mktemp("crawls")
    samples = planted_dataset(
        60,
        {"exact": 10, "reencode": 10, "resize": 8, "crop": 6, "mirror": 6, "brighten": 5},
        seed=11,
        size=(128, 96),
    )
    order = np.random.default_rng(1).permutation(len(samples))
    samples = [samples[i] for i in order]
    half = len(samples) // 2
    for i, s in enumerate(samples[:half]):
        s.key = f"a{i:05d}"
    for i, s in enumerate(samples[half:]):
        s.key = f"b{i:05d}"
    write_shards(samples[:half], str(root / "week1"), 20, "a")
    write_shards(samples[half:], str(root / "week2"), 20, "b")
    return root


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--signals", "exact,phash,views"], id="views"),
        pytest.param(
            ["--signals", "exact,phash", "--cluster-rule", "components"],
            id="components",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["--signals", "exact,phash,views", "--no-verify"],
            id="no-verify",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_two_stages_equal_one_full_run(two_crawls, tmp_path, flags):
    """`dedup week2 --against clean-1` decides week2's samples exactly as one run over
    clean-1's kept samples and week2 (reference items come first, as clean-1's shards
    do in that run), byte for byte in the shards written."""
    root = two_crawls
    common = [*flags, "--keep", "first", "--workers", "2"]
    dedup(root / "week1", "--out", tmp_path / "clean-1", *common)
    second = dedup(
        root / "week2", "--out", tmp_path / "clean-2", "--against", tmp_path / "clean-1", *common
    )
    assert "extract: 3" not in second.stderr.split("extract:", 2)[-1]  # clean-1 not decoded
    dedup(tmp_path / "clean-1", root / "week2", "--out", tmp_path / "full", *common)
    incremental, full = rows(tmp_path / "clean-2"), rows(tmp_path / "full")
    week2 = sorted(incremental)
    decided = lambda r: (r["kept"], r["duplicate_of"])  # noqa: E731
    assert [decided(incremental[k]) for k in week2] == [decided(full[k]) for k in week2]
    assert sum(r["reason"] == "reference" for r in incremental.values()) >= 10
    for shard in sorted((root / "week2").glob("*.tar")):
        assert (tmp_path / "clean-2" / shard.name).read_bytes() == (
            tmp_path / "full" / shard.name
        ).read_bytes()
    # the reference's own samples: decided by its run, never touched by this one
    assert sorted(p.name for p in (tmp_path / "clean-1").glob("*.tar")) == [
        "a-000000.tar",
        "a-000001.tar",
        "a-000002.tar",
    ]


@pytest.mark.slow  # four runs and an index
def test_verified_copies_of_reference_items(tmp_path):
    """The views signal's grey zone reaches reference items: a 5-degree rotation and a
    captioned copy of evaluation files are checked by local features against the files."""
    ev = tmp_path / "eval"
    ev.mkdir()
    originals = [textured(700 + k) for k in range(4)]
    for k, image in enumerate(originals):
        (ev / f"{k}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    samples = [
        PlantedSample(
            "0000", {"jpg": encode(rotated(originals[0], 5), "JPEG", quality=90)}, 0, "r"
        ),
        PlantedSample("0001", {"jpg": encode(captioned(originals[1]), "JPEG", quality=90)}, 1, "c"),
        PlantedSample("0002", {"jpg": encode(textured(800), "JPEG", quality=90)}, 2, "other"),
    ]
    write_shards(samples, str(tmp_path / "in"), 2)
    dedup(tmp_path / "in", "--out", tmp_path / "out", "--against", ev, *VIEWS)
    got = rows(tmp_path / "out")
    assert {
        k: (r["reference_key"], r["reference_signal"]) for k, r in got.items() if not r["kept"]
    } == {
        "0000": ("0.jpg", "verified"),
        "0001": ("1.jpg", "verified"),
    }
    # From an index, the items' images are read where the index was made from; once they
    # are gone, those pairs are not checked (counted), and nothing fails.
    dedup("index", ev, "--out", tmp_path / "index", *VIEWS)
    dedup(tmp_path / "in", "--out", tmp_path / "via", "--against", tmp_path / "index", *VIEWS)
    assert outputs(tmp_path / "via").keys() == outputs(tmp_path / "out").keys()
    assert [k for k, r in rows(tmp_path / "via").items() if not r["kept"]] == ["0000", "0001"]
    ev.rename(tmp_path / "moved")
    gone = dedup(
        tmp_path / "in", "--out", tmp_path / "gone", "--against", tmp_path / "index", *VIEWS
    )
    assert all(r["kept"] for r in rows(tmp_path / "gone").values()), gone.stderr
    verify = summary(tmp_path / "gone")["counts"]["verify"]
    assert verify["rejected_by_reason"] == {"reference_images_not_at_hand": 2}


# ------------------------------------------------------------ blocklists


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocklist")
    samples = planted_dataset(24, {"exact": 4, "reencode": 4, "mirror": 3}, seed=5, size=(128, 96))
    write_shards(samples, str(root / "in"), 10)
    dedup(root / "in", "--out", root / "plain", *VIEWS)
    return root, samples, rows(root / "plain")


def test_blocklists_remove_what_they_name_and_the_copies(listed, tmp_path):
    root, samples, plain = listed
    groups = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s.key)
    # One group by the digest of its original, one by a pHash code, one by the digest of
    # a sample alone (no copies); a code nothing matches.
    by_group = sorted(g for g in groups if g is not None and len(groups[g]) > 1)
    digest_group, code_group = by_group[0], by_group[1]
    loner = next(g for g in groups if g is not None and len(groups[g]) == 1)
    original = lambda g: next(s.key for s in samples if s.group == g and s.edit == "original")  # noqa: E731
    text = tmp_path / "optout.txt"
    text.write_text(
        "# opt-out requests\n\n"
        f"blake3:{plain[original(digest_group)]['digest']}\n"
        f"{plain[original(code_group)]['phash']}\n"
        "phash:0000000000000000\n"
    )
    table = tmp_path / "takedown.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "blake3", "note"])
        w.writerow(["http://x/1", plain[groups[loner][0]]["digest"].upper(), "dmca"])
        w.writerow(["http://x/2", "", "no digest"])
    out = tmp_path / "out"
    dedup(root / "in", "--out", out, "--blocklist", text, "--blocklist", table, *VIEWS)
    got = rows(out)
    expected = set(groups[digest_group]) | set(groups[code_group]) | set(groups[loner])
    assert {k for k, r in got.items() if r["reason"] == "blocklist"} == expected
    for key in groups[code_group]:
        assert got[key]["reference"] == str(text)
        assert got[key]["reference_key"] == f"phash:{plain[original(code_group)]['phash']}"
    assert got[groups[loner][0]]["reference"] == str(table)
    lists = summary(out)["references"]["blocklists"]
    assert [(b["blocklist"], b["digests"], b["phash_codes"], b["matched"]) for b in lists] == [
        (str(text), 1, 2, len(groups[digest_group]) + len(groups[code_group])),
        (str(table), 1, 0, 1),
    ]
    # everything else as without the lists
    others = set(got) - expected
    assert {k: got[k]["kept"] for k in others} == {k: plain[k]["kept"] for k in others}


def test_a_parquet_blocklist_of_raw_bytes(listed, tmp_path):
    root, samples, plain = listed
    key = next(k for k, r in plain.items() if r["kept"] and r["digest"])
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"blake3": [bytes.fromhex(plain[key]["digest"])], "x": [1]}), path)
    dedup(root / "in", "--out", tmp_path / "out", "--blocklist", path, *VIEWS)
    group = next(s.group for s in samples if s.key == key)
    copies = sorted(s.key for s in samples if s.group == group)  # the sample and its copies
    assert [k for k, r in rows(tmp_path / "out").items() if r["reason"] == "blocklist"] == copies


@pytest.mark.parametrize(
    "content, message",
    [
        ("blake3:" + "ab" * 32 + "\nphash:12345\n", "list.txt:2: phash must be 16 hex digits"),
        ("# ok\n" + "zz" * 8 + "\n", "list.txt:2: phash must be 16 hex digits"),
        ("md5:" + "ab" * 16 + "\n", "list.txt:1: unknown entry kind 'md5'"),
        (
            "sha256:" + "ab" * 32 + "\n",
            "list.txt:1: a sha256 digest, but this run's digests are blake3",
        ),
        ("hello\n", "list.txt:1: not a digest"),
    ],
)
def test_a_blocklist_line_that_does_not_parse_is_exit_2(listed, tmp_path, content, message):
    root, _, _ = listed
    path = tmp_path / "list.txt"
    path.write_text(content)
    result = dedup(root / "in", "--out", tmp_path / "out", "--blocklist", path, *VIEWS, check=2)
    assert message in error_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["# opt-out requests, none yet\n# one per line\n", ""])
def test_a_blocklist_without_entries_matches_nothing(listed, tmp_path, content):
    root, _, plain = listed
    path = tmp_path / "list.txt"
    path.write_text(content)
    dedup(root / "in", "--out", tmp_path / "out", "--blocklist", path, *VIEWS)
    got = rows(tmp_path / "out")
    assert {k: r["kept"] for k, r in got.items()} == {k: r["kept"] for k, r in plain.items()}
    assert not [k for k, r in got.items() if r["reason"] == "blocklist"]
    lists = summary(tmp_path / "out")["references"]["blocklists"]
    assert [(b["digests"], b["phash_codes"], b["matched"]) for b in lists] == [(0, 0, 0)]


# ------------------------------------------------------------ bad references


def test_a_missing_reference_is_a_references_error_from_the_python_api(tmp_path):
    write_tar(str(tmp_path / "in/s.tar"), [("x.jpg", encode(make_image(1, 32, 32)))])
    config = cfg(against=(str(tmp_path / "missing"),))
    with pytest.raises(ReferencesError) as raised:
        run([str(tmp_path / "in")], str(tmp_path / "out"), config)
    assert str(raised.value) == f"against {tmp_path / 'missing'}: does not exist"
    assert raised.value.exit_code == EXIT_USAGE


@pytest.mark.slow  # nine runs
def test_bad_references_are_one_line_exit_2(decontam, tmp_path):
    root, _, _ = decontam
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "dedup-index.json").write_text('{"format": 1, "feature_fingerprint": "x"}')
    cases = {
        tmp_path / "missing": "does not exist",
        empty: "holds no shards and no image files",
        texts: "holds no shards and no image files",
        broken: "holds no usable images",
        root / "train": f"{root / 'train' / 'shard-000000.tar'} is also an input shard",
        tmp_path / "made": "an index built with other settings",
        tmp_path / "out": "is this run's --out",
    }
    # an earlier OUT made from this run's own input: everything would match itself
    dedup(root / "train", "--out", tmp_path / "earlier", *VIEWS)
    cases[tmp_path / "earlier"] = f"was made from {root / 'train' / 'shard-000000.tar'}"
    for ref, message in cases.items():
        result = dedup(root / "train", "--out", tmp_path / "out", "--against", ref, *VIEWS, check=2)
        line = error_line(result)
        assert f"against {ref}: {message}" in line, line
    assert list(broken.iterdir()) == [broken / "a.jpg"]


@pytest.mark.slow  # S3
def test_a_shard_set_in_object_storage_as_reference(decontam, s3, bucket, tmp_path):
    """--against s3://.../ (a shard set in a bucket), with OUT in the bucket too: the same
    decisions as the evaluation images given as local shards."""
    root, samples, truth = decontam
    items = [
        PlantedSample(path.stem, {path.suffix[1:]: path.read_bytes()}, None, "eval")
        for path in sorted((root / "eval").rglob("img*"))
    ]
    write_shards(items, str(tmp_path / "eval-shards"), 5, "eval")
    upload(tmp_path / "eval-shards", f"{bucket}/eval")
    dedup(
        root / "train", "--out", tmp_path / "local", "--against", tmp_path / "eval-shards", *VIEWS
    )
    dedup(root / "train", "--out", f"{bucket}/out", "--against", f"{bucket}/eval/", *VIEWS, env=s3)
    local = rows(tmp_path / "local")
    remote = {
        r["key"]: r
        for r in pq.read_table(
            pa.BufferReader(storage.read_bytes(f"{bucket}/out/dedup-report/samples.parquet"))
        ).to_pylist()
    }
    assert {k: r["kept"] for k, r in remote.items()} == {k: r["kept"] for k, r in local.items()}
    matched = {
        k: r["reference_key"].split()[-1] for k, r in remote.items() if r["reason"] == "reference"
    }
    assert matched == {k: Path(v).stem for k, v in truth.items()}
    assert {r["reference"] for r in remote.values() if r["reference"]} == {f"{bucket}/eval/"}


def test_a_damaged_reference_shard_is_named_or_skipped(decontam, tmp_path):
    """A damaged shard in a reference shard set fails the run naming it (exit 3), or with
    --skip-bad-shards is left out and listed (exit 5); the rest still matches."""
    root, samples, truth = decontam
    items = [
        PlantedSample(path.stem, {path.suffix[1:]: path.read_bytes()}, None, "eval")
        for path in sorted((root / "eval").rglob("img*"))
    ]
    write_shards(items, str(tmp_path / "ref"), 6, "ref")
    broken = tmp_path / "ref" / "ref-000001.tar"
    broken.write_bytes(broken.read_bytes()[:700])  # cut inside a member
    failed = dedup(
        root / "train", "--out", tmp_path / "a", "--against", tmp_path / "ref", *VIEWS, check=3
    )
    assert str(broken) in error_line(failed)
    dedup(
        root / "train",
        "--out",
        tmp_path / "b",
        "--against",
        tmp_path / "ref",
        "--skip-bad-shards",
        *VIEWS,
        check=5,
    )
    s = summary(tmp_path / "b")
    assert [x["shard"] for x in s["skipped_shards"]] == [str(broken)]
    first = {
        Path(v).stem for v in sorted(truth.values()) if Path(v).stem in {i.key for i in items[:6]}
    }
    matched = {
        r["reference_key"].split()[-1]
        for r in rows(tmp_path / "b").values()
        if r["reason"] == "reference"
    }
    assert first <= matched and matched <= {i.key for i in items[:6]}


def test_the_reference_section_renders_in_headless_chromium(decontam, against_eval, tmp_path):
    _, _, truth = decontam
    out, _ = against_eval
    body, dom, _ = render_in_chromium(out / "dedup-report" / "report.html", tmp_path)
    shown = int(re.search(r'data-match-images="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-match-loaded="(\d+)"', body).group(1))
    assert shown == 2 * len(truth) and loaded == shown  # each copy beside its item
    assert '<h2 id="references">References</h2>' in dom


# ------------------------------------------------------------ hostile references (issue 23)


def decisions(out: Path) -> list[tuple]:
    """Each sample's fate, with the item it matched (not which REF label named it)."""
    return [
        (k, r["kept"], r["reason"], r["duplicate_of"], r["reference_key"])
        for k, r in sorted(rows(out).items())
    ]


@pytest.mark.slow  # fifteen runs
def test_an_earlier_out_is_known_by_its_own_record_wherever_its_report_went(two_crawls, tmp_path):
    """OUT/.dedup/job.json says whether the run finished, whether it was a dry run and
    where its report went: an OUT whose report is elsewhere (--report) serves as one whose
    report is inside it; a record that says otherwise, or a report gone or since reused by
    another run, is one line, exit 2, naming it."""
    root = two_crawls
    common = [*FLAGS, "--keep", "first"]
    home, away, report = tmp_path / "home", tmp_path / "away", tmp_path / "reports" / "week1"
    dedup(root / "week1", "--out", home, *common)
    dedup(root / "week1", "--out", away, "--report", report, *common)
    assert not (away / "dedup-report").exists()
    for ref in (home, away):
        dedup(root / "week2", "--out", tmp_path / f"after-{ref.name}", "--against", ref, *common)
    assert decisions(tmp_path / "after-home") == decisions(tmp_path / "after-away")
    assert sum(d[2] == "reference" for d in decisions(tmp_path / "after-away")) >= 10
    # An OUT made with --against serves in turn (its report holds only its input's rows).
    dedup(
        root / "week1", "--out", tmp_path / "chain", "--against", tmp_path / "after-away", *common
    )

    def refused(ref: Path) -> str:
        result = dedup(
            root / "week2", "--out", tmp_path / "refused", "--against", ref, *common, check=2
        )
        assert not (tmp_path / "refused").exists()
        return error_line(result)

    def edit_job(out: Path, **change) -> None:
        path = out / ".dedup" / "job.json"
        job = {**json.loads(path.read_text()), **change}
        path.write_text(json.dumps({k: v for k, v in job.items() if v is not None}))

    prefix = f"dedup: error: against {away}: "
    edit_job(away, complete=False)
    assert refused(away) == prefix + "its run did not finish (.dedup/job.json says so); " + (
        "rerun it to the end"
    )
    edit_job(away, complete=True, dry_run=True)
    assert refused(away) == prefix + "its run was a dry run: it kept nothing"
    # A record from before `report` was kept: the report is OUT/dedup-report.
    edit_job(away, dry_run=False, report=None)
    assert refused(away) == prefix + (
        f"its report {away / 'dedup-report'} is gone or holds no readable summary.json; rerun it"
    )
    edit_job(home, report=None, dry_run=None)
    dedup(root / "week2", "--out", tmp_path / "old-record", "--against", home, *common)
    assert decisions(tmp_path / "old-record") == decisions(tmp_path / "after-home")
    # The report folder reused by another run, then deleted.
    edit_job(away, report=str(report))
    dedup(root / "week2", "--out", tmp_path / "other", "--report", report, *common)
    assert refused(away) == prefix + (
        f"its report {report} now describes another run (of {tmp_path / 'other'})"
    )
    shutil.rmtree(report)
    assert refused(away) == prefix + (
        f"its report {report} is gone or holds no readable summary.json; rerun it"
    )
    dry = tmp_path / "dry"
    dedup(root / "week1", "--out", dry, "--dry-run", *common)
    assert refused(dry) == f"dedup: error: against {dry}: its run was a dry run: it kept nothing"


@pytest.mark.slow  # eleven runs
def test_what_is_not_a_regular_file_in_a_reference_folder_is_counted_never_read(
    decontam, tmp_path, monkeypatch
):
    """A FIFO named as an image (opening it for reading would wait for ever), a link to
    /dev/zero (never ends), a socket, a link to a FIFO, a link to a folder (a loop), and a
    file over MAX_FILE_BYTES (sparse: reading it whole would take a GiB) in a reference
    folder: skipped and counted, never opened; the run decides as without them, directly
    and through an index."""
    root, _, truth = decontam
    plain, hostile = tmp_path / "plain", tmp_path / "hostile"
    shutil.copytree(root / "eval", plain)
    shutil.copytree(root / "eval", hostile)
    os.mkfifo(hostile / "pipe.jpg")
    os.symlink("/dev/zero", hostile / "zero.jpg")
    os.symlink(hostile / "pipe.jpg", hostile / "birds" / "to-pipe.png")
    os.symlink(hostile, hostile / "cars" / "loop.jpg")
    os.symlink("..", hostile / "cars" / "up")  # a loop with no image name: not an item
    monkeypatch.chdir(hostile)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.jpg")
    with open(hostile / "big.jpg", "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)
    monkeypatch.chdir(tmp_path)
    expected = {"undecodable": 1, "not_a_regular_file": 5, "too_large": 1}
    dedup(root / "train", "--out", tmp_path / "a", "--against", plain, *FLAGS)
    dedup(root / "train", "--out", tmp_path / "b", "--against", hostile, *FLAGS, timeout=300)
    assert decisions(tmp_path / "b") == decisions(tmp_path / "a")
    # Fingerprinted by content (every file hashed): the same files are never read either.
    dedup(
        root / "train", "--out", tmp_path / "bc", "--against", hostile, *FLAGS,
        "--fingerprint", "content", timeout=300,
    )  # fmt: skip
    assert decisions(tmp_path / "bc") == decisions(tmp_path / "a")
    matched = {d[4] for d in decisions(tmp_path / "b") if d[2] == "reference"}
    assert matched <= set(truth.values()) and len(matched) >= 6  # not mirrors: no views here
    (a,), (b,) = (summary(tmp_path / n)["references"]["against"] for n in ("a", "b"))
    assert (b["items"], b["usable"], b["skipped_by_reason"]) == (19, 12, expected)
    assert (a["items"], a["usable"], a["matched"]) == (13, 12, b["matched"])
    # The same counts through an index made from the folder.
    dedup("index", hostile, "--out", tmp_path / "index", *FLAGS, timeout=300)
    dedup(root / "train", "--out", tmp_path / "c", "--against", tmp_path / "index", *FLAGS)
    (c,) = summary(tmp_path / "c")["references"]["against"]
    assert (c["items"], c["usable"], c["skipped_by_reason"]) == (19, 12, expected)
    assert decisions(tmp_path / "c") == decisions(tmp_path / "a")
    # A REF or a --blocklist that is itself a FIFO or a device: one line, exit 2.
    for flag, path, why in (
        ("--against", hostile / "pipe.jpg", "not a regular file"),
        ("--blocklist", hostile / "pipe.jpg", "cannot read (not a regular file (a FIFO))"),
        ("--blocklist", hostile / "zero.jpg", "cannot read (not a regular file (a character "),
    ):
        result = dedup(
            root / "train", "--out", tmp_path / "x", flag, path, *FLAGS, check=2, timeout=120
        )
        assert error_line(result).startswith(f"dedup: error: {flag[2:]} {path}: {why}")
    assert not (tmp_path / "x").exists()
    # A --config that is a FIFO or a device: one line, exit 2, never a wait or a read
    # without end.
    for path, why in ((hostile / "pipe.jpg", "not a regular file"), ("/dev/zero", "not a ")):
        result = dedup(
            root / "train", "--out", tmp_path / "x", "--config", path, check=2, timeout=120
        )
        assert error_line(result).startswith(f"dedup: error: config {path}: {why}")


@pytest.fixture(scope="module")
def indexes(decontam, two_crawls, tmp_path_factory):
    """Two intact indexes: of an image folder (a features file per part) and of an
    earlier OUT (features and the rows it kept, rows.npy)."""
    root = tmp_path_factory.mktemp("indexes")
    decontam_root, _, _ = decontam
    dedup("index", decontam_root / "eval", "--out", root / "files", *FLAGS)
    dedup(two_crawls / "week1", "--out", root / "week1", *FLAGS)
    dedup("index", root / "week1", "--out", root / "run", *FLAGS)
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(index: Path, edit) -> None:
    path = index / "dedup-index.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


INDEX_DAMAGE = {
    "truncated features": (
        "files",
        "features",
        _truncate,
        "not a readable Parquet file (truncated?)",
    ),
    "missing features": ("files", "features", os.remove, "No such file or directory"),
    "missing marker": ("files", "marker", os.remove, "No such file or directory"),
    "garbled marker": (
        "files",
        "marker",
        lambda p: p.write_text("{]"),
        "not a feature file's marker",
    ),
    "truncated rows": ("run", "only", _truncate, "not a readable .npy file (truncated?)"),
    "missing rows": ("run", "only", os.remove, "No such file or directory"),
    "rows out of range": (
        "run",
        "only",
        lambda p: np.save(p, np.array([0, 10**6], dtype=np.int64)),
        "rows out of order or outside 0..",
    ),
    "rows not a list": (
        "run",
        "only",
        lambda p: np.save(p, np.zeros((2, 2), dtype=np.int64)),
        "not a list of rows (int64, 2-d)",
    ),
    "truncated manifest": ("run", "manifest", _truncate, "not valid JSON"),
    "manifest not an object": (
        "run",
        "manifest",
        lambda p: p.write_text("[]"),
        "not a JSON object",
    ),
}


@pytest.mark.parametrize("damage", [*INDEX_DAMAGE, "rows disagree", "entry lacks features"])
def test_a_damaged_index_is_exit_2_naming_the_index_and_the_file(
    indexes, two_crawls, tmp_path, damage
):
    """Every file an index's manifest names is checked when the index is opened: one
    line, exit 2, naming the index and the file, before OUT is touched."""
    index = tmp_path / "index"
    kind = INDEX_DAMAGE[damage][0] if damage in INDEX_DAMAGE else "run"
    shutil.copytree(indexes / kind, index)
    manifest = json.loads((index / "dedup-index.json").read_text())
    source = manifest["sources"][-1]
    files = {
        "features": index / source["features"],
        "marker": index / (source["features"] + ".done"),
        "only": index / (source["only"] or "none"),
        "manifest": index / "dedup-index.json",
    }
    if damage == "rows disagree":
        _edit_manifest(index, lambda m: {**m, "sources": [{**s, "rows": 3} for s in m["sources"]]})
        first = manifest["sources"][0]
        damaged = index / (first["features"] + ".done")
        why = f"{first['rows']} rows, the manifest says 3"
    elif damage == "entry lacks features":
        _edit_manifest(index, lambda m: {**m, "sources": [{"kind": "shard"}]})
        damaged, why = files["manifest"], "a source entry lacks 'shard'"
    else:
        _, which, hurt, why = INDEX_DAMAGE[damage]
        damaged = files[which]
        hurt(damaged)
    result = dedup(
        two_crawls / "week2", "--out", tmp_path / "out", "--against", index, *FLAGS, check=2
    )
    line = error_line(result)
    assert line.startswith(f"dedup: error: against {index}: damaged index: {damaged}: {why}")
    assert line.endswith("; rebuild it with `dedup index`")
    assert not (tmp_path / "out").exists()


def test_an_intact_index_of_an_earlier_out_serves(indexes, two_crawls, tmp_path):
    """The checks pass what `dedup index` made: the same decisions as the OUT itself."""
    week2 = two_crawls / "week2"
    dedup(week2, "--out", tmp_path / "a", "--against", indexes / "week1", *FLAGS)
    dedup(week2, "--out", tmp_path / "b", "--against", indexes / "run", *FLAGS)
    assert decisions(tmp_path / "a") == decisions(tmp_path / "b")
    assert sum(d[2] == "reference" for d in decisions(tmp_path / "b")) >= 10


# ------------------------------------------------------------ blocklist text lines


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("list.txt", "# a form feed\x0cin a comment\nhello\n", "list.txt:2: not a digest"),
        ("list.txt", "# a line separator\u2028in a comment\nhello\n", "list.txt:2: not a digest"),
        ("list.txt", "# next line\x85and a record separator\x1e\nhello\n", "list.txt:2: not"),
        ("list.txt", "# windows\r\n\r\nhello\r\n", "list.txt:3: not a digest"),
        ("list.txt", "\ufeffhello\n", "list.txt:1: not a digest (64 hex digits) or a pHash"),
        ("list.txt", "\ufeff# BOM\n\x0c\nzz\n", "list.txt:3: not a digest"),
        ("list.csv", 'phash,note\n1234567890abcdef,"two\nlines"\nzz,x\n', "list.csv:4: phash must"),
    ],
    ids=["form-feed", "u2028", "nel", "crlf", "bom", "bom-and-form-feed", "csv-quoted-newline"],
)
def test_a_blocklist_error_names_the_line_an_editor_shows(listed, tmp_path, name, content, message):
    root, _, _ = listed
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    result = dedup(root / "in", "--out", tmp_path / "out", "--blocklist", path, *FLAGS, check=2)
    assert error_line(result).startswith(f"dedup: error: {tmp_path / message}")
    assert not (tmp_path / "out").exists()


def test_a_blocklist_with_a_bom_is_read_as_without(listed, tmp_path):
    root, samples, plain = listed
    key = next(k for k, r in plain.items() if r["kept"] and r["digest"])
    entries = f"# opt-out\x0c requests\r\nblake3:{plain[key]['digest']}\r\n"
    counted = []
    for name, data in (("plain.txt", entries), ("bom.txt", "\ufeff" + entries)):
        (tmp_path / name).write_bytes(data.encode("utf-8"))
        out = tmp_path / name.split(".")[0]
        dedup(root / "in", "--out", out, "--blocklist", tmp_path / name, *FLAGS)
        (section,) = summary(out)["references"]["blocklists"]
        counted.append((section["digests"], section["phash_codes"], section["matched"]))
        assert sorted(k for k, r in rows(out).items() if r["reason"] == "blocklist") == sorted(
            s.key for s in samples if s.group == next(x.group for x in samples if x.key == key)
        )
    group = next(s.group for s in samples if s.key == key)
    assert counted == [(1, 0, sum(s.group == group for s in samples))] * 2
