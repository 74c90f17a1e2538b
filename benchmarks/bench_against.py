"""`make bench-against`: matching a run against references at size.

On make bench's web-size set (24,000 images of 512x384 in 24 shards), in one run:
  (a) baseline: `dedup --signals exact,phash`, no references;
  (b) the same `--against` a stored index of 1,000,000 pHash codes: 999,000 codes of real
      photographs' views (benchmarks/scale_codes.py, the codes make bench-scale uses) and
      1,000 planted from the input (500 with the digest and code of an input image, 500
      with its code 3 bits away and another digest). The index's feature files and its
      manifest are written here by the writers `dedup index` uses (the feature store's
      and dedup.commands.index.write_manifest; benchmarks/featurefiles.py): a million
      images cannot be decoded on this machine in a benchmark's time. Every planted
      input image must be removed with reason `reference`;
  (c) `--against` a folder of 10,000 image files: 9,000 new pictures and 1,000 resized
      JPEG copies of input images (decoded and hashed in the run: nothing stored
      beforehand), signals exact,phash; every copied input image must be removed;
  (d) (c) again with the default model-free signals (exact,phash,views, with the
      verification tier), against its own baseline.
Wall time (process start included) and the peak memory of the largest process (GNU time)
for each, and the ratio to the baseline of the same run.

`--smoke`: 200 images, an index of 5,000 uniform random codes (20 planted) and a folder
of 60 images (20 copies), in a temporary folder (tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import build, machine, run_dedup  # noqa: E402
from featurefiles import feature_table, fixed_binary, write_feature_file  # noqa: E402
from scale_codes import realistic_codes, uniform_codes  # noqa: E402

from dedup.commands.index import manifest_entry, write_manifest  # noqa: E402
from dedup.core.config import Config  # noqa: E402
from dedup.synth import encode, make_image  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    images: int = 24_000  # the input: make bench's web-size set
    per_shard: int = 1_000
    index_codes: int = 1_000_000
    planted: int = 1_000  # input images planted in the index, and copied into the folder
    folder_images: int = 10_000
    rows_per_file: int = 250_000


SMOKE = Sizes(
    images=200, per_shard=50, index_codes=5_000, planted=20, folder_images=60, rows_per_file=2_000
)


def make_index(root: str, baseline_report: str, sizes: Sizes, background: np.ndarray) -> set[str]:
    """An index of `sizes.index_codes` codes under root: `background` (its first codes)
    and `sizes.planted` from the input. Its feature files and manifest are written by
    dedup's own writers (the feature store's, and `dedup index`'s). Returns the planted
    input keys."""
    config = Config(signals=("exact", "phash"))
    planted = sizes.planted
    background = np.asarray(background[: sizes.index_codes - planted])
    background = background.view(">u8").reshape(-1).astype(np.uint64)
    samples = pq.read_table(baseline_report + "/samples.parquet").to_pylist()
    rng = np.random.default_rng(3)
    usable = [r for r in samples if r["kept"] and r["phash"] and r["reason"] == "unique"]
    chosen = [usable[i] for i in sorted(rng.choice(len(usable), planted, replace=False))]
    p_codes = np.array([int(r["phash"], 16) for r in chosen], dtype=np.uint64)
    p_digests = np.array([np.frombuffer(bytes.fromhex(r["digest"]), np.uint8) for r in chosen])
    near = np.arange(planted) >= planted // 2  # the second half: 3 bits off, other bytes
    for k in np.flatnonzero(near):
        for bit in rng.choice(64, 3, replace=False):
            p_codes[k] ^= np.uint64(1) << np.uint64(int(bit))
        p_digests[k] = rng.integers(0, 256, 32, dtype=np.uint8)
    codes = np.concatenate([background, p_codes]).astype(">u8").view(np.uint8).reshape(-1, 8)
    digests = np.concatenate(
        [rng.integers(0, 256, (len(background), 32), dtype=np.uint8), p_digests]
    )
    os.makedirs(os.path.join(root, "features"), exist_ok=True)
    sources = []
    for n, start in enumerate(range(0, len(codes), sizes.rows_per_file)):
        stop = min(start + sizes.rows_per_file, len(codes))
        rows = stop - start
        path = os.path.join(root, "features", f"{n:06d}.parquet")
        shard = f"earlier-crawl/part-{n:03d}.tar"
        # Only what matching reads is set: status, size, digest, pHash code, detail.
        table = feature_table(
            rows,
            key=[f"item{i:07d}" for i in range(start, stop)],
            width=np.full(rows, 512, dtype=np.int32),
            height=np.full(rows, 384, dtype=np.int32),
            bytes=np.full(rows, 50_000, dtype=np.int64),
            digest=fixed_binary(digests[start:stop]),
            phash=fixed_binary(codes[start:stop]),
            detail=np.full(rows, 64, dtype=np.int16),
        )
        write_feature_file(path, table, shard, config)
        features = os.path.relpath(path, root)
        sources.append(manifest_entry("earlier-crawl", "shard", shard, None, features, rows))
    write_manifest(root, config, None, ["earlier-crawl"], len(codes), sources)
    return {r["key"] for r in chosen}


def _folder_image(args):
    folder, k = args
    sub = os.path.join(folder, f"{k // 1000:02d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"new-{k:05d}.jpg"), "wb") as fh:
        fh.write(encode(make_image(7_000_000 + k, 512, 384), "JPEG", quality=85))


def make_folder(root: str, images_dir: str, baseline_report: str, sizes: Sizes) -> set[str]:
    """New pictures and `sizes.planted` resized copies of input images, `folder_images`
    in all; returns the copied input keys."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    new = [(root, k) for k in range(sizes.folder_images - sizes.planted)]
    with get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_folder_image, new, chunksize=50)
    samples = pq.read_table(baseline_report + "/samples.parquet").to_pylist()
    rng = np.random.default_rng(4)
    usable = [r for r in samples if r["kept"] and r["reason"] == "unique"]
    picks = rng.choice(len(usable), sizes.planted, replace=False)
    chosen = [usable[i] for i in sorted(picks)]
    os.makedirs(os.path.join(root, "copies"))
    for r in chosen:
        img = Image.open(os.path.join(images_dir, f"{r['key']}.jpg")).convert("RGB")
        img.resize((384, 288)).save(os.path.join(root, "copies", f"{r['key']}.jpg"), quality=80)
    return {r["key"] for r in chosen}


