"""Which copy survives, through the real CLI on the default path (several shards, two
workers): the default keep policy keeps the original over padded, captioned, re-encoded
and resized copies that come first in the input; clusters.parquet says why; keep_by
ranks by a JSON sidecar's number and counts the samples without one; the same bytes for
any partitioning and worker count."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from dedup.core.config import Config
from dedup.engine.ranking import describe_value, link_degree, rank
from dedup.signals.edges import PHASH, VIEWS, Candidates, Edges
from dedup.signals.keep import BARS, CAPTION
from tests.helpers import dedup, error_line, local_outputs, textured, write_tar

FLAGS = ["--signals", "exact,phash,views", "--workers", "2"]


def _jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _border(image):
    w, h = image.size
    out = Image.new("RGB", (w + 36, h + 36), (210, 40, 90))
    out.paste(image, (18, 18))
    return out


def _letterbox(image):
    w, h = image.size
    out = Image.new("RGB", (w, h + 80), (0, 0, 0))
    out.paste(image, (0, 40))
    return out


def _caption(image, at):
    w, h = image.size
    band = 40
    out = Image.new("RGB", (w, h + band), (255, 255, 255) if at == "bottom" else (25, 25, 25))
    out.paste(image, (0, band if at == "top" else 0))
    ink = (0, 0, 0) if at == "bottom" else (250, 250, 250)
    font = ImageFont.load_default(size=22)
    ImageDraw.Draw(out).text((8, 4 if at == "top" else h + 4), "Photo of the day", ink, font)
    return out


def _noisy(image, sigma=6.0):
    pixels = np.asarray(image, np.float32)
    pixels += np.random.default_rng(0).normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


EDITS = {
    "border": lambda im: _jpeg(_border(im), 95),
    "letterbox": lambda im: _jpeg(_letterbox(im), 95),
    "caption_bottom": lambda im: _jpeg(_caption(im, "bottom"), 95),
    "caption_top": lambda im: _jpeg(_caption(im, "top"), 95),
    "reencode": lambda im: _jpeg(im, 45),
    "resize": lambda im: _jpeg(im.resize((im.width // 2, im.height // 2)), 95),
    "noise": lambda im: _jpeg(_noisy(im), 95),  # saved at a higher quality than the original
}
# What decides each cluster: the copy's overlay, its quality, its content
DECIDED_BY = {
    "border": "clean",
    "letterbox": "clean",
    "caption_bottom": "clean",
    "caption_top": "clean",
    "reencode": "quality",
    "resize": "content",
    "noise": "noise",
}


@pytest.fixture(scope="module")
def web_copies(tmp_path_factory):
    """Three shards: every copy (one edit per original) in the first two, the originals
    last, so that input order favours the copies. Returns the folder, {copy: original}
    and {copy: edit}."""
    root = tmp_path_factory.mktemp("web")
    shards: list[list] = [[], [], []]
    of, edit_of = {}, {}
    for k, (edit, make) in enumerate(EDITS.items()):
        image = textured(300 + k)
        shards[k % 2].append((f"c{k}.jpg", make(image)))
        shards[2].append((f"o{k}.jpg", _jpeg(image)))
        of[f"c{k}"], edit_of[f"c{k}"] = f"o{k}", edit
    for n, members in enumerate(shards):
        write_tar(str(root / f"part-{n}.tar"), members)
    return root, of, edit_of


def _tables(out):
    report = out / "dedup-report"
    samples = {r["key"]: r for r in pq.read_table(report / "samples.parquet").to_pylist()}
    clusters = {
        r["survivor_key"]: r for r in pq.read_table(report / "clusters.parquet").to_pylist()
    }
    return samples, clusters


def test_the_default_policy_keeps_the_originals(web_copies, tmp_path):
    folder, of, edit_of = web_copies
    result = dedup(folder, "--out", tmp_path / "out", *FLAGS, "--json")
    summary = json.loads(result.stdout)
    samples, clusters = _tables(tmp_path / "out")
    removed = {k: r["duplicate_of"] for k, r in samples.items() if not r["kept"]}
    assert removed == of
    assert summary["counts"]["detached"] == 0
    for copy, original in of.items():
        why = clusters[original]
        assert why["kept_by"] == DECIDED_BY[edit_of[copy]], (edit_of[copy], why)
        assert why["kept_detail"], why
        assert samples[original]["overlay"] == "" and samples[original]["padding"] == 0
        assert samples[original]["quality"] == "q92"
    padded = [c for c, e in edit_of.items() if DECIDED_BY[e] == "clean"]
    assert all(samples[c]["overlay"] and samples[c]["padding"] > 0.05 for c in padded)
    assert samples["c4"]["quality"] == "q45"  # the re-encode
    assert clusters["o4"]["kept_detail"] == "q92 over q45"
    page = (tmp_path / "out" / "dedup-report" / "report.html").read_text()
    assert "kept by clean: clean over bars" in page and "kept by quality: q92 over q45" in page
    # The old rule keeps the padded copies (bars are pixels) and names its criterion.
    dedup(folder, "--out", tmp_path / "largest", *FLAGS, "--keep", "largest")
    samples, clusters = _tables(tmp_path / "largest")
    assert {c for c in padded if samples[c]["kept"]} == set(padded)
    assert {clusters[c]["kept_by"] for c in padded} == {"largest"}


@pytest.mark.slow  # four runs
def test_the_same_bytes_for_any_partitioning_and_worker_count(web_copies, tmp_path):
    folder, _, _ = web_copies
    small = tmp_path / "small.yaml"
    small.write_text("partition_rows: 2\n")
    dedup(folder, "--out", tmp_path / "a", *FLAGS)
    dedup(folder, "--out", tmp_path / "b", *FLAGS, "--config", small)
    dedup(folder, "--out", tmp_path / "c", "--signals", "exact,phash,views", "--workers", "1")
    expected = local_outputs(tmp_path / "a")
    assert local_outputs(tmp_path / "b") == expected
    assert local_outputs(tmp_path / "c") == expected


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Three groups of three re-encodes of one picture each, with JSON sidecars: group
    0 scored 1, 5, 3; group 1: one score, one missing field, one NaN; group 2: a string,
    unparseable JSON, no JSON member."""
    root = tmp_path_factory.mktemp("scored")
    members, shards = [], [[], []]
    sidecars = {
        "g0a": b'{"score": 1}',
        "g0b": b'{"score": 5}',
        "g0c": b'{"score": 3}',
        "g1a": b'{"other": 9}',
        "g1b": b'{"score": NaN}',
        "g1c": b'{"score": 0.5}',
        "g2a": b'{"score": "high"}',
        "g2b": b'{"score": ',
        "g2c": None,
    }
    for k, (key, sidecar) in enumerate(sidecars.items()):
        image = textured(400 + int(key[1]))
        members = [(f"{key}.jpg", _jpeg(image, (95, 75, 55)[k % 3]))]  # g*a best by quality
        if sidecar is not None:
            members.append((f"{key}.json", sidecar))
        shards[k % 2] += members
    for n, m in enumerate(shards):
        write_tar(str(root / f"p{n}.tar"), m)
    return root


