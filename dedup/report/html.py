"""report.html: one self-contained page (thumbnails inline, no network, no scripts from
elsewhere) rendered from the report's Parquet files, so `dedup report DIR` can redo it."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.engine.tables import SHOWN_MEMBERS, shown_clusters
from dedup.io.fsutil import write_atomic
from dedup.report.tables import RISK_TIERS, SIZE_TIERS, size_histogram, thresholds_text

PREVIEWS_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("thumbnail", pa.binary()),
        ("caption", pa.string()),
    ]
)
CALIBRATION_SCHEMA = pa.schema(
    [
        ("signal", pa.string()),
        ("side", pa.string()),
        ("value", pa.float64()),
        ("shard_a", pa.string()),
        ("key_a", pa.string()),
        ("shard_b", pa.string()),
        ("key_b", pa.string()),
    ]
)

# The matches with a reference item shown per reference: the input sample beside the item.
MATCHES_SCHEMA = pa.schema(
    [
        ("reference", pa.string()),
        ("side", pa.string()),  # closest or farthest
        ("signal", pa.string()),
        ("phash_distance", pa.int32()),
        ("clip_similarity", pa.float32()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("reference_shard", pa.string()),  # the item's shard (a folder for its files)
        ("reference_item", pa.string()),  # the item's key there
        ("reference_key", pa.string()),  # as in samples.parquet
    ]
)


def risk_tiers(sizes: list[int]) -> list[dict[str, int]]:
    """Clusters with at least 10 and at least 100 copies, and the samples in them."""
    return [
        {
            "min_size": lo,
            "clusters": sum(1 for s in sizes if s >= lo),
            "samples": sum(s for s in sizes if s >= lo),
        }
        for lo in RISK_TIERS
    ]


def _img(thumb: bytes | None, alt: str) -> str:
    if not thumb:
        return f'<div class="noimg" title="{html.escape(alt)}">no preview</div>'
    data = base64.b64encode(thumb).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(alt)}">'


def _histogram_svg(sizes: list[int]) -> str:
    """Cluster sizes in the tiers summary.json and the terminal summary use
    (size_histogram), counts on a log scale, as inline SVG."""
    if not sizes:
        return "<p>No clusters of two or more.</p>"
    bins = size_histogram(np.asarray(sizes))
    width, height, pad, top_pad = 560, 220, 40, 20
    peak = math.log10(max(bins.values()) + 1)
    parts = [
        f'<svg class="hist" width="{width}" height="{height + top_pad + 50}" role="img" '
        f'aria-label="cluster sizes"><g transform="translate(0,{top_pad})">'
    ]
    for k, (label, lo, _) in enumerate(SIZE_TIERS):
        count = bins[label]
        h = 0 if count == 0 else max(2.0, height * math.log10(count + 1) / peak)
        x = pad + 40 * k
        parts.append(
            f'<rect x="{x}" y="{height - h:.1f}" width="32" height="{h:.1f}" '
            f'class="{"risk" if lo >= RISK_TIERS[0] else "bar"}">'
            f"<title>{label}: {count:,}</title></rect>"
        )
        parts.append(f'<text x="{x + 16}" y="{height - h - 4:.1f}" class="n">{count:,}</text>')
        parts.append(f'<text x="{x + 16}" y="{height + 16}" class="l">{label}</text>')
    parts.append(
        f'<text x="{pad}" y="{height + 40}" class="axis">cluster size '
        "(members); bar height: number of clusters, log scale</text></g></svg>"
    )
    return "".join(parts)


def _bits(signal: str, distance: int | None) -> str:
    """A copy's pHash distance, said as what it is: for a copy the views signal linked
    (views, verified) or any signal but pHash, the whole frame's distance, which may lie
    beyond the pHash threshold without contradicting the link."""
    if distance is None:
        return ""
    if signal == "phash":
        return f", {distance} bits"
    return f", whole-frame pHash {distance} bits"


def _canaries(c: dict) -> str:
    """The run's own recall: edited copies of sampled images, planted virtually."""
    esc = html.escape
    if not c.get("planted"):
        return "<h2 id=canaries>Canaries</h2><p>No canary could be planted.</p>"
    signals = list(c.get("recall_by_signal", {}))

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    out = [
        "<h2 id=canaries>Canaries</h2><p class=note>Edited copies of "
        f"{c['planted']:,} sampled images (seed {c['seed']}) were planted virtually: never "
        "written, never part of a decision. The share of them each signal links to its "
        f"original: {pct(c['recall'])} by any signal.</p><table class=t><tr><th>edit</th>"
        "<th>copies</th><th>any</th>",
        *(f"<th>{esc(s)}</th>" for s in signals),
        "</tr>",
    ]
    for edit, row in c["by_edit"].items():
        cells = "".join(f"<td>{pct(row.get(s))}</td>" for s in signals)
        out.append(
            f"<tr><th>{esc(edit)}</th><td>{row['copies']}</td><td>{pct(row['any'])}</td>"
            f"{cells}</tr>"
        )
    out.append("</table>")
    return "".join(out)


