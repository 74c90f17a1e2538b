"""dedup calibrate and --canaries: recall per signal and edit measured on the user's own
images, through the run's own extract phase and signals; honest against real runs;
canaries never reach the output."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from dedup.commands.calibrate import plan_copies
from dedup.core.config import Config
from dedup.engine.canaries import sample_images
from dedup.engine.edits import EDITS, apply
from dedup.io.decode import decode_image
from dedup.io.shards import list_shards
from dedup.synth import PlantedSample, encode, planted_dataset, write_shards
from tests.helpers import VIEWS, dedup, error_line, outputs, textured

EDITS_TESTED = ["jpeg_q30", "mirror", "crop_large", "caption", "rotate_3", "gray"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 distinct textured pictures (corners enough for local features) in 3 shards,
    and the calibration of them (every picture sampled, six edits)."""
    root = tmp_path_factory.mktemp("calibrate")
    samples = [
        PlantedSample(f"{k:04d}", {"jpg": encode(textured(900 + k), "JPEG", quality=90)}, k, "o")
        for k in range(24)
    ]
    write_shards(samples, str(root / "in"), 8)
    made = dedup(
        "calibrate",
        root / "in",
        "--sample",
        24,
        "--edits",
        ",".join(EDITS_TESTED),
        "--seed",
        3,
        "--report",
        root / "report",
        "--json",
        *VIEWS,
    )
    return root, json.loads(made.stdout), made.stderr


@pytest.mark.slow  # a run per edit
def test_calibrated_recall_matches_real_runs_per_edit(photos, tmp_path):
    """For each edit, a real run over the same pictures and copies made with that edit
    (and the same seeds) finds, for each copy, what calibrate said the signals find."""
    root, result, _ = photos
    config = Config(signals=("exact", "phash", "views"), seed=3)
    sample, _, _ = sample_images(list_shards([str(root / "in")]), 24, 3, config)
    copies = plan_copies(len(sample), EDITS_TESTED, 3)
    for edit in EDITS_TESTED:
        items = [PlantedSample(f"o{k:04d}", {"jpg": s.data}, k, "o") for k, s in enumerate(sample)]
        for k, name, seed in copies:
            if name == edit:
                image = decode_image(sample[k].data, config).image.convert("RGB")
                items.append(PlantedSample(f"c{k:04d}", {"img": apply(edit, image, seed)}, k, edit))
        for item in items[len(sample) :]:  # the right extension for each copy's format
            data = item.members.pop("img")
            ext = {b"\xff\xd8": "jpg", b"\x89P": "png", b"RI": "webp"}[data[:2]]
            item.members[ext] = data
        write_shards(items, str(tmp_path / edit), 100)
        dedup(tmp_path / edit, "--out", tmp_path / f"{edit}-out", "--keep", "first", *VIEWS)
        rows = pq.read_table(tmp_path / f"{edit}-out" / "dedup-report" / "samples.parquet")
        found = [
            r["duplicate_of"] == "o" + r["key"][1:]
            for r in rows.to_pylist()
            if r["key"].startswith("c")
        ]
        real = sum(found) / len(found)
        said = result["recall"][edit]["any"]
        assert abs(real - said) <= 1 / len(found) + 1e-9, (edit, real, said)


def test_a_signal_that_cannot_catch_an_edit_is_reported_so(photos):
    _, result, table = photos
    mirror = result["recall"]["mirror"]
    assert mirror["phash"] <= 0.1 and mirror["views"] >= 0.9  # not averaged away
    assert result["recall"]["jpeg_q30"]["phash"] == 1.0
    line = next(ln for ln in table.splitlines() if " mirror " in ln)
    phash, views = line.split()[-2:]  # the table's last two columns
    assert int(phash.rstrip("%")) <= 10 and views == "100%"


def test_false_links_and_recommendations_are_stated(photos):
    root, result, _ = photos
    n = result["sample"]["images"]
    for f in result["false_links"].values():
        assert f["pairs"] == n * (n - 1) // 2
        assert f["upper95"] >= f["rate"] and 0 <= f["rate"] <= 1
        dataset = result["sample"]["dataset_estimate"]
        assert f["per_image_at_dataset_size"] == pytest.approx(f["rate"] * (dataset - 1))
    assert result["false_links"]["exact"]["linked"] == 0  # distinct pictures
    rec = result["recommend"]
    for name in ("phash_threshold", "views_threshold"):
        r = rec[name]
        assert r.get("value") is None or r["precision"] >= rec["target_precision"]
    curve = result["curves"]["phash"]
    assert curve["recall"] == sorted(curve["recall"])  # looser, never fewer
    page = (root / "report" / "calibration.html").read_text()
    assert "Recall per edit" in page and "<svg" in page
    assert json.loads((root / "report" / "calibration.json").read_text()) == result