def test_keep_by_a_json_field(scored, tmp_path):
    result = dedup(scored, "--out", tmp_path / "out", *FLAGS, "--keep-by", "json:score", "--json")
    summary = json.loads(result.stdout)
    samples, clusters = _tables(tmp_path / "out")
    kept = {k for k, r in samples.items() if r["kept"]}
    # the highest score; one numeric among unusable ones; none usable: the keep policy
    assert kept == {"g0b", "g1c", "g2a"}
    assert clusters["g0b"]["kept_by"] == "json:score"
    assert clusters["g0b"]["kept_detail"] == "5 over 3"
    assert clusters["g2a"]["kept_by"] == "quality"
    assert samples["g0b"]["keep_values"] == [5.0]
    assert summary["counts"]["keep_by"] == {
        "json:score": {
            "missing_field": 1,
            "no_json_member": 1,
            "not_a_number": 2,
            "unparseable_json": 1,
        }
    }
    dedup(scored, "--out", tmp_path / "asc", *FLAGS, "--keep-by", "json:score:asc")
    samples, _ = _tables(tmp_path / "asc")
    assert {k for k, r in samples.items() if r["kept"]} == {"g0a", "g1c", "g2a"}


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--keep", "biggest"], "unknown criterion 'biggest'"),
        (["--keep", "first,first"], "listed twice"),
        (["--keep-by", "json"], "not json:FIELD"),
        (["--keep-by", "yaml:score"], "not json:FIELD"),
        (["--keep-by", "json:score:up"], "asc or desc"),
    ],
)
def test_bad_keep_specs_are_one_line_errors(scored, tmp_path, flags, words):
    result = dedup(scored, "--out", tmp_path / "out", *flags, check=2)
    assert words in error_line(result)
    assert not (tmp_path / "out").exists()


