"""What a newcomer reads in the first minutes: summary.json's paths and names, the
stderr summary, report.html's notes, progress lines (issue 27)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dedup.commands.calibrate import human_table
from dedup.report.summary import absolute
from dedup.synth import encode, make_image, planted_dataset, write_shards
from tests.helpers import FLAGS, VIEWS, dedup, error_line, first_image, write_tar


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A run given relative paths from its folder: two shards, one named with a byte that
    is not UTF-8 (caf\\xe9.tar), a damaged one skipped, a reference folder that holds a
    copy of an input image. (root, stderr, summary.json's text)."""
    root = tmp_path_factory.mktemp("relative")
    samples = planted_dataset(12, {"exact": 3, "reencode": 2}, seed=3, size=(64, 48))
    (first,) = write_shards(samples[:10], str(root / "in"), per_shard=10)
    write_tar(
        os.fsdecode(os.path.join(os.fsencode(root / "in"), b"caf\xe9.tar")),
        [(f"c{k}.jpg", encode(make_image(900 + k, 64, 48), "JPEG")) for k in range(3)],
    )
    write_tar(str(root / "in" / "damaged.tar"), [("x.jpg", b"x" * 3000)])
    (root / "in" / "damaged.tar").write_bytes((root / "in" / "damaged.tar").read_bytes()[:700])
    write_tar(str(root / "ref" / "ref-0.tar"), [("r.jpg", first_image(first))])
    result = dedup(
        "in", "--out", "out", "--against", "ref", "--skip-bad-shards", *FLAGS, cwd=root, check=5
    )
    text = (root / "out" / "dedup-report" / "summary.json").read_text(encoding="utf-8")
    return root, result.stderr, text


def test_summary_paths_are_absolute(relative_run):
    root, _, text = relative_run
    s = json.loads(text)
    assert [x["shard"] for x in s["shards"]] == [
        f"{root}/in/caf\\xe9.tar",
        f"{root}/in/shard-000000.tar",
    ]
    assert [x["output"] for x in s["shards"]] == [
        f"{root}/out/caf\\xe9.tar",
        f"{root}/out/shard-000000.tar",
    ]
    assert [x["shard"] for x in s["skipped_shards"]] == [f"{root}/in/damaged.tar"]
    assert [r["reference"] for r in s["references"]["against"]] == [f"{root}/ref"]
    assert s["references"]["against"][0]["matched"] == 1
    assert s["config"]["against"] == [f"{root}/ref"]
    assert s["output"]["dir"] == f"{root}/out"
    page = (root / "out" / "dedup-report" / "report.html").read_text()
    assert f"<h3>{root}/ref: closest matches</h3>" in page  # matched by the same name


def test_the_tables_name_shards_and_references_as_the_summary_does(relative_run, tmp_path):
    """samples.parquet and clusters.parquet spell a shard and a reference as summary.json
    does (absolute), so the files join; and a later run matched --against this OUT (whose
    report was written from relative paths) reads it."""
    root, _, text = relative_run
    s = json.loads(text)
    report = root / "out" / "dedup-report"
    samples = pq.read_table(report / "samples.parquet").to_pylist()
    assert sorted({r["shard"] for r in samples}) == sorted(x["shard"] for x in s["shards"])
    assert {r["reference"] for r in samples if r["reference"]} == {f"{root}/ref"}
    clusters = pq.read_table(report / "clusters.parquet").to_pylist()
    shards = {x["shard"] for x in s["shards"]} | {f"{root}/ref/ref-0.tar"}  # a reference item
    assert clusters and {c["survivor_shard"] for c in clusters} <= shards
    shutil.copytree(root / "in", tmp_path / "again", ignore=shutil.ignore_patterns("damaged*"))
    later = dedup(tmp_path / "again", "--out", tmp_path / "o", "--against", root / "out", *FLAGS)
    assert "error" not in later.stderr


