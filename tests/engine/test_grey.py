"""The views signal's verification tier end to end: grey-zone pairs are chosen nearest
first per image, read again from the shards by offset, checked by local features, and
linked as `verified`; the same results with one worker or two, and under Ray."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import dedup.engine.grey
from dedup.commands.run import run
from dedup.core.config import Config
from dedup.core.errors import ShardError
from dedup.core.progress import Progress
from dedup.engine.grey import GreyPairs, PairCheck, drop_linked, nearest_per_image
from dedup.executors.local import LocalExecutor
from dedup.signals.edges import Edges
from dedup.signals.views import grey_bound, grey_zone, search_bound
from dedup.synth import PlantedSample, encode, write_shards


def test_nearest_per_image_keeps_each_images_closest_candidates():
    # row 0 has five candidates; rows 1..5 one each (row 0); rows 6 and 7 each other
    grey = GreyPairs(
        i=np.array([0, 0, 0, 0, 0, 6]),
        j=np.array([1, 2, 3, 4, 5, 7]),
        distance=np.array([9, 7, 12, 7, 10, 14]),
        mirrored=np.zeros(6, dtype=bool),
    )
    kept = nearest_per_image(grey, 2)
    # every pair is among its other image's two nearest, so all stay ...
    assert kept.j.tolist() == [1, 2, 3, 4, 5, 7]
    # ... unless both ends have closer candidates
    grey = GreyPairs(
        i=np.array([0, 0, 0, 1, 1]),
        j=np.array([1, 2, 3, 2, 3]),
        distance=np.array([12, 6, 6, 6, 6]),
        mirrored=np.zeros(5, dtype=bool),
    )
    kept = nearest_per_image(grey, 2)
    assert list(zip(kept.i.tolist(), kept.j.tolist(), strict=True)) == [
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
    ]


def test_pairs_already_linked_are_not_checked():
    grey = GreyPairs(
        np.array([0, 1, 2]), np.array([5, 4, 3]), np.array([9, 9, 9]), np.zeros(3, bool)
    )
    edges = Edges.of([4, 3], [1, 9], [0, 0], 0)  # (1, 4) linked, either way round
    kept = drop_linked(grey, edges)
    assert kept.i.tolist() == [0, 2]


def test_the_grey_zone_narrows_as_the_data_grows():
    assert grey_bound(1_000) == 14
    assert grey_bound(24_000) == 8
    assert grey_bound(1_000_000) == 4
    assert grey_bound(10**9) == 0
    assert [grey_bound(n) for n in (10, 10**3, 10**5, 10**7)] == sorted(
        (grey_bound(n) for n in (10, 10**3, 10**5, 10**7)), reverse=True
    )


def _removed(out: str, truth: dict) -> dict:
    rows = pq.read_table(f"{out}/dedup-report/samples.parquet").to_pylist()
    return {truth[r["key"]]: (truth[r["duplicate_of"]], r["reason"]) for r in rows if not r["kept"]}


def _run(root, out, **settings):
    config = Config(signals=("exact", "phash", "views"), keep="first", **settings)
    run([str(root / "in")], out, config)
    return json.loads(Path(out, "dedup-report", "summary.json").read_text())


def test_grey_zone_copies_are_verified_and_a_part_is_not(grey_set, tmp_path):
    root, truth, _ = grey_set
    off = _run(root, str(tmp_path / "off"), verify=False)
    assert _removed(str(tmp_path / "off"), truth) == {}  # the hashes alone link none
    assert "verify" not in off["counts"] and "verify" not in off["thresholds"]
    on = _run(root, str(tmp_path / "on"), workers=2)
    assert _removed(str(tmp_path / "on"), truth) == {
        "rotated 0": ("original 0", "verified"),
        "rotated 1": ("original 1", "verified"),
        "captioned 2": ("original 2", "verified"),
    }
    v = on["counts"]["verify"]
    assert v["accepted"] == 3 and v["bound"] == grey_bound(12) == 16
    assert v["checked"] >= 3 and v["images_decoded"] >= 6
    assert v["checked"] - v["accepted"] == sum(v["rejected_by_reason"].values())
    assert on["thresholds"] == {"phash": 8, "views": 4, "verify": 16}
    clusters = pq.read_table(f"{tmp_path}/on/dedup-report/clusters.parquet").to_pylist()
    assert [c["signals"] for c in clusters] == [["verified"]] * 3


def test_verification_gives_the_same_bytes_with_one_worker_or_two(grey_set, tmp_path, monkeypatch):
    root, _, paths = grey_set
    for name, workers in (("a", 1), ("b", 2)):
        if workers == 2:  # one pair a task: tasks in both worker processes
            monkeypatch.setattr(dedup.engine.grey, "TASK_PAIRS", 1)
        _run(root, str(tmp_path / name), workers=workers, partition_rows=5)
    for name in [os.path.basename(p) for p in paths] + ["dedup-report/samples.parquet"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_shard_changed_after_its_features_were_read_is_refused(grey_set, tmp_path):
    """The check reads images again by offset: bytes that no longer match the digest
    taken in phase 1 stop the run with the shard named, never a check of other bytes."""
    from dedup.engine.extract import extract_shard
    from dedup.io.shards import Shard

    root, _, paths = grey_set
    config = Config(signals=("exact", "phash", "views"))
    changed = str(tmp_path / "changed.tar")
    with open(paths[0], "rb") as fh:
        data = bytearray(fh.read())
    with open(changed, "wb") as fh:
        fh.write(data)
    features = extract_shard(Shard(changed), config, str(tmp_path / "store"))
    data[2048] ^= 0xFF  # inside the first sample's JPEG
    with open(changed, "wb") as fh:
        fh.write(data)
    check = PairCheck(config, [(features.path, 0)], [changed], np.array([0, features.rows]))
    with pytest.raises(ShardError, match="changed since it was read"):
        check((np.array([0]), np.array([1]), np.array([False])))
    # ... and from a worker process, among other tasks, as itself
    items = [(np.array([k]), np.array([k + 1]), np.array([False])) for k in (2, 0, 1)]
    with pytest.raises(ShardError, match=r"changed\.tar.*changed since it was read"):
        LocalExecutor(2).map(check, items, Progress("verify", total_items=3))


def test_a_verified_pair_holds_for_every_row_with_the_same_view_codes():
    """Verified pairs are checked between the first rows of groups of equal view codes:
    an exact re-upload of the checked image (row 1, the largest) survives and the rotated
    copy (row 2) goes as its duplicate, one cluster of three."""
    from dedup.engine.cluster import resolve
    from dedup.signals.edges import DECISIONS, VERIFIED, VIEWS, Candidates

    views = np.zeros((3, 112), dtype=np.uint8)
    views[:2] = np.arange(112, dtype=np.uint8)
    views[2] = 255 - np.arange(112, dtype=np.uint8)
    cand = Candidates(
        pixels=np.array([100, 100, 100]),
        nbytes=np.array([10, 20, 10]),
        digest=np.zeros((3, 32), np.uint8),
        phash=None,
        detail=np.full(3, 40, np.int16),
        signature=np.zeros((3, 192), np.uint8),
        views=views,
    )
    edges = Edges.concat([Edges.of([0], [1], [0], VIEWS), Edges.of([0], [2], [13], VERIFIED)])
    for rule in ("star", "components"):
        config = Config(signals=("views",), cluster_rule=rule, keep=("largest",))
        result = resolve(cand, edges, config)
        assert result.survivor.tolist() == [1, 1, 1]
        assert [DECISIONS[r] for r in result.reason] == ["views", "survivor", "verified"]


def test_banners_in_the_grey_zone_are_rejected_not_a_crash(tmp_path):
    """3000x6 banners: a and its slightly cropped copy b are linked by the hashes; c, an
    unrelated banner, is in the grey zone with both. Their features are empty (ORB cannot
    shrink a line of pixels), so both checks fail and the run ends normally."""
    rng = np.random.default_rng(3)

    def banner():
        return Image.fromarray(np.repeat(rng.integers(0, 256, (6, 75, 3), np.uint8), 40, axis=1))

    a = banner()
    b = a.crop((30, 0, 3000, 6)).resize((3000, 6))
    samples = [
        PlantedSample(f"{k:04d}", {"jpg": encode(img, "JPEG", quality=90)}, None, "banner")
        for k, img in enumerate([a, b, banner()])
    ]
    write_shards(samples, str(tmp_path / "in"), 1)
    config = Config(signals=("views",), verify_threshold=24, workers=2)
    run([str(tmp_path / "in")], str(tmp_path / "out"), config)
    summary = json.loads(Path(tmp_path, "out", "dedup-report", "summary.json").read_text())
    assert summary["counts"]["removed_by_reason"] == {"views": 1}
    v = summary["counts"]["verify"]
    assert (v["checked"], v["accepted"], v["rejected_by_reason"]) == (2, 0, {"few_matches": 2})


def test_the_grey_zone_is_empty_without_verification_and_bounded_as_configured():
    assert grey_zone(Config(verify=False), 1000) == -1
    assert grey_zone(Config(verify_threshold=6), 10**9) == 6
    assert grey_zone(Config(), 10**7) == 0  # the search then stops at the thresholds
    assert search_bound(Config(), 10**7) == 8