def test_typical_is_how_far_a_tone_lies_from_the_whole_frame_links():
    # 0: the original; 1: a brighter copy; 2: a re-encode; 3: a letterboxed copy the
    # views link (bars move the tone: not compared)
    edges = Edges.concat(
        [Edges.of([0, 0, 1], [1, 2, 2], [2, 3, 4], PHASH), Edges.of([0], [3], [5], VIEWS)]
    )
    tone = np.array([[120, 40], [150, 48], [120.3, 40.2], [100, 30]], dtype=np.float32)
    degree, distance, odd = link_degree(edges, 4, tone)
    assert degree.tolist() == [3, 2, 2, 1]
    # |tone - median of the whole-frame component| summed, in steps of 2 grey levels:
    # the median is (120.3, 40.2); the brighter copy is 29.7 + 7.8 = 37.5 levels off
    assert odd.tolist() == [0, 18, 0, 0]
    n = 4
    cand = Candidates(
        pixels=np.full(n, 100), nbytes=np.full(n, 10), digest=np.zeros((n, 32), np.uint8),
        phash=None, tone=tone, noise=np.array([2.0, 2.0, 2.5, 1.0], np.float32),
    )  # fmt: skip
    ranking = rank(cand, Config(keep=("typical", "noise", "first")), (degree, distance, odd))
    order = ranking.lexsort([], np.arange(n))
    assert order.tolist() == [3, 0, 2, 1]  # no aligned link ranks as typical


def test_typical_is_not_pulled_off_the_original_by_its_other_copies():
    # 0: the original; 1: a darkened copy and 2: a noisy copy (noise x5 in the tone), each
    # linked to the original alone. The mean of the original's neighbours lies between
    # them (19 levels off) while the noisy copy's lies on the original (5.5 off): the
    # component's median is the original's tone.
    edges = Edges.of([0, 0], [1, 2], [6, 2], PHASH)
    tone = np.array([[100, 40, 20], [75, 30, 21], [100.5, 41, 24]], dtype=np.float32)
    assert link_degree(edges, 3, tone)[2].tolist() == [0, 17, 2]
    # a pair: both lie half their difference from the mean of the two, equally off
    pair = link_degree(Edges.of([0], [1], [2], PHASH), 2, tone[[0, 2]])[2]
    assert pair.tolist() == [1, 1]
    # two components apart: each its own median; a row linked by the views alone is 0
    edges = Edges.concat([Edges.of([0, 2], [1, 3], [2, 2], PHASH), Edges.of([0], [4], [3], VIEWS)])
    tone = np.array([[10, 1], [10, 1], [50, 5], [60, 5], [99, 9]], dtype=np.float32)
    assert link_degree(edges, 5, tone)[2].tolist() == [0, 0, 2, 2, 0]