def test_summary_is_strict_utf8_json(relative_run):
    """A shard name's byte that is not UTF-8 is written as the text \\xe9, not as a lone
    surrogate (\\udce9) that strict JSON parsers reject."""
    _, _, text = relative_run
    assert "\\udce9" not in text and "caf\\\\xe9.tar" in text

    def strings(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    for s in strings(json.loads(text)):
        s.encode("utf-8")  # raises on a lone surrogate


def test_summary_keeps_urls():
    assert absolute("s3://bucket/ref/") == "s3://bucket/ref/"
    assert absolute("http://host/a.tar") == "http://host/a.tar"
    assert absolute("pipe:cat a.tar") == "pipe:cat a.tar"
    assert Path(absolute("in")).is_absolute()


def test_report_command_given_out_uses_the_report_inside(relative_run, tmp_path):
    """`dedup report OUT`, as typed after `dedup IN --out OUT`: the one report OUT holds."""
    root, _, _ = relative_run
    out = tmp_path / "out"
    shutil.copytree(root / "out" / "dedup-report", out / "dedup-report")
    page = out / "dedup-report" / "report.html"
    page.unlink()
    result = dedup("report", out)
    assert result.stderr == f"dedup: wrote {page}\n"
    assert page.read_bytes() == (root / "out" / "dedup-report" / "report.html").read_bytes()


def test_report_command_names_what_it_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    result = dedup("report", tmp_path / "empty", check=2)
    assert error_line(result) == (
        f"dedup: error: {tmp_path}/empty: not a dedup report (no summary.json here, nor a "
        "dedup-report folder with one; expected a report folder: OUT/dedup-report)"
    )
    result = dedup("report", tmp_path / "nowhere", check=2)
    assert error_line(result) == (
        f"dedup: error: {tmp_path}/nowhere: no such folder (expected a report folder: "
        "OUT/dedup-report)"
    )
    for name in ("dedup-report", "dedup-report-dry-run"):
        (tmp_path / "two" / name).mkdir(parents=True)
        (tmp_path / "two" / name / "summary.json").write_text("{}")
    result = dedup("report", tmp_path / "two", check=2)
    assert error_line(result) == (
        f"dedup: error: {tmp_path}/two: holds two reports: give one of "
        f"{tmp_path}/two/dedup-report or {tmp_path}/two/dedup-report-dry-run"
    )


def test_terminal_and_page_bin_cluster_sizes_alike(relative_run):
    root, stderr, _ = relative_run
    sizes = re.search(r"clusters of 2 or more \(sizes ([^)]*)\)", stderr).group(1)
    page = (root / "out" / "dedup-report" / "report.html").read_text()
    bars = re.findall(r"<rect [^>]*><title>([^<]*)</title>", page)
    assert sizes == "2: 3, 3-9: 0, 10-99: 0, 100+: 0"
    assert ", ".join(bars) == sizes


def test_a_resumed_run_ends_its_phases_at_100_percent(tmp_path):
    """The second run reads one new shard and reuses the first's stored features; the third
    reads nothing and leaves every output as it was: each phase's line still ends at 100%."""
    samples = planted_dataset(12, {"exact": 3}, seed=4, size=(64, 48), bad=False)
    first, _ = write_shards(samples, str(tmp_path / "in"), per_shard=8)
    dedup(first, "--out", tmp_path / "out", *FLAGS)
    lines = {}
    for run in ("resumed", "again"):
        stderr = dedup(tmp_path / "in", "--out", tmp_path / "out", *FLAGS).stderr
        lines[run] = [ln.split(" INFO ", 1)[1] for ln in stderr.splitlines() if " INFO " in ln]
    extract, write = (
        [ln for ln in lines["resumed"] if ln.startswith(phase)] for phase in ("extract:", "write:")
    )
    assert re.fullmatch(r"extract: 7 samples, [\d,]+/s, 100%, done in [\d.]+ s", extract[0])
    assert re.fullmatch(r"write: 12 samples, [\d,]+/s, 100%, done in [\d.]+ s", write[0])
    (done,) = [ln for ln in lines["resumed"] if ln.startswith("phase extract done in")]
    assert done.endswith(": 2 shards, 15 samples (stored features of 1 shard reused)")
    write = [ln for ln in lines["again"] if ln.startswith("write:")]
    assert re.fullmatch(r"write: 12 samples, [\d,]+/s, 100%, done in [\d.]+ s", write[0])
    assert "resolve: 1 task, done in " in "\n".join(lines["again"])


def test_calibrate_states_its_thresholds_as_words():
    result = {
        "signals": ["phash", "views"],
        "sample": {"images": 1500, "copies": 21000, "dataset_estimate": 1_200_000},
        "thresholds": {"phash": 8, "views": 4, "verify": 12},
        "recall": {},
        "false_links": {},
        "recommend": {"target_precision": 0.99},
    }
    assert human_table(result)[0] == (
        "calibrate: 1,500 sampled images, 21,000 edited copies; dataset about 1,200,000 "
        "images; thresholds phash 8, views 4, verify 12"
    )


def test_skipped_shards_are_in_the_final_lines_and_the_page(relative_run):
    root, stderr, _ = relative_run
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dedup: ")]
    skipped = [ln for ln in lines if ln.startswith("dedup: skipped damaged shard ")]
    assert [ln.split(": ")[1] for ln in skipped] == [f"skipped damaged shard {root}/in/damaged.tar"]
    assert lines[-1] == (
        f"dedup: wrote 2 shards to {root}/out (1 skipped: exit code 5); "
        f"report in {root}/out/dedup-report"
    )
    page = (root / "out" / "dedup-report" / "report.html").read_text()
    assert "<h2 id=skipped>Skipped shards (1)</h2>" in page
    assert f"<tr><th>{root}/in/damaged.tar</th>" in page


def test_a_dry_runs_page_says_so(relative_run, tmp_path):
    root, _, _ = relative_run
    dedup(root / "in", "--out", tmp_path / "out", "--dry-run", "--skip-bad-shards", *FLAGS, check=5)
    page = (tmp_path / "out" / "dedup-report" / "report.html").read_text()
    assert "<h1>dedup report (dry run)</h1><p class=note><b>Dry run</b>: nothing was " in page
    real = (root / "out" / "dedup-report" / "report.html").read_text()
    assert "<h1>dedup report</h1>" in real and "Dry run" not in real


def test_views_copies_and_calibration_pairs_say_what_they_show(tmp_path):
    """A views copy's pHash distance is the whole frame's; a pair just outside the pHash
    threshold that the views signal linked is not called kept apart; the page says which
    signals' calibration pairs it shows."""
    samples = planted_dataset(30, {"letterbox": 6, "rotate": 6, "exact": 3}, seed=5, size=(96, 72))
    write_shards(samples, str(tmp_path / "in"), per_shard=40)
    dedup(tmp_path / "in", "--out", tmp_path / "out", *VIEWS)
    page = (tmp_path / "out" / "dedup-report" / "report.html").read_text()
    links = re.findall(r"<div>((?:views|verified|phash|exact)[^<]*)</div>", page)
    assert links and all(
        re.fullmatch(r"(views|verified|exact), whole-frame pHash \d+ bits|phash, \d+ bits", x)
        for x in links
    )
    assert any(re.fullmatch(r"(views|verified), whole-frame pHash \d+ bits", x) for x in links)
    outside = page.split("<h3>phash, outside the threshold</h3>")[1].split("</div>")[0]
    calibration = pq.read_table(tmp_path / "out" / "dedup-report" / "calibration.parquet")
    rows = pq.read_table(tmp_path / "out" / "dedup-report" / "samples.parquet").to_pylist()
    cluster = {(r["shard"], r["key"]): r["cluster_id"] for r in rows}
    linked = [
        cluster[(p["shard_a"], p["key_a"])] == cluster[(p["shard_b"], p["key_b"])]
        for p in calibration.to_pylist()
        if p["side"] == "outside"
    ]
    assert any(linked)
    assert outside.count("<br>linked by another signal<br>") == sum(linked)
    assert (
        "Pairs are shown for the pHash and CLIP thresholds only (here: phash); for the views "
        "signal's, run <code>dedup calibrate</code>."
    ) in page