def line(name: str, t: float, rss: int, base: tuple[float, int] | None, extra: str = "") -> str:
    ratio = f" ({t / base[0]:.2f}x the baseline's time)" if base else ""
    return f"  {name}: {t:.1f} s, peak {rss / 1024:,.0f} MiB{ratio}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in a temporary folder")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if not args.smoke:
        measure(args.data, Sizes(), realistic=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench-against-smoke-") as data:
        print("--smoke: the index's other codes are uniform random words, not photographs'")
        measure(data, SMOKE, realistic=False)


def measure(data: str, sizes: Sizes, realistic: bool) -> None:
    small = os.path.join(data, "small")
    build(small, sizes.images, sizes.per_shard, 512, 384)
    shards = [os.path.join(small, "shards")]
    work = os.path.join(data, "against")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    hashes = ("--signals", "exact,phash")

    t, rss, s = run_dedup(shards, out, hashes)
    base = (t, rss)
    print(line(f"(a) {sizes.images:,} images, exact,phash", t, rss, None), flush=True)
    report = os.path.join(out, "dedup-report")
    index = os.path.join(work, "index")
    shutil.rmtree(index, ignore_errors=True)
    t0 = time.perf_counter()
    if realistic:  # bench-scale's codes, cached under data/codes
        background = realistic_codes(sizes.index_codes, cache_dir=os.path.join(data, "codes"))
    else:
        background = uniform_codes(sizes.index_codes, seed=5)
    planted = make_index(index, report, sizes, background)
    print(f"  index of {sizes.index_codes:,} codes written in {time.perf_counter() - t0:.0f} s")
    folder = os.path.join(work, "folder")
    t0 = time.perf_counter()
    copied = make_folder(folder, os.path.join(small, "images"), report, sizes)
    print(f"  folder of {sizes.folder_images:,} images written in {time.perf_counter() - t0:.0f} s")

    matched(
        f"(b) against a {sizes.index_codes:,}-code index",
        shards,
        out + "-index",
        (*hashes, "--against", index),
        base,
        planted,
        "planted",
    )
    matched(
        f"(c) against a folder of {sizes.folder_images:,} images",
        shards,
        out + "-folder",
        (*hashes, "--against", folder),
        base,
        copied,
        "copies",
    )
    views = ("--signals", "exact,phash,views")
    t, rss, _ = run_dedup(shards, out + "-views", views)
    print(line(f"(d0) {sizes.images:,} images, exact,phash,views", t, rss, None), flush=True)
    matched(
        "(d) the same against the folder",
        shards,
        out + "-views-folder",
        (*views, "--against", folder),
        (t, rss),
        copied,
        "copies",
    )


def matched(name, shards, out, flags, base, planted: set[str], what: str) -> None:
    """One run against a reference: its time, memory and matches, and how many of the
    planted input keys it removed as copies of a reference item."""
    t, rss, s = run_dedup(shards, out, flags)
    removed = _reference_keys(out)
    ref = s["references"]["against"][0]
    found = f"{len(planted & removed):,} of {len(planted):,}"
    extra = f"; removed {ref['matched']:,} ({ref['matched_by_signal']}); {what} found: {found}"
    print(line(name, t, rss, base, extra), flush=True)


def _reference_keys(out: str) -> set[str]:
    table = pq.read_table(os.path.join(out, "dedup-report", "samples.parquet"))
    return {r["key"] for r in table.to_pylist() if r["reason"] == "reference"}


if __name__ == "__main__":
    main()
