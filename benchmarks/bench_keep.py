"""Which copy survives: for each keep policy, whether the sample dedup keeps of a
duplicate group is the original picture (or a lossless copy of it) or a web-style copy.
A cleaned training set is its survivors: they should be the originals, not padded,
captioned, screenshot, watermarked, noisy or smaller copies.

Built once under bench-data/bench-keep/ (`--rebuild` redoes it): `--originals` (60) and
`--distractors` (60, without copies) pictures of the bench extra's photographs, cut as
the edit suite cuts them (`scale_codes._photo_files`, `edit_suite._grid`, near-flat
tiles left out), resized to a long side of 480-800 px and stored as JPEG q88-95 (drawn
per picture). Each original gets 2-4 copies of distinct kinds (the kinds with the
fewest copies so far, so all get about as many), parameters drawn per copy (seeded, in
its sidecar), JPEG q85-95 unless said: reencode (q30-70), resize (40-80% of each side),
thumbnail (long side 128-200), png (the decoded pixels, lossless: a correct survivor),
border (3-10% of each side), letterbox / pillarbox (dark or light bars, 8-20% of the
height / width each), caption (an added band of 8-18% of the height, top or bottom,
with text), letterbox_caption (the text in the lower bar), watermark (semi-transparent
text or logo in a corner, 15-30% of the width), screenshot (scaled into a fake app
window 1.3-1.6x its size), noise (sigma 4-12), colour (brightness, contrast or
saturation 15-35%), crop (75-90% of each side, off-centre). All samples are shuffled
into 4 shards under opaque keys (s000123): a .jpg or .png and a .json sidecar
{"group", "kind", "params"}.

For each policy of `--policies` (verbatim `--keep` values separated by ';', default
'largest;first;clean,content,quality,hub,typical,noise,first': the old rule, input
order and the default): `dedup SHARDS --out OUT --keep POLICY --signals
exact,phash,views --workers 2 --json -q`, scored from its samples.parquet:

- **original kept**: of the groups (original + copies) that lost a member, the share
  whose kept members include the original or its png copy (a group with nothing
  removed is a recall miss, not counted); per kind, over the groups holding that kind;
  **kept over the original**: of the groups not so counted, the kind of the survivor the
  original was removed for (the keep rule's choice; detached copies are counted apart);
- **detached**: copies kept while their original was removed for another member;
- **pair recall**: removed members whose duplicate_of is in their own group, of all
  members but one per group; **precision**: the same of all removed samples;
- the wall time and extract seconds of each run.

Tables to stdout, figures to bench-data/bench-keep.json. `--seed N` draws other
pictures, copies and parameters (a held-out set) under bench-data/bench-keep-seedN/.
`--smoke`: 10 originals and 6 distractors from three photographs (synthetic pictures
without the bench extra), in a temporary folder (tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from edit_suite import Picture, _cut, _fit_long_side, _grid, _low_detail, _round_robin  # noqa: E402
from scale_codes import _photo_files  # noqa: E402  (the bundled photographs)

from dedup.engine.edits import draw_text, ink_for, padded, random_colour  # noqa: E402
from dedup.synth import PlantedSample, make_image, write_shards  # noqa: E402

DEDUP = os.path.join(os.path.dirname(sys.executable), "dedup")
VERSION = "v1"  # bump when the built data changes
SHARDS = 4
KINDS = ("reencode", "resize", "thumbnail", "png", "border", "letterbox", "pillarbox", "caption",
         "letterbox_caption", "watermark", "screenshot", "noise", "colour", "crop")  # fmt: skip
LOSSLESS = ("original", "png")  # a correct survivor
FIELDS = ("copies", "found", "groups", "original_kept", "kept_over_original", "detached")
TEXTS = ("Breaking: the view from the scene", "Exclusive pictures, all rights reserved",
         "Weekend special: our readers' shots", "Photo of the day", "Follow us")  # fmt: skip
UI_LABELS = ("File", "Edit", "View", "Share", "Download", "Gallery", "Home", "Settings")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.convert(img.mode if img.mode in ("L", "RGB") else "RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def pictures(n: int, smoke: bool, rng: np.random.Generator) -> list[Picture]:
    """n distinct pictures (JPEG bytes in .data), drawn round-robin over the photographs."""
    try:
        photos = _photo_files()[: 3 if smoke else None]
    except ImportError as e:
        if not smoke:
            sys.exit(f"bench_keep: the photographs need the bench extra ({e}): make bench-keep")
        print(f"--smoke: synthetic pictures stand in for the photographs ({e}; the bench extra)")
        photos = [(f"synth/{k}", lambda k=k: make_image(900 + k, 1200, 900)) for k in range(3)]
    pool = []
    for name, load in photos:
        photo = load()
        colour = photo.mode not in ("L", "I", "I;16", "F")
        photo = photo.convert("RGB" if colour else "L")
        cols, rows = _grid(*photo.size)
        for k in range(cols * rows):
            c, r = k % cols, k // cols
            rect = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            long_side, quality = int(rng.integers(480, 801)), int(rng.integers(88, 96))
            data = _jpeg(_fit_long_side(_cut(photo, rect), long_side), quality)
            if not name.startswith("synth/") and _low_detail(data):
                continue  # near-flat tiles look alike: not what this measures
            pool.append(Picture(-1, f"{name}:{k}:q{quality}", name, rect, long_side, data=data))
    return _round_robin(pool, n, rng)


# ------------------------------------------------------------------ copies


def _bars(img, rng, p, vertical: bool) -> Image.Image:
    p["tone"] = ("dark", "light")[int(rng.integers(2))]
    p["colour"] = random_colour(rng, p["tone"])
    p["share"] = round(float(rng.uniform(0.08, 0.20)), 3)
    pad = round((img.height if vertical else img.width) * p["share"])
    return padded(img, *((0, pad, 0, pad) if vertical else (pad, 0, pad, 0)), p["colour"])


def _caption(img, rng, p, letterbox: bool) -> Image.Image:
    p["text"] = TEXTS[int(rng.integers(len(TEXTS)))]
    if letterbox:
        out = _bars(img, rng, p, vertical=True)
        band = (0, out.height - round(img.height * p["share"]), out.width, out.height)
    else:
        p["colour"], p["share"] = random_colour(rng), round(float(rng.uniform(0.08, 0.18)), 3)
        p["at"], h = ("top", "bottom")[int(rng.integers(2))], round(img.height * p["share"])
        top = p["at"] == "top"
        out = padded(img, 0, h if top else 0, 0, 0 if top else h, p["colour"])
        band = (0, 0, out.width, h) if top else (0, img.height, out.width, out.height)
    p["font_size"] = draw_text(ImageDraw.Draw(out), band, p["text"], ink_for(p["colour"]), 0.5)
    return out


def _watermark(img, rng, p) -> Image.Image:
    p["mark"] = str(rng.choice(["text", "logo"]))
    p["corner"] = str(rng.choice(["tl", "tr", "bl", "br"]))
    p["width_share"] = round(float(rng.uniform(0.15, 0.30)), 3)
    p["opacity"] = round(float(rng.uniform(0.35, 0.7)), 3)
    w = round(img.width * p["width_share"])
    h = max(8, round(w * (0.22 if p["mark"] == "text" else 0.45)))
    mark = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw, white = ImageDraw.Draw(mark), (255, 255, 255, round(255 * p["opacity"]))
    if p["mark"] == "text":
        draw_text(draw, (0, 0, w, h), "\u00a9 stock.example", white, 0.9)
    else:  # a ring with a letter in it, and a word beside it
        draw.ellipse((2, 2, h - 2, h - 2), outline=white, width=max(2, h // 10))
        draw_text(draw, (h * 0.25, 0, h, h * 0.9), "P", white)
        draw_text(draw, (h, 0, w, h), "photonews", white, 0.5)
    m, base = round(min(img.size) * 0.03), img.convert("RGBA")
    x = m if p["corner"][1] == "l" else img.width - w - m
    base.alpha_composite(mark, (x, m if p["corner"][0] == "t" else img.height - h - m))
    return base.convert("RGB")


def _screenshot(img, rng, p) -> Image.Image:
    """The picture scaled into a fake app window 1.3-1.6x its size in each dimension."""
    p["scale"] = round(float(rng.uniform(0.7, 1)), 3)
    p["theme"] = str(rng.choice(["dark", "light"]))
    pic = _scaled(img, p["scale"])
    width, height = (round(s * float(rng.uniform(1.3, 1.6))) for s in pic.size)
    p["window"], p["status_bar"] = [width, height], bool(rng.random() < 0.5)
    margin, bar = random_colour(rng, p["theme"]), random_colour(rng, p["theme"])
    extra = height - pic.height
    bottom = round(extra * (rng.uniform(0.15, 0.3) if p["status_bar"] else rng.uniform(0, 0.15)))
    top, left = extra - bottom, round((width - pic.width) * rng.uniform(0.2, 0.8))
    canvas = Image.new("RGB", (width, height), margin)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, top), fill=bar)
    row = max(10, top // 3)  # window buttons and a title, then labels and buttons
    for k in range(3):
        x = 8 + k * row * 0.7
        draw.ellipse((x, row * 0.3, x + row * 0.45, row * 0.75), fill=random_colour(rng))
    draw_text(draw, (row * 2.5, 0, width * 0.7, row), str(rng.choice(TEXTS)), ink_for(bar))
    labels = rng.choice(UI_LABELS, int(rng.integers(3, 6)), replace=False)
    slot = min(row * 3, width * 0.6 / len(labels))  # labels on the left 60%, buttons right
    for k, label in enumerate(labels):
        draw_text(draw, (k * slot, row, (k + 1) * slot, 2 * row), str(label), ink_for(bar))
    buttons = int(rng.integers(2, 5))
    slot = min(row * 1.6, width * 0.35 / buttons)
    for k in range(buttons):
        x = width - (k + 1) * slot
        draw.rectangle((x, row * 1.2, x + slot * 0.75, row * 1.8), fill=random_colour(rng))
    if p["status_bar"]:
        draw.rectangle((0, height - bottom, width, height), fill=bar)
        draw_text(draw, (0, height - bottom, width * 0.6, height), "Ready  |  100%", ink_for(bar))
    canvas.paste(pic, (left, top))
    return canvas


def _scaled(img, factor: float) -> Image.Image:
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _edit(kind: str, img: Image.Image, rng: np.random.Generator, p: dict) -> Image.Image:
    """The kind's edit of an RGB picture; what it draws goes into p."""
    if kind == "resize":
        return _scaled(img, p.setdefault("factor", round(float(rng.uniform(0.4, 0.8)), 3)))
    if kind == "thumbnail":
        return _fit_long_side(img, p.setdefault("long_side", int(rng.integers(128, 201))))
    if kind == "border":
        p["colour"], p["share"] = random_colour(rng), round(float(rng.uniform(0.03, 0.10)), 3)
        dx, dy = round(img.width * p["share"]), round(img.height * p["share"])
        return padded(img, dx, dy, dx, dy, p["colour"])
    if kind in ("letterbox", "pillarbox"):
        return _bars(img, rng, p, vertical=kind == "letterbox")
    if kind in ("caption", "letterbox_caption"):
        return _caption(img, rng, p, letterbox=kind == "letterbox_caption")
    if kind == "noise":
        p["sigma"] = round(float(rng.uniform(4, 12)), 2)
        arr = np.asarray(img, np.float32) + rng.normal(0, p["sigma"], (img.height, img.width, 3))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    if kind == "colour":
        p["what"] = str(rng.choice(["brightness", "contrast", "saturation"]))
        p["factor"] = round(1 + float(rng.choice((-1, 1)) * rng.uniform(0.15, 0.35)), 3)
        enhance = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast}
        return enhance.get(p["what"], ImageEnhance.Color)(img).enhance(p["factor"])
    if kind == "crop":  # off-centre: in the first or last 30% of the slack, per axis
        cw, ch = (round(s * float(rng.uniform(0.75, 0.90))) for s in img.size)
        at = [rng.uniform(0, 0.3) if rng.random() < 0.5 else rng.uniform(0.7, 1) for _ in "xy"]
        x, y = round((img.width - cw) * at[0]), round((img.height - ch) * at[1])
        p["box"] = [x, y, x + cw, y + ch]
        return img.crop(p["box"])
    return {"watermark": _watermark, "screenshot": _screenshot}[kind](img, rng, p)