def test_copies_in_the_input_are_not_counted_as_false_links(tmp_path):
    # 24 distinct pictures, and copies of some of them in the input itself: 3 of the
    # same bytes (one picture to the sampler), 3 re-encodes at q60, 3 resizes to 75%.
    # Every image is sampled: the 6 pairs of copies are counted apart (linked, and
    # verified), the false links are the distinct pictures' (none), the pHash gets a
    # threshold, and the report says so.
    jpegs = [encode(textured(900 + k), "JPEG", quality=90) for k in range(24)]
    copies = [jpegs[k] for k in (0, 1, 2)]
    copies += [encode(textured(900 + k), "JPEG", quality=60) for k in (3, 4, 5)]
    small = [textured(900 + k) for k in (6, 7, 8)]
    copies += [encode(im.resize((240, 180)), "JPEG", quality=90) for im in small]
    samples = [
        PlantedSample(f"{k:04d}", {"jpg": data}, k, "o") for k, data in enumerate(jpegs + copies)
    ]
    write_shards(samples, str(tmp_path / "in"), 12)
    args = ["--sample", 40, "--edits", "jpeg_q30", "--report", tmp_path / "report", "--json"]
    made = dedup("calibrate", tmp_path / "in", *args, *VIEWS)
    result = json.loads(made.stdout)
    n = result["sample"]["images"]
    assert n == 30
    assert result["copies_in_sample"] == {"pairs": 6, "checked": 6, "unchecked": 0}
    for name, f in result["false_links"].items():
        assert f["pairs"] == n * (n - 1) // 2 - 6
        assert f["linked"] == 0, name
    assert result["recommend"]["phash_threshold"]["value"] is not None
    assert "copies in the sample: 6 pairs of sampled images" in made.stderr
    page = (tmp_path / "report" / "calibration.html").read_text()
    assert "Left out as copies of each other" in page


@pytest.mark.slow  # four calibrations
def test_calibrate_is_reproducible_and_one_line(photos):
    root, result, _ = photos

    def calibrate(seed: int, edits: str):
        args = ["--sample", 10, "--edits", edits, "--seed", seed, "--json", *VIEWS]
        return dedup("calibrate", root / "in", *args)

    again, twice = calibrate(3, "mirror,jpeg_q30"), calibrate(3, "mirror,jpeg_q30")
    assert len(again.stdout.splitlines()) == 1 and again.stdout == twice.stdout
    other = calibrate(4, "mirror")
    assert json.loads(other.stdout)["sample"]["seed"] == 4
    bad = dedup("calibrate", root / "in", "--edits", "nonsense", *VIEWS, check=2)
    assert "unknown edit 'nonsense'" in error_line(bad)


# ------------------------------------------------------------ canaries


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("canaries")
    samples = planted_dataset(40, {"exact": 6, "reencode": 6}, seed=5, size=(128, 96))
    write_shards(samples, str(root / "in"), 15)
    dedup(root / "in", "--out", root / "plain", *VIEWS)
    return root, samples


def test_canaries_never_reach_the_output(crawl, tmp_path):
    root, samples = crawl
    out = tmp_path / "out"
    made = dedup(root / "in", "--out", out, "--canaries", 30, "--json", *VIEWS)
    assert outputs(out) == outputs(root / "plain")  # the same shards and tables, byte for byte
    summary = json.loads(made.stdout)
    c = summary["canaries"]
    assert c["planted"] == 30 and c["seed"] == 0
    assert sum(row["copies"] for row in c["by_edit"].values()) == 30
    assert set(c["by_edit"]) <= set(EDITS)
    assert 0 <= c["recall"] <= 1 and c["caught"] == round(c["recall"] * 30)
    assert c["by_edit"]["mirror"]["phash"] == 0.0  # a signal's blind spot, per edit
    keys = {r["key"] for r in pq.read_table(out / "dedup-report" / "samples.parquet").to_pylist()}
    assert keys == {s.key for s in samples}  # no canary row among the samples
    assert not (out / ".dedup" / "canaries").exists()
    assert "Canaries" in (out / "dedup-report" / "report.html").read_text()
    assert "canaries:" in made.stderr and "phase" in made.stderr
    # the same seed, another worker count: the same canaries
    again = dedup(
        root / "in",
        "--out",
        tmp_path / "again",
        "--canaries",
        30,
        "--json",
        "--signals",
        "exact,phash,views",
        "--workers",
        "1",
    )
    assert json.loads(again.stdout)["canaries"] == c
    seeded = dedup(
        root / "in", "--out", tmp_path / "seeded", "--canaries", 30, "--seed", 9, "--json", *VIEWS
    )
    assert json.loads(seeded.stdout)["canaries"]["seed"] == 9
    assert outputs(tmp_path / "seeded") == outputs(root / "plain")


@pytest.mark.slow  # a fan-out and a run
def test_canaries_in_a_fan_out(crawl, tmp_path):
    root, _ = crawl
    out = tmp_path / "out"
    for i in (1, 0):
        dedup("extract", root / "in", "--out", out, "--part", f"{i}/2", "--canaries", 12, *VIEWS)
    dedup("cluster", "--out", out)
    summary = json.loads(dedup("write", "--out", out, "--part", "0/1", "--json").stdout)
    single = json.loads(
        dedup(root / "in", "--out", tmp_path / "one", "--canaries", 12, "--json", *VIEWS).stdout
    )
    assert summary["canaries"] == single["canaries"]
    assert outputs(out) == outputs(root / "plain")
