"""The HTML report: its data without a browser, then the page in headless Chromium."""

import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dedup.cli import main
from dedup.commands.run import run
from dedup.engine.tables import SHOWN_MEMBERS, shown_clusters
from dedup.report.html import risk_tiers
from dedup.synth import planted_dataset, write_shards
from tests.helpers import REPO, cfg, chromium, render_in_chromium

ARTIFACTS = REPO / "artifacts"


def test_risk_tiers_count_clusters_and_samples():
    assert risk_tiers([2, 9, 10, 99, 100, 250]) == [
        {"min_size": 10, "clusters": 4, "samples": 459},
        {"min_size": 100, "clusters": 2, "samples": 350},
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A run with one picture copied 120 times (the 100+ tier) and ordinary copies."""
    root = tmp_path_factory.mktemp("html")
    # Letterboxed and rotated copies land 10 to 30 bits away: pairs just outside 8.
    samples = planted_dataset(
        30,
        {"exact": 6, "reencode": 5, "resize": 5, "letterbox": 6, "rotate": 6},
        seed=5,
        size=(96, 72),
    )
    copied = {s.group for s in samples if s.edit != "original"}
    hot = next(s for s in samples if s.edit == "original" and s.group not in copied)
    for n in range(119):
        samples.append(type(hot)(f"hot{n:03d}", dict(hot.members), hot.group, "exact"))
    write_shards(samples, str(root / "in"), per_shard=40)
    summary = run([str(root / "in")], str(root / "out"), cfg(workers=2))
    return root / "out" / "dedup-report", summary


def test_report_data(report):
    report_dir, summary = report
    clusters = pq.read_table(report_dir / "clusters.parquet")
    shown = shown_clusters(clusters).to_pylist()
    assert shown[0]["size"] == 120 and shown[0]["survivor_key"]
    sizes = [c["size"] for c in shown]
    assert sizes == sorted(sizes, reverse=True)
    page = (report_dir / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # nothing from the network
    tiers = risk_tiers(clusters.column("size").to_pylist())
    assert tiers[1] == {"min_size": 100, "clusters": 1, "samples": 120}
    assert "<td>100 or more</td><td>1</td><td>120</td>" in page
    first = page.split("<div class=strip>")[1].split("</div><h3")[0]
    assert first.count('<img src="data:image/jpeg;base64,') == SHOWN_MEMBERS
    assert "and 108 more" in first
    previews = pq.read_table(report_dir / "previews.parquet").to_pylist()
    assert all(p["thumbnail"][:2] == b"\xff\xd8" for p in previews)
    assert any(p["caption"] and p["caption"].startswith("picture ") for p in previews)
    calibration = pq.read_table(report_dir / "calibration.parquet").to_pylist()
    t = summary["thresholds"]["phash"]
    inside = [c["value"] for c in calibration if c["side"] == "inside"]
    outside = [c["value"] for c in calibration if c["side"] == "outside"]
    assert inside and all(0 < v <= t for v in inside)
    # Outside pairs are the closest pairs beyond the threshold: check against all pairs.
    rows = pq.read_table(report_dir / "samples.parquet").to_pylist()
    codes = sorted({r["phash"] for r in rows if r["phash"]})
    near = sorted(
        d
        for n, a in enumerate(codes)
        for b in codes[n + 1 :]
        if t < (d := bin(int(a, 16) ^ int(b, 16)).count("1")) <= t + 8
    )
    assert outside and outside == near[: len(outside)] and len(outside) == min(6, len(near))
    assert len(page) < 3_000_000


def test_report_command_rerenders_the_same_page(report, tmp_path):
    report_dir, _ = report
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    (copy / "report.html").unlink()
    result = CliRunner().invoke(main, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").read_bytes() == (report_dir / "report.html").read_bytes()


def test_report_renders_in_headless_chromium(report, tmp_path):
    report_dir, _ = report
    browser = chromium()
    url = (report_dir / "report.html").resolve().as_uri()
    body, _, flags = render_in_chromium(report_dir / "report.html", tmp_path)
    images = int(re.search(r'data-first-strip-images="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-first-strip-loaded="(\d+)"', body).group(1))
    assert images == SHOWN_MEMBERS and loaded == images
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run(
        [browser, *flags, "--window-size=1300,2000", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