def test_typical_counts_view_links_of_padded_copies_not_of_crops():
    # 0: the original; 1: a saturation copy (pHash); 2: a letterboxed copy and 3: a
    # captioned one (views; their tone measured inside the picture: the original's);
    # 4: a crop (views; another part's tone). Without the padded copies the pair 0-1
    # would tie; with them the median is the original's tone; the crop stays out.
    edges = Edges.concat(
        [Edges.of([0], [1], [4], PHASH), Edges.of([0, 0, 0], [2, 3, 4], [3, 3, 3], VIEWS)]
    )
    tone = np.array(
        [[100, 40, 20], [100, 40, 28], [100.5, 40, 20], [99.5, 40.5, 20], [60, 30, 28]], np.float32
    )
    overlay = np.array([0, 0, BARS, BARS | CAPTION, 0], np.int8)
    assert link_degree(edges, 5, tone, overlay)[2].tolist() == [0, 4, 0, 0, 0]
    assert link_degree(edges, 5, tone)[2].tolist() == [2, 2, 0, 0, 0]


def test_typical_compares_the_noise_at_its_own_scale():
    # 0: the original; 1: a noisy copy (noise x5 in the tone: 2 levels more); 2 and 3:
    # thumbnails, their noise measured on a draft that holds the picture in fewer pixels
    # (higher: more detail per pixel). Over the whole component the noise's median (71)
    # lies between the thumbnails and the noisy copy, which is nearer it than the
    # original (9 against 11 levels); at their own scale the original and the noisy copy
    # are equally off (the pair's mean, 1 level), as are the thumbnails (2 levels).
    edges = Edges.of([0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3], [4, 6, 6, 8, 8, 2], PHASH)
    tone = np.array([[100, 40, 60], [100, 40, 62], [100, 40, 80], [100, 40, 84]], np.float32)
    assert link_degree(edges, 4, tone)[2].tolist() == [5, 4, 4, 6]
    scale = np.array([150, 150, 120, 120])
    assert link_degree(edges, 4, tone, None, scale)[2].tolist() == [0, 0, 1, 1]
    # a third row at the original's scale (a re-encode): the noisy copy is the odd one
    tone = np.vstack([tone, [[100, 40, 60.4]]]).astype(np.float32)
    edges = Edges.concat([edges, Edges.of([0, 1], [4, 4], [1, 4], PHASH)])
    scale = np.array([150, 150, 120, 120, 150])
    assert link_degree(edges, 5, tone, None, scale)[2].tolist() == [0, 0, 1, 1, 0]
    tone[1, 2] = 70  # 9.6 levels over the re-encode's: 4 steps of 2
    assert link_degree(edges, 5, tone, None, scale)[2].tolist() == [0, 4, 1, 1, 0]


def test_hub_compares_mean_distances_in_steps_of_four_bits():
    # rows 0-2 alike in links; mean distances 5.0, 7.9 and 8.0 bits: 0 and 1 tie on the
    # hub (steps 4-7), so `typical` decides between them; 2 (8-11) ranks after both
    n = 3
    cand = Candidates(
        pixels=np.full(n, 100), nbytes=np.full(n, 10), digest=np.zeros((n, 32), np.uint8),
        phash=None,
    )  # fmt: skip
    links = (np.full(n, 3), np.array([5.0, 7.9, 8.0]), np.array([1, 0, 0]))
    ranking = rank(cand, Config(keep=("hub", "typical", "first")), links)
    assert ranking.lexsort([], np.arange(n)).tolist() == [1, 0, 2]
    # the report names both: the links, then the step of the mean distance
    shown = [describe_value("hub", v) for v in ranking.values[0].tolist()]
    assert shown == ["3 links, 4-8 bits away", "3 links, 4-8 bits away", "3 links, 8-12 bits away"]