def make_copy(kind: str, original: bytes, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """(bytes, extension, drawn parameters) of one copy of the original JPEG."""
    img = Image.open(io.BytesIO(original))
    img.load()
    if kind == "png":  # the decoded pixels, lossless
        out = io.BytesIO()
        img.save(out, "PNG")
        return out.getvalue(), "png", {}
    p: dict = {}
    if kind == "reencode":
        p["quality"] = int(rng.integers(30, 71))
        return _jpeg(img.convert("RGB"), p["quality"]), "jpg", p
    edited = _edit(kind, img.convert("RGB"), rng, p)
    p["quality"] = int(rng.integers(85, 96))
    return _jpeg(edited, p["quality"]), "jpg", p


# ------------------------------------------------------------------ data, runs, scores


def build(data: str, n_originals: int, n_distractors: int, smoke: bool, seed: int) -> dict:
    """Pictures, copies and shards under data/; returns the ground truth by key."""
    pics = pictures(n_originals + n_distractors, smoke, np.random.default_rng(seed))
    plan = np.random.default_rng([seed, 1])  # apart from the pictures': counts stay fixed
    rows, load = [], Counter()
    for g, pic in enumerate(pics):
        size = list(Image.open(io.BytesIO(pic.data)).size)
        role = "original" if g < n_originals else "distractor"
        rows.append((g, role, pic.data, "jpg", {"picture": pic.name, "size": size}))
        kinds: list[str] = []
        for _ in range(int(plan.integers(2, 5)) if role == "original" else 0):
            free = [k for k in KINDS if k not in kinds]
            ties = [k for k in free if load[k] == min(load[k] for k in free)]
            kinds.append(ties[int(plan.integers(len(ties)))])
            load[kinds[-1]] += 1
        for j, kind in enumerate(kinds):  # each copy its own generator
            rows.append((g, kind, *make_copy(kind, pic.data, np.random.default_rng([seed, g, j]))))
    truth, samples = {}, []
    for i, pos in enumerate(plan.permutation(len(rows))):
        g, kind, body, ext, params = rows[pos]
        key = f"s{i:06d}"
        truth[key] = {"group": g, "kind": kind}
        sidecar = json.dumps({"group": g, "kind": kind, "params": params}).encode()
        samples.append(PlantedSample(key, {ext: body, "json": sidecar}, g, kind))
    shutil.rmtree(os.path.join(data, "shards"), ignore_errors=True)
    write_shards(samples, os.path.join(data, "shards"), math.ceil(len(rows) / SHARDS), "keep")
    return truth


def load_or_build(data: str, opts) -> tuple[dict, bool]:
    params = {"version": VERSION, "originals": opts.originals, "distractors": opts.distractors}
    if opts.seed:
        params["seed"] = opts.seed
    path = os.path.join(data, "truth.json")
    if not opts.rebuild and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["params"] == params and os.path.isdir(os.path.join(data, "shards")):
            return cached["samples"], False
    os.makedirs(data, exist_ok=True)
    truth = build(data, opts.originals, opts.distractors, opts.smoke, opts.seed)
    with open(path, "w") as f:
        json.dump({"params": params, "samples": truth}, f)
    return truth, True


def run(policy: str, data: str) -> dict:
    out = os.path.join(data, "runs", re.sub(r"[^A-Za-z0-9]+", "-", policy))
    shutil.rmtree(out, ignore_errors=True)  # dedup refuses a non-empty OUT it did not write
    shards = os.path.join(data, "shards")
    cmd = [DEDUP, shards, "--out", out, "--keep", policy, "--signals", "exact,phash,views"]
    cmd += ["--workers", "2", "--json", "-q"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:  # recorded; the other policies still run
        return {"command": cmd, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    extract = summary["phases"]["extract"]["seconds"]
    samples = os.path.join(out, "dedup-report", "samples.parquet")
    return {"command": cmd, "wall_s": round(wall, 2), "extract_s": extract, "samples": samples}


def score(truth: dict, samples_parquet: str) -> dict:
    columns = ["key", "kept", "reason", "duplicate_of", "cluster_id"]
    rows = {r["key"]: r for r in pq.read_table(samples_parquet, columns=columns).to_pylist()}
    members: dict[int, list[str]] = {}
    for key, s in truth.items():
        members.setdefault(s["group"], []).append(key)
    per_kind = {k: Counter() for k in KINDS}
    total, instead = Counter(), Counter()
    for keys in (keys for keys in members.values() if len(keys) > 1):  # not distractors
        kind_of = {k: truth[k]["kind"] for k in keys}
        orig = rows[next(k for k in keys if kind_of[k] == "original")]
        kept = [k for k in keys if rows[k]["kept"]]
        copies = [k for k in keys if k != orig["key"]]
        for k in copies:
            c = per_kind[kind_of[k]]
            c["copies"] += 1
            c["found"] += rows[k]["cluster_id"] == orig["cluster_id"]
            c["detached"] += rows[k]["kept"] and not orig["kept"] and orig["duplicate_of"] != k
        if len(kept) == len(keys):
            total["untouched"] += 1
            continue
        good = any(kind_of[k] in LOSSLESS for k in kept)
        total.update(groups=1, original_kept=good, lost_entirely=not kept)
        for kind in {kind_of[k] for k in copies}:
            per_kind[kind].update(groups=1, original_kept=good)
        if not good:  # the original was removed for: a copy's kind, or another picture
            kind = kind_of.get(orig["duplicate_of"], "another picture")
            instead[kind] += 1
            per_kind.get(kind, Counter())["kept_over_original"] += 1
    removed = [k for k, r in rows.items() if not r["kept"]]
    of = {k: truth.get(rows[k]["duplicate_of"], {}).get("group") for k in removed}
    in_group = [k for k in removed if of[k] == truth[k]["group"]]
    redundant = sum(len(keys) - 1 for keys in members.values())
    false = Counter(truth[k]["kind"] for k in removed if of[k] != truth[k]["group"])
    return {
        "per_kind": {k: {n: int(c[n]) for n in FIELDS} for k, c in per_kind.items()},
        **{k: int(total[k]) for k in ("groups", "original_kept", "untouched", "lost_entirely")},
        "kept_over_original": dict(instead.most_common()),
        "detached": sum(int(c["detached"]) for c in per_kind.values()),
        "removed": len(removed),
        "removed_in_own_group": len(in_group),
        "redundant_members": redundant,
        "pair_recall": len(in_group) / redundant if redundant else None,
        "precision": len(in_group) / len(removed) if removed else None,
        "false_removals_by_kind": dict(false),
        "reasons": dict(Counter(r["reason"] for r in rows.values())),
    }


def _share(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "-"


def print_policy(policy: str, r: dict) -> None:
    s = r["score"]
    print(f"\n== keep {policy}: {r['wall_s']:.1f} s wall, extract {r['extract_s']:.1f} s\n")
    print(
        "| kind | copies | found (cluster of the original) | groups that lost a member "
        "| original kept | kept over the original | detached |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, c in s["per_kind"].items():
        found, kept = _share(c["found"], c["copies"]), _share(c["original_kept"], c["groups"])
        print(
            f"| {kind} | {c['copies']} | {found} | {c['groups']} | {kept} "
            f"| {c['kept_over_original']} | {c['detached']} |"
        )
    print(
        f"\noriginal kept: {_share(s['original_kept'], s['groups'])} groups that lost a member "
        f"({s['untouched']} groups untouched, {s['lost_entirely']} lost entirely)"
    )
    instead = ", ".join(f"{k} {n}" for k, n in s["kept_over_original"].items()) or "none"
    print(f"kept over the original: {instead}")
    print(f"detached copies: {s['detached']}")
    print(
        f"pair recall: {_share(s['removed_in_own_group'], s['redundant_members'])}; precision: "
        f"{_share(s['removed_in_own_group'], s['removed'])}; false removals: "
        f"{s['false_removals_by_kind'] or 'none'}; reasons: {s['reasons']}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--policies",
        default="largest;first;clean,content,quality,hub,typical,noise,first",
        help="--keep values, ';'-separated",
    )
    ap.add_argument("--originals", type=int, default=60, help="pictures that get copies")
    ap.add_argument("--distractors", type=int, default=60, help="pictures without copies")
    ap.add_argument("--rebuild", action="store_true", help="build the data again")
    ap.add_argument(
        "--seed", type=int, default=0, help="another draw of pictures and copies (held out)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in a temporary folder")
    opts = ap.parse_args()
    policies = [p.strip() for p in opts.policies.split(";") if p.strip()]
    root = tempfile.mkdtemp(prefix="bench-keep-") if opts.smoke else "bench-data"
    if opts.smoke:
        opts.originals, opts.distractors = 10, 6
    name = f"bench-keep-seed{opts.seed}" if opts.seed else "bench-keep"
    data, results_path = os.path.join(root, name), os.path.join(root, f"{name}.json")
    try:
        start = time.monotonic()
        truth, built = load_or_build(data, opts)
        n = Counter(s["kind"] for s in truth.values())
        how = f"built in {time.monotonic() - start:.1f} s" if built else "cached"
        print(
            f"{len(truth)} samples in {SHARDS} shards: {n['original']} originals, "
            f"{len(truth) - n['original'] - n['distractor']} copies, {n['distractor']} "
            f"distractors ({data}, {how})\ncopies per kind: "
            + ", ".join(f"{k} {n[k]}" for k in KINDS)
        )
        results = {}
        for policy in policies:
            results[policy] = r = run(policy, data)
            if "error" in r:
                print(f"\n== keep {policy}: failed, {r['error']}")
                continue
            r["score"] = score(truth, r["samples"])
            print_policy(policy, r)
        with open(results_path, "w") as f:
            json.dump({"sizes": dict(n), "policies": results}, f, indent=1)
        print(f"\nresults: {results_path}")
    finally:
        if opts.smoke:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
