"""`make bench`: dedup's CPU throughput against what the hardware allows, and imagededup.

On one data set (24,000 web-size JPEGs in 96 shards, and 2,400 two-megapixel ones), in
one run:
  (a) decode floor: read every shard and decode every JPEG at 1/8 scale in grayscale,
      on all cores, nothing else (pool start-up excluded);
  (a2) copying the shards once (the kernel's copy, best of three); the limit is the
      images per second of (a) and (a2) one after the other;
  (b) `dedup --signals exact,phash` end to end as a user runs it, process start included,
      as a share of the limit (issue 28's target: 0.80);
  (b2) the views signal's hashes too (`exact,phash,views --no-verify`): what they add;
  (b3) the plain default command, `dedup IN --out OUT` (here: no CLIP weights, so
      exact,phash,views with the verification tier), as a share of the limit (target
      0.55), with the tier's pairs checked and images decoded;
  (c) imagededup's PHash: encode_images + find_duplicates on the images as files (target:
      at least 10 times slower than (b3));
  (d) a plain loop of imagehash.phash over the same files, one process.
Each dedup run's phases are printed with what is left of its wall time: start-up and the
report. Peak memory of (b) at two dataset sizes. Without imagededup (the bench extra;
`make bench` installs it), (c) is skipped with a line saying so.

`--images 240000 --web-only --no-peers --no-memory`: the same ratios at ten times the
size (the same shard size). `--smoke`: 120 and 10 images in a temporary folder
(tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from dedup.io.tarscan import scan
from dedup.synth import PlantedSample, encode, make_image, write_shards

DEDUP = os.path.join(os.path.dirname(sys.executable), "dedup")

# ---------------------------------------------------------------- data


def _shard_samples(args):
    """Samples of one benchmark shard: originals and planted JPEG copies, with captions
    that name the kind of each ("original" or the copy's edit)."""
    shard_no, per_shard, width, height, seed = args
    rng = np.random.default_rng(seed * 1_000_003 + shard_no)
    out = []
    originals = []
    for i in range(per_shard):
        key = f"{shard_no:05d}{i:05d}"
        r = rng.random()
        if originals and r < 0.2:  # a fifth are copies of an earlier picture of this shard
            base = originals[int(rng.integers(len(originals)))]
            kind = ("exact", "reencode", "resize", "brighten", "blur")[int(rng.integers(5))]
            if kind == "exact":
                data = base
            else:
                img = Image.open(io.BytesIO(base)).convert("RGB")
                if kind == "resize":
                    img = img.resize((width * 3 // 4, height * 3 // 4))
                elif kind == "brighten":
                    img = ImageEnhance.Brightness(img).enhance(1.08)
                elif kind == "blur":
                    img = img.filter(ImageFilter.GaussianBlur(1))
                data = encode(img, "JPEG", quality=int(rng.integers(70, 95)))
        else:
            kind = "original"
            data = encode(make_image(int(rng.integers(1 << 62)), width, height), "JPEG", quality=85)
            originals.append(data)
        caption = f"benchmark picture {key} ({kind})"
        out.append((key, data, caption))
    return out


def _write_shard(args) -> tuple[int, int]:
    """Writes one shard (and its JPEGs as files); returns its samples and planted copies."""
    path_dir, shard_no, per_shard, width, height, seed, images_dir = args
    samples = _shard_samples((shard_no, per_shard, width, height, seed))
    planted = [
        PlantedSample(
            key,
            {
                "jpg": data,
                "txt": caption.encode(),
                "json": json.dumps({"caption": caption}).encode(),
            },
            None,
            "",
        )
        for key, data, caption in samples
    ]
    write_shards(planted, path_dir, per_shard, prefix=f"bench-{shard_no:05d}")
    for key, data, _ in samples:
        with open(os.path.join(images_dir, key + ".jpg"), "wb") as fh:
            fh.write(data)
    copies = sum(not caption.endswith("(original)") for _, _, caption in samples)
    return len(samples), copies


def build(
    root: str, images: int, per_shard: int, width: int, height: int, seed: int = 1
) -> int | None:
    """Shards under root/shards and the same JPEGs as files under root/images (cached).
    Returns how many samples are planted copies (None for a set cached before they were
    counted)."""
    stamp = os.path.join(root, "params.json")
    params = {
        "images": images,
        "per_shard": per_shard,
        "size": [width, height],
        "seed": seed,
        "version": 2,
    }
    if os.path.exists(stamp):
        with open(stamp) as fh:
            built = json.load(fh)
        if {k: v for k, v in built.items() if k != "copies"} == params:
            return built.get("copies")
    shutil.rmtree(root, ignore_errors=True)
    shards_dir, images_dir = os.path.join(root, "shards"), os.path.join(root, "images")
    os.makedirs(shards_dir)
    os.makedirs(images_dir)
    n_shards = images // per_shard
    t = time.monotonic()
    jobs = [(shards_dir, s, per_shard, width, height, seed, images_dir) for s in range(n_shards)]
    with get_context("fork").Pool(os.cpu_count()) as pool:
        made, copies = (sum(c) for c in zip(*pool.map(_write_shard, jobs), strict=True))
    # write_shards names files prefix-000000.tar; give them one sortable series.
    for s in range(n_shards):
        os.rename(
            os.path.join(shards_dir, f"bench-{s:05d}-000000.tar"),
            os.path.join(shards_dir, f"bench-{s:05d}.tar"),
        )
    with open(stamp, "w") as fh:
        json.dump({**params, "copies": copies}, fh)
    print(
        f"  built {made:,} samples of {width}x{height} in {n_shards} shards "
        f"({time.monotonic() - t:.0f} s)",
        flush=True,
    )
    return copies


# ---------------------------------------------------------------- (a) decode floor


def _floor_shard(path):
    n = 0
    with open(path, "rb", buffering=1 << 20) as fh:
        size = os.fstat(fh.fileno()).st_size
        jpeg = lambda name: name.endswith(".jpg")  # noqa: E731 - captions are passed over
        for _, _name, _, _, data in scan(fh, path, size, Counter(), jpeg):
            if data is not None:
                img = Image.open(io.BytesIO(data))
                img.draft("L", (img.width // 8, img.height // 8))
                img.load()
                n += 1
    return n


def decode_floor(shards: list[str]) -> tuple[float, int]:
    with get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(abs, range(os.cpu_count() * 4))  # workers up before the clock starts
        t = time.perf_counter()
        n = sum(pool.map(_floor_shard, shards, chunksize=1))
        return time.perf_counter() - t, n


# ---------------------------------------------------------------- (b) dedup


def run_dedup(
    inputs: list[str], out: str, flags: tuple[str, ...] = ("--signals", "exact,phash")
) -> tuple[float, int, dict]:
    """Wall time, peak RSS in KiB (its largest process) and summary of one dedup run.

    The peak comes from GNU time, whose own small process forks dedup: the kernel carries
    a forked child's pre-exec peak over exec, so forking dedup from this (larger) process
    would count this process too.
    """
    shutil.rmtree(out, ignore_errors=True)
    cmd = [DEDUP, *inputs, "--out", out, *flags, "--json", "-q"]
    timed = os.path.exists("/usr/bin/time")
    if timed:
        cmd = ["/usr/bin/time", "-f", "maxrss %M", *cmd]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"dedup failed: {proc.stderr[-2000:]}")
    rss = 0
    if timed:
        rss = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    return elapsed, rss, json.loads(proc.stdout)


# ---------------------------------------------------------------- (c) imagededup, (d) loop


def run_imagededup(images_dir: str, threshold: int) -> tuple[float, int] | None:
    if importlib.util.find_spec("imagededup") is None:
        print("  (c) skipped: imagededup is not installed (the bench extra: `make bench`)")
        return None
    code = (
        "import time, json, logging; logging.disable(logging.WARNING)\n"
        "from imagededup.methods import PHash\n"
        "h = PHash(verbose=False)\n"
        "t = time.perf_counter()\n"
        f"enc = h.encode_images(image_dir={images_dir!r})\n"
        f"dups = h.find_duplicates(encoding_map=enc, max_distance_threshold={threshold})\n"
        "print(json.dumps([time.perf_counter() - t, len(enc), sum(1 for v in dups.values() if v)]))"
    )
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    except OSError:
        return None
    if res.returncode != 0:
        print(f"  imagededup unavailable: {res.stderr.strip().splitlines()[-1:]}")
        return None
    seconds, n, _ = json.loads(res.stdout.strip().splitlines()[-1])
    return seconds, n


def imagehash_loop(images_dir: str, limit: int) -> tuple[float, int]:
    import imagehash
    from PIL import Image

    files = sorted(os.listdir(images_dir))[:limit]
    t = time.perf_counter()
    for name in files:
        imagehash.phash(Image.open(os.path.join(images_dir, name)))
    return time.perf_counter() - t, len(files)


# ---------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def copy_once(shards: list[str], root: str) -> float:
    """Seconds to copy every shard once into a fresh folder (one process, the kernel's
    copy), best of three: the write phase's floor."""
    best = float("inf")
    for _ in range(3):
        target = tempfile.mkdtemp(dir=root)
        t = time.perf_counter()
        for path in shards:
            shutil.copyfile(path, os.path.join(target, os.path.basename(path)))
        best = min(best, time.perf_counter() - t)
        shutil.rmtree(target)
    return best


def bench_set(name, root, images, per_shard, width, height, loop_limit, memory_sizes, peers=True):
    print(
        f"\n== {name}: {images:,} JPEGs of {width}x{height} "
        f"({width * height / 1e6:.1f} MP) with .txt and .json captions, "
        f"{images // per_shard} shards",
        flush=True,
    )
    copies = build(root, images, per_shard, width, height)
    if copies is not None:
        print(f"  planted copies: {copies:,}")
    shards = sorted(
        os.path.join(root, "shards", f) for f in os.listdir(os.path.join(root, "shards"))
    )
    images_dir = os.path.join(root, "images")
    a_s, a_n = decode_floor(shards)
    print(f"  (a) decode floor          {a_n / a_s:>9,.0f} images/s  ({a_s:.2f} s)", flush=True)
    copy_s = copy_once(shards, root)
    limit = a_n / (a_s + copy_s)
    print(f"  (a2) copy once            {copy_s:>9.2f} s (best of 3)")
    print(f"  limit: floor + copy       {limit:>9,.0f} images/s  ({a_s + copy_s:.2f} s)")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        b_s, b_rss, summary = run_dedup(shards, os.path.join(tmp, "out"))
        c = summary["counts"]
        print(
            f"  (b) dedup exact,phash     {c['samples'] / b_s:>9,.0f} images/s  ({b_s:.2f} s; "
            f"removed {c['removed']:,} of {c['samples']:,}) = "
            f"{c['samples'] / b_s / limit:.2f} of the limit (target >= 0.80)",
            flush=True,
        )
        _phases(summary, b_s)
        views_s, _, views = run_dedup(
            shards, os.path.join(tmp, "views"), ("--signals", "exact,phash,views", "--no-verify")
        )
        print(
            f"  (b2) + views, hashes only {c['samples'] / views_s:>8,.0f} images/s  "
            f"({views_s:.2f} s; removed {views['counts']['removed']:,}); "
            f"adds {views_s - b_s:.2f} s = {(views_s - b_s) / a_s:.2f} of the floor's time",
            flush=True,
        )
        verify_s, _, verified = run_dedup(shards, os.path.join(tmp, "verify"), ())
        v = verified["counts"]["verify"]
        print(
            f"  (b3) the default command  {c['samples'] / verify_s:>8,.0f} images/s  "
            f"({verify_s:.2f} s; removed {verified['counts']['removed']:,}; signals "
            f"{','.join(verified['config']['signals'])}) = "
            f"{c['samples'] / verify_s / limit:.2f} of the limit (target >= 0.55); "
            f"checked {v['checked']:,} pairs "
            f"({v['accepted']:,} accepted), "
            f"{v['images_decoded']:,} images decoded "
            f"({v['images_decoded'] / c['samples']:.1%} of all); "
            f"{1000 * v['task_seconds'] / max(v['checked'], 1):.1f} ms per pair, "
            f"{1000 * v['task_seconds'] / max(v['images_decoded'], 1):.1f} ms per image "
            "(task time, summed over workers)",
            flush=True,
        )
        _phases(verified, verify_s)
        mem = []
        for count in memory_sizes:
            _, rss, s = run_dedup(shards[:count], os.path.join(tmp, f"mem{count}"))
            mem.append((count, s["counts"]["samples"], rss))
    cres = run_imagededup(images_dir, 8) if peers else None
    if cres:
        c_s, c_n = cres
        print(f"  (c) imagededup PHash      {c_n / c_s:>9,.0f} images/s  ({c_s:.2f} s)", flush=True)
    elif not peers:
        print("  (c) imagededup: not run (--no-peers)")
    if peers:
        d_s, d_n = imagehash_loop(images_dir, loop_limit)
        print(f"  (d) imagehash.phash loop  {d_n / d_s:>9,.0f} images/s  (first {d_n:,} files)")
    b_rate, a_rate = c["samples"] / b_s, a_n / a_s
    print(f"  b/a = {b_rate / a_rate:.2f}   (exact,phash against the decode floor alone)")
    if cres:
        c_rate = c_n / c_s
        print(
            f"  imagededup takes {b_rate / c_rate:.1f} times as long as dedup exact,phash, "
            f"{c['samples'] / verify_s / c_rate:.1f} times as long as the default command "
            "(target >= 10)"
        )
    for count, samples, rss in mem:
        print(
            f"  peak memory of (b), {count} shards ({samples:,} images): {rss / 1024:.0f} MiB "
            "(largest process)"
        )


def _phases(summary: dict, wall: float) -> None:
    """The run's phases, and what is left of its wall time: start-up and the report."""
    phases = summary["phases"]
    rest = wall - sum(p["seconds"] for p in phases.values())
    print(
        "      phases: "
        + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in phases.items())
        + f"; start-up and report {rest:.2f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--images", type=int, default=24_000)
    ap.add_argument("--per-shard", type=int, default=250, help="images per web-size shard")
    ap.add_argument("--big-images", type=int, default=2_400)
    ap.add_argument(
        "--loop-limit", type=int, default=2_000, help="files for the single-process imagehash loop"
    )
    ap.add_argument("--web-only", action="store_true", help="the web-size set only")
    ap.add_argument(
        "--no-peers", action="store_true", help="leave out imagededup and the imagehash loop"
    )
    ap.add_argument("--no-memory", action="store_true", help="leave out the peak-memory runs")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in a temporary folder")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if not args.smoke:
        measure(
            args.data,
            args.images,
            args.per_shard,
            0 if args.web_only else args.big_images,
            200,
            args.loop_limit,
            not args.no_peers,
            not args.no_memory,
        )
        return
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as data:
        measure(data, 120, 40, 10, 10, 40, True)  # one shard of 2-megapixel images


def measure(
    data: str,
    images: int,
    per: int,
    big: int,
    big_per: int,
    loop_limit: int,
    peers: bool,
    memory: bool = True,
) -> None:
    """Both sets (the 2-megapixel one unless `big` is 0); the peak memory of (b) on half
    the shards and on all of them."""
    small = images // per
    web = "web size" if images == 24_000 else f"web size, {images:,}"
    bench_set(
        web,
        os.path.join(data, "small" if images == 24_000 else f"small-{images}"),
        images,
        per,
        512,
        384,
        loop_limit,
        sorted({max(1, small // 2), small}) if memory else [],
        peers,
    )
    if not big:
        return
    large = big // big_per
    bench_set(
        "2 megapixels",
        os.path.join(data, "big"),
        big,
        big_per,
        1632,
        1224,
        loop_limit // 4,
        sorted({max(1, large // 2), large}) if memory else [],
        peers,
    )


if __name__ == "__main__":
    main()