def _skipped_shards(skipped: list[dict]) -> str:
    """The damaged shards --skip-bad-shards left out: none of their samples is counted."""
    if not skipped:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><th>{esc(b['shard'])}</th><td>{esc(b['error'])}</td></tr>" for b in skipped
    )
    return (
        f"<h2 id=skipped>Skipped shards ({len(skipped):,})</h2><p class=note>Damaged shards "
        "left out (--skip-bad-shards): no output shard was written for them and none of "
        f"their samples is counted below.</p><table class=t>{rows}</table>"
    )


def _references(section: dict, matches: list[dict], thumbs: dict) -> str:
    """What the run matched against: counts per reference and blocklist, and for each
    reference its closest and farthest matches, the input sample beside the item."""
    esc = html.escape

    def by(d: dict) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"

    out = [
        "<h2 id=references>References</h2><p class=note>Samples removed because they match "
        "a reference item (--against) or a blocklist entry. Each reference's closest and "
        "farthest matches are shown beside the item they matched: if the farthest do not "
        "look like copies, tighten the thresholds.</p><table class=t><tr><th>reference</th>"
        "<th>kind</th><th>items</th><th>skipped</th><th>removed</th><th>by signal</th></tr>"
    ]
    for r in section.get("against", []):
        out.append(
            f"<tr><th>{esc(r['reference'])}</th><td>{esc(r['kind'])}</td>"
            f"<td>{r['usable']:,}</td><td>{esc(by(r['skipped_by_reason']))}</td>"
            f"<td>{r['matched']:,}</td><td>{esc(by(r['matched_by_signal']))}</td></tr>"
        )
    for b in section.get("blocklists", []):
        out.append(
            f"<tr><th>{esc(b['blocklist'])}</th><td>blocklist</td>"
            f"<td>{b['digests'] + b['phash_codes']:,}</td><td></td>"
            f"<td>{b['matched']:,}</td><td>{esc(by(b['matched_by_signal']))}</td></tr>"
        )
    out.append("</table>")
    for r in section.get("against", []):
        for side in ("closest", "farthest"):
            pairs = [m for m in matches if m["reference"] == r["reference"] and m["side"] == side]
            if not pairs:
                continue
            out.append(f"<h3>{esc(r['reference'])}: {side} matches</h3><div class=matches>")
            for m in pairs:
                a = thumbs.get((m["shard"], m["key"]), {})
                b = thumbs.get((m["reference_shard"], m["reference_item"]), {})
                how = m["signal"] + _bits(m["signal"], m["phash_distance"])
                if m["clip_similarity"] is not None:
                    how += f", cos {m['clip_similarity']:.3f}"
                out.append(
                    f"<span class=pair>{_img(a.get('thumbnail'), m['key'])}"
                    f"{_img(b.get('thumbnail'), m['reference_key'])}<span>{esc(how)}<br>"
                    f"{esc(m['key'])}<br>{esc(m['reference_key'])}</span></span>"
                )
            out.append("</div>")
    return "".join(out)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table.t{border-collapse:collapse}table.t td,table.t th{padding:3px 10px;text-align:right;
border-bottom:1px solid #eee}table.t th{text-align:left}
.strip{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0 20px}
.m{width:150px;font-size:11px;border:1px solid #ddd;padding:4px;background:#fafafa}
.m.kept{border:3px solid #1a7f37;background:#eefbea}.m img{max-width:140px;max-height:110px;
display:block;margin:auto}.noimg{width:140px;height:60px;background:#eee;color:#888;
text-align:center;line-height:60px}.cap{color:#555;overflow:hidden;max-height:44px}
.hist .bar{fill:#6a8fd0}.hist .risk{fill:#d0533a}.hist text{font-size:10px;
text-anchor:middle}.hist .axis{text-anchor:start;font-size:11px}
.pair{display:inline-flex;gap:6px;border:1px solid #ddd;padding:6px;margin:4px;
align-items:center}.pair img{max-width:110px;max-height:90px}.note{color:#555}
"""


def render(report_dir: str) -> str:
    """Write report_dir/report.html from the files beside it; return its path."""
    with open(os.path.join(report_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    clusters = pq.read_table(os.path.join(report_dir, "clusters.parquet"))
    previews = _read_optional(os.path.join(report_dir, "previews.parquet"), PREVIEWS_SCHEMA)
    calibration = _read_optional(
        os.path.join(report_dir, "calibration.parquet"), CALIBRATION_SCHEMA
    )
    shown = shown_clusters(clusters)
    ids = shown.column("cluster_id").to_pylist()
    members = pq.read_table(
        os.path.join(report_dir, "samples.parquet"),
        filters=[("cluster_id", "in", ids)] if ids else [("cluster_id", "<", -1)],
    )
    thumbs = {(r["shard"], r["key"]): r for r in previews.to_pylist()}
    matches = _read_optional(os.path.join(report_dir, "matches.parquet"), MATCHES_SCHEMA)
    pairs = calibration.to_pylist()
    keys = sorted({k for p in pairs for k in (p["key_a"], p["key_b"])})
    cluster_of = {
        (r["shard"], r["key"]): r["cluster_id"]
        for r in pq.read_table(
            os.path.join(report_dir, "samples.parquet"),
            columns=["shard", "key", "cluster_id"],
            filters=[("key", "in", keys)] if keys else [("cluster_id", "<", -1)],
        ).to_pylist()
    }
    for p in pairs:  # an outside pair that another signal links is no pair kept apart
        a = cluster_of.get((p["shard_a"], p["key_a"]))
        p["linked"] = a is not None and a == cluster_of.get((p["shard_b"], p["key_b"]))
    page = _page(summary, clusters, shown, members, thumbs, pairs)
    if "canaries" in summary:
        section = _canaries(summary["canaries"])
        page = page.replace("<h2>Cluster sizes</h2>", section + "<h2>Cluster sizes</h2>", 1)
    if "references" in summary:
        section = _references(summary["references"], matches.to_pylist(), thumbs)
        page = page.replace("<h2>Cluster sizes</h2>", section + "<h2>Cluster sizes</h2>", 1)
    path = os.path.join(report_dir, "report.html")
    write_atomic(path, page.encode("utf-8"))
    return path


def _read_optional(path: str, schema: pa.Schema) -> pa.Table:
    return pq.read_table(path) if os.path.exists(path) else schema.empty_table()


def _page(summary, clusters, shown, members, thumbs, calibration) -> str:
    c = summary["counts"]
    esc = html.escape
    sizes = clusters.column("size").to_pylist()
    tiers = risk_tiers(sizes)
    phases = summary.get("phases", {})
    total_s = sum(p["seconds"] for p in phases.values()) or 0.0
    rows = [("samples", c["samples"]), ("kept", c["kept"]), ("removed", c["removed"])]
    rows += [(f"removed: {k}", v) for k, v in c["removed_by_reason"].items()]
    rows += [("passed through", c["passthrough"])]
    rows += [(f"passed through: {k}", v) for k, v in c["passthrough_by_reason"].items()]
    config = summary.get("config", {})
    dry_run = summary.get("output", {}).get("dry_run", False)
    skipped = summary.get("skipped_shards", [])
    thresholds = thresholds_text(summary.get("thresholds", {}))
    models = (
        f"{config.get('clip_model')} / {config.get('clip_pretrained')}"
        if "clip" in config.get("signals", [])
        else "none (CLIP off)"
    )
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width'>",
        "<title>dedup report</title><style>",
        CSS,
        "</style></head><body>",
        "<h1>dedup report" + (" (dry run)" if dry_run else "") + "</h1>",
        "<p class=note><b>Dry run</b>: nothing was written to the output folder; the report "
        "says what a run would keep and remove.</p>"
        if dry_run
        else "",
        _skipped_shards(skipped),
        "<table class=t>",
        *(f"<tr><th>{esc(k)}</th><td>{v:,}</td></tr>" for k, v in rows),
        f"<tr><th>thresholds</th><td>{esc(thresholds)}</td></tr>",
        f"<tr><th>signals</th><td>{esc(', '.join(config.get('signals', [])))}</td></tr>",
        f"<tr><th>CLIP model</th><td>{esc(models)}</td></tr>",
        f"<tr><th>run time</th><td>{total_s:,.1f} s"
        + (f" ({c['samples'] / total_s:,.0f} samples/s)" if total_s else "")
        + "</td></tr>",
        "</table>",
        "<h2>Cluster sizes</h2>",
        _histogram_svg(sizes),
        "<h2>Memorization risk</h2>",
        "<p class=note>Image generators memorize pictures that are repeated many times in "
        "their training data: most images that Carlini et al. (2023, <i>Extracting Training "
        "Data from Diffusion Models</i>) extracted from Stable Diffusion were duplicated about "
        "a hundred times or more. Clusters in these tiers are the ones to check first.</p>",
        "<table class=t><tr><th>copies</th><th>clusters</th><th>samples in them</th></tr>",
        *(
            f"<tr><td>{t['min_size']} or more</td><td>{t['clusters']:,}</td>"
            f"<td>{t['samples']:,}</td></tr>"
            for t in tiers
        ),
        "</table>",
        f"<h2>Largest clusters ({shown.num_rows} of {clusters.num_rows:,})</h2>",
        "<p class=note>The survivor has a green frame; each copy shows its distance "
        "(pHash bits) or similarity (CLIP cosine) to it.</p>",
    ]
    by_cluster: dict[int, list[dict[str, Any]]] = {}
    for r in members.to_pylist():
        by_cluster.setdefault(r["cluster_id"], []).append(r)
    for cl in shown.to_pylist():
        # Survivor first, then the others in input order (the order of samples.parquet);
        # the pipeline made previews for exactly these.
        group = sorted(by_cluster.get(cl["cluster_id"], []), key=lambda r: not r["kept"])
        why = cl.get("kept_by")
        because = (
            f"; kept by {esc(why)}"
            + (f": {esc(cl['kept_detail'])}" if cl.get("kept_detail") else "")
            if why
            else ""
        )
        out.append(
            f"<h3 id=c{cl['cluster_id']}>cluster {cl['cluster_id']}: {cl['size']:,} "
            f"samples, linked by {esc(', '.join(cl['signals']))}{because}</h3>"
            "<div class=strip>"
        )
        for r in group[:SHOWN_MEMBERS]:
            preview = thumbs.get((r["shard"], r["key"]), {})
            link = (
                "survivor"
                if r["kept"]
                else f"{r['reason']}"
                + _bits(r["reason"], r.get("phash_distance"))
                + (
                    f", cos {r['clip_similarity']:.3f}"
                    if r.get("clip_similarity") is not None
                    else ""
                )
            )
            cap = preview.get("caption") or ""
            out.append(
                f"<div class='m{' kept' if r['kept'] else ''}'>"
                + _img(preview.get("thumbnail"), r["key"])
                + f"<div><b>{esc(r['key'])}</b></div><div>{esc(os.path.basename(r['shard']))}"
                f"</div><div>{r['width']}x{r['height']}, {r['bytes']:,} B</div>"
                f"<div>{esc(link)}</div><div class=cap>{esc(cap)}</div></div>"
            )
        if len(group) > SHOWN_MEMBERS:
            out.append(f"<div class=m>and {len(group) - SHOWN_MEMBERS:,} more</div>")
        out.append("</div>")
    shown_signals = sorted({p["signal"] for p in calibration})
    out.append(
        "<h2>Calibration</h2><p class=note>Pairs just inside each threshold (linked by that "
        "signal) and just outside it (not linked by it), side by side: if the outside "
        "pairs look like copies, loosen the threshold; if the inside ones do not, "
        "tighten it. An outside pair that another signal linked into one cluster says so. "
        "Pairs are shown for the pHash and CLIP thresholds only"
        + (f" (here: {esc(', '.join(shown_signals))})" if shown_signals else "")
        + "; for the views signal's, run <code>dedup calibrate</code>.</p>"
    )
    if not calibration:
        out.append("<p>No pairs near a threshold.</p>")
    for signal in shown_signals:
        for side in ("inside", "outside"):
            pairs = [p for p in calibration if p["signal"] == signal and p["side"] == side]
            out.append(f"<h3>{esc(signal)}, {side} the threshold</h3><div>")
            for p in pairs:
                a = thumbs.get((p["shard_a"], p["key_a"]), {})
                b = thumbs.get((p["shard_b"], p["key_b"]), {})
                unit = "bits" if signal == "phash" else "cosine"
                value = f"{p['value']:.0f}" if signal == "phash" else f"{p['value']:.3f}"
                if side == "outside" and p.get("linked"):
                    value += f" {unit}<br>linked by another signal"
                else:
                    value += f" {unit}"
                out.append(
                    f"<span class=pair>{_img(a.get('thumbnail'), p['key_a'])}"
                    f"{_img(b.get('thumbnail'), p['key_b'])}<span>{value}<br>"
                    f"{esc(p['key_a'])}<br>{esc(p['key_b'])}</span></span>"
                )
            out.append("</div>")
    # Lets a test (or a person with dev tools) see that the thumbnails decoded.
    out.append(
        "<script>addEventListener('load',()=>{const s=document.querySelector('.strip');"
        "const i=s?Array.from(s.querySelectorAll('img')):[];"
        "document.body.dataset.firstStripImages=i.length;"
        "document.body.dataset.firstStripLoaded=i.filter(x=>x.naturalWidth>0).length;"
        "const m=Array.from(document.querySelectorAll('.matches img'));"
        "document.body.dataset.matchImages=m.length;"
        "document.body.dataset.matchLoaded=m.filter(x=>x.naturalWidth>0).length;"
        "});</script>"
    )
    out.append("</body></html>\n")
    return "".join(out)
