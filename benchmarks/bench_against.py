"""`make bench-against`: matching a run against references at size.

On make bench's web-size set (24,000 images of 512x384 in 24 shards), in one run:
  (a) baseline: `dedup --signals exact,phash`, no references;
  (b) the same `--against` a stored index of 1,000,000 pHash codes: 999,000 codes of real
      photographs' views (benchmarks/scale_codes.py, the codes make bench-scale uses) and
      1,000 planted from the input (500 with the digest and code of an input image, 500
      with its code 3 bits away and another digest). The index's feature files are
      written here in the extract phase's format, with the manifest `dedup index` writes:
      a million images cannot be decoded on this machine in a benchmark's time. Every
      planted input image must be removed with reason `reference`;
  (c) `--against` a folder of 10,000 image files: 9,000 new pictures and 1,000 resized
      JPEG copies of input images (decoded and hashed in the run: nothing stored
      beforehand), signals exact,phash; every copied input image must be removed;
  (d) (c) again with the default model-free signals (exact,phash,views, with the
      verification tier), against its own baseline.
Wall time (process start included) and the peak memory of the largest process (GNU time)
for each, and the ratio to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from multiprocessing import get_context

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import build, machine, run_dedup  # noqa: E402

INDEX_CODES = 1_000_000
PLANTED = 1_000
FOLDER_IMAGES = 10_000
ROWS_PER_FILE = 250_000


def feature_file(path: str, keys, digests: np.ndarray, codes: np.ndarray, config) -> None:
    """A feature file as the extract phase writes it (only what matching reads is set:
    status, size, digest, pHash code, detail), with its completion marker."""
    from dedup import signals
    from dedup.engine.featurestore import DONE_SUFFIX, FEATURE_SCHEMA

    n = len(keys)
    given = {
        "index": pa.array(np.arange(n, dtype=np.int64)),
        "key": pa.array(keys, type=pa.string()),
        "status": pa.array(["ok"] * n),
        "width": pa.array(np.full(n, 512, dtype=np.int32)),
        "height": pa.array(np.full(n, 384, dtype=np.int32)),
        "bytes": pa.array(np.full(n, 50_000, dtype=np.int64)),
        "digest": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(32), n, [None, pa.py_buffer(np.ascontiguousarray(digests).tobytes())]
        ),
        "phash": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(8), n, [None, pa.py_buffer(codes.astype(">u8").tobytes())]
        ),
        "detail": pa.array(np.full(n, 64, dtype=np.int16)),
    }
    table = pa.table(
        {f.name: given.get(f.name, pa.nulls(n, f.type)) for f in FEATURE_SCHEMA},
        schema=FEATURE_SCHEMA,
    )
    pq.write_table(table, path, write_page_checksum=True)
    with open(path, "rb") as fh:
        digest = blake3.blake3(fh.read()).hexdigest()
    marker = {
        "fingerprint": json.dumps({"config": signals.feature_fingerprint(config), "clip": None}),
        "rows": n,
        "skipped_members": {},
        "blake3": digest,
    }
    with open(path + DONE_SUFFIX, "w") as fh:
        json.dump(marker, fh)


def make_index(root: str, baseline_report: str, data: str) -> set[str]:
    """The 1,000,000-code index under root; returns the planted input keys."""
    from scale_codes import realistic_codes

    from dedup import signals
    from dedup.core.config import Config
    from dedup.engine.references import INDEX_FILE, INDEX_FORMAT
    from dedup.report.tables import package_versions

    config = Config(signals=("exact", "phash"))
    codes_path = os.path.join(data, "codes", "realistic-v1-n1000000-s0.npy")
    if os.path.exists(codes_path):
        background = np.load(codes_path)[: INDEX_CODES - PLANTED]
    else:
        background = realistic_codes(INDEX_CODES)[: INDEX_CODES - PLANTED]
    background = np.asarray(background).view(">u8").reshape(-1).astype(np.uint64)
    samples = pq.read_table(baseline_report + "/samples.parquet").to_pylist()
    rng = np.random.default_rng(3)
    usable = [r for r in samples if r["kept"] and r["phash"] and r["reason"] == "unique"]
    chosen = [usable[i] for i in sorted(rng.choice(len(usable), PLANTED, replace=False))]
    p_codes = np.array([int(r["phash"], 16) for r in chosen], dtype=np.uint64)
    p_digests = np.array([np.frombuffer(bytes.fromhex(r["digest"]), np.uint8) for r in chosen])
    near = np.arange(PLANTED) >= PLANTED // 2  # the second half: 3 bits off, other bytes
    for k in np.flatnonzero(near):
        for bit in rng.choice(64, 3, replace=False):
            p_codes[k] ^= np.uint64(1) << np.uint64(int(bit))
        p_digests[k] = rng.integers(0, 256, 32, dtype=np.uint8)
    codes = np.concatenate([background, p_codes])
    digests = np.concatenate(
        [rng.integers(0, 256, (len(background), 32), dtype=np.uint8), p_digests]
    )
    os.makedirs(os.path.join(root, "features"), exist_ok=True)
    sources = []
    for n, start in enumerate(range(0, len(codes), ROWS_PER_FILE)):
        stop = min(start + ROWS_PER_FILE, len(codes))
        path = os.path.join(root, "features", f"{n:06d}.parquet")
        keys = [f"item{i:07d}" for i in range(start, stop)]
        feature_file(path, keys, digests[start:stop], codes[start:stop], config)
        sources.append(
            {
                "reference": "earlier-crawl",
                "kind": "shard",
                "shard": f"earlier-crawl/part-{n:03d}.tar",
                "location": None,
                "features": os.path.relpath(path, root),
                "rows": stop - start,
                "only": None,
            }
        )
    manifest = {
        "format": INDEX_FORMAT,
        "tool": "dedup",
        "feature_fingerprint": signals.feature_fingerprint(config),
        "clip": None,
        "config": config.to_dict(),
        "versions": package_versions(),
        "references": ["earlier-crawl"],
        "items": len(codes),
        "sources": sources,
    }
    with open(os.path.join(root, INDEX_FILE), "w") as fh:
        json.dump(manifest, fh)
    return {r["key"] for r in chosen}


def _folder_image(args):
    from dedup.synth import encode, make_image

    folder, k = args
    sub = os.path.join(folder, f"{k // 1000:02d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"new-{k:05d}.jpg"), "wb") as fh:
        fh.write(encode(make_image(7_000_000 + k, 512, 384), "JPEG", quality=85))


def make_folder(root: str, images_dir: str, baseline_report: str) -> set[str]:
    """9,000 new pictures and 1,000 resized copies of input images; returns their keys."""
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    with get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_folder_image, [(root, k) for k in range(FOLDER_IMAGES - PLANTED)], chunksize=50)
    samples = pq.read_table(baseline_report + "/samples.parquet").to_pylist()
    rng = np.random.default_rng(4)
    usable = [r for r in samples if r["kept"] and r["reason"] == "unique"]
    chosen = [usable[i] for i in sorted(rng.choice(len(usable), PLANTED, replace=False))]
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
    args = ap.parse_args()
    print(f"machine: {machine()}")
    small = os.path.join(args.data, "small")
    build(small, 24_000, 1000, 512, 384)
    shards = [os.path.join(small, "shards")]
    work = os.path.join(args.data, "against")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    hashes = ("--signals", "exact,phash")

    t, rss, s = run_dedup(shards, out, hashes)
    base = (t, rss)
    print(line("(a) 24,000 images, exact,phash", t, rss, None), flush=True)
    report = os.path.join(out, "dedup-report")
    index = os.path.join(work, "index")
    shutil.rmtree(index, ignore_errors=True)
    t0 = time.perf_counter()
    planted = make_index(index, report, args.data)
    print(f"  index of {INDEX_CODES:,} codes written in {time.perf_counter() - t0:.0f} s")
    folder = os.path.join(work, "folder")
    t0 = time.perf_counter()
    copied = make_folder(folder, os.path.join(small, "images"), report)
    print(f"  folder of {FOLDER_IMAGES:,} images written in {time.perf_counter() - t0:.0f} s")

    matched(
        f"(b) against a {INDEX_CODES:,}-code index",
        shards,
        out + "-index",
        (*hashes, "--against", index),
        base,
        planted,
        "planted",
    )
    matched(
        f"(c) against a folder of {FOLDER_IMAGES:,} images",
        shards,
        out + "-folder",
        (*hashes, "--against", folder),
        base,
        copied,
        "copies",
    )
    views = ("--signals", "exact,phash,views")
    t, rss, _ = run_dedup(shards, out + "-views", views)
    print(line("(d0) 24,000 images, exact,phash,views", t, rss, None), flush=True)
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