def test_a_contrast_edit_is_the_odd_one_out(tmp_path):
    """An original, a copy of higher contrast and a re-encode, all of one pHash and one
    quality tier, the copies first in the input. The contrast edit measures less noise
    than the original, so without `typical` it survives; with it (the default) its tone
    lies furthest from the others' and the original survives."""
    image = textured(450)
    contrast = ImageEnhance.Contrast(image).enhance(1.3)
    copies = [("b.jpg", _jpeg(contrast, 95)), ("r.jpg", _jpeg(image, 88))]
    write_tar(str(tmp_path / "a.tar"), copies)
    write_tar(str(tmp_path / "b.tar"), [("o.jpg", _jpeg(image, 92))])
    dedup(tmp_path, "--out", tmp_path / "out", *FLAGS)
    samples, clusters = _tables(tmp_path / "out")
    assert {k: r["duplicate_of"] for k, r in samples.items() if not r["kept"]} == {
        "b": "o",
        "r": "o",
    }
    assert clusters["o"]["kept_by"] == "noise"  # over the runner-up, the re-encode
    assert samples["b"]["noise"] < samples["o"]["noise"] < samples["r"]["noise"]
    without = ("--keep", "clean,content,quality,hub,noise,first")
    dedup(tmp_path, "--out", tmp_path / "without", *FLAGS, *without)
    samples, clusters = _tables(tmp_path / "without")
    assert {k for k, r in samples.items() if r["kept"]} == {"b"}


def test_a_saturation_edit_is_the_odd_one_out_by_its_colour(tmp_path):
    """A saturation edit leaves the grey levels as they were (Pillow blends with the
    picture's own grey): only the chroma tells it from its original and a re-encode.
    It comes first in the input, so `first` alone keeps it; `typical` does not."""
    image = textured(451)
    vivid = ImageEnhance.Color(image).enhance(1.3)
    write_tar(str(tmp_path / "a.tar"), [("s.jpg", _jpeg(vivid, 92)), ("r.jpg", _jpeg(image, 90))])
    write_tar(str(tmp_path / "b.tar"), [("o.jpg", _jpeg(image, 92))])
    dedup(tmp_path, "--out", tmp_path / "first", *FLAGS, "--keep", "first")
    samples, _ = _tables(tmp_path / "first")
    assert {k for k, r in samples.items() if r["kept"]} == {"s"}
    dedup(tmp_path, "--out", tmp_path / "typical", *FLAGS, "--keep", "typical,first")
    samples, clusters = _tables(tmp_path / "typical")
    assert {k for k, r in samples.items() if r["kept"]} == {"r"}
    # over the runner-up, the original: as typical as the re-encode, later in the input
    assert clusters["r"]["kept_by"] == "first"
    assert samples["s"]["duplicate_of"] == "r" and samples["o"]["duplicate_of"] == "r"
    # samples.parquet shows why: the grey tone alike, the chroma 30% up
    o, s = samples["o"], samples["s"]
    assert abs(o["level"] - s["level"]) < 1 and abs(o["contrast"] - s["contrast"]) < 1
    assert 1.2 < s["chroma"] / o["chroma"] < 1.4


def test_a_jpeg_stored_in_rgb_is_read_and_matched(tmp_path):
    """A JPEG in RGB (Adobe's transform 0) cannot be drafted in YCbCr: it is read as
    before (its grey draft) with its colours apart, found as a copy, never passed
    through as undecodable; two shards, two workers."""
    image = textured(452)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=93, keep_rgb=True)
    write_tar(str(tmp_path / "a.tar"), [("rgb.jpg", buf.getvalue())])
    write_tar(str(tmp_path / "b.tar"), [("copy.jpg", _jpeg(image, 80))])
    result = dedup(tmp_path, "--out", tmp_path / "out", *FLAGS, "--json")
    summary = json.loads(result.stdout)
    assert summary["counts"]["passthrough"] == 0
    samples, _ = _tables(tmp_path / "out")
    assert {k for k, r in samples.items() if r["kept"]} == {"rgb"}
    assert samples["copy"]["duplicate_of"] == "rgb"
    assert samples["rgb"]["chroma"] > 5
