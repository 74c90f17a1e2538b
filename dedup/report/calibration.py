"""`dedup calibrate --report DIR`: calibration.json and a self-contained calibration.html
(curves of recall and unrelated links per threshold, the recall table, and example pairs
at each recommended threshold: the copies just inside it and just outside)."""

from __future__ import annotations

import base64
import html
import json
import math
import os

import numpy as np

from dedup.engine.thumbs import thumbnail
from dedup.io.fsutil import write_atomic
from dedup.report.tables import thresholds_text

EXAMPLES = 6  # pairs per side of a recommended threshold


def _svg(curve: dict, title: str) -> str:
    """Recall (blue) and unrelated links per pair, log scale (red), over the thresholds."""
    xs = curve["threshold"]
    width, height, pad = 520, 200, 40
    n = len(xs)

    def x(k: int) -> float:
        return pad + (width - 2 * pad) * k / max(n - 1, 1)

    def y_recall(r: float) -> float:
        return height - pad + (2 * pad - height) * r

    rates = [max(r, 1e-12) for r in curve["unrelated_rate"]]

    def y_rate(r: float) -> float:  # 1e-12 .. 1 on a log scale
        return height - pad + (2 * pad - height) * (math.log10(r) + 12) / 12

    recall = " ".join(f"{x(k):.1f},{y_recall(r):.1f}" for k, r in enumerate(curve["recall"]))
    rate = " ".join(f"{x(k):.1f},{y_rate(r):.1f}" for k, r in enumerate(rates))
    labels = "".join(
        f'<text x="{x(k):.1f}" y="{height - pad + 14}" class=l>{xs[k]}</text>'
        for k in range(0, n, max(1, n // 8))
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'<polyline points="{recall}" fill="none" stroke="#2b6cb0" stroke-width="2"/>'
        f'<polyline points="{rate}" fill="none" stroke="#c53030" stroke-width="2"/>'
        f'<text x="{pad}" y="14" class=l>{html.escape(title)}: recall (blue, 0-1), unrelated '
        "links per pair (red, log 1e-12..1)</text>"
        f"{labels}</svg>"
    )


def _img(data: bytes | None) -> str:
    thumb = thumbnail(data) if data else None
    if not thumb:
        return "<span class=noimg>no preview</span>"
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(thumb).decode()}" alt="">'


def copies_in_sample(result: dict) -> str | None:
    """The calibration's copies in its sample, as a phrase (stderr and the page say it):
    None when there are none."""
    c = result.get("copies_in_sample")
    if not c or not c["pairs"]:
        return None
    return (
        f"{c['pairs']:,} pairs of sampled images are copies of each other (linked, and "
        f"accepted by the local-feature check of {c['checked']:,} checked)"
        + (f"; {c['unchecked']:,} linked pairs not checked" if c["unchecked"] else "")
    )


def write_calibration_report(report_dir: str, result: dict, planted, pairs, image_of) -> None:
    """`image_of(row)`: the bytes of a planted row (an original or a copy)."""
    os.makedirs(report_dir, exist_ok=True)
    write_atomic(
        os.path.join(report_dir, "calibration.json"),
        json.dumps(result, indent=1, sort_keys=True).encode(),
    )
    esc = html.escape
    signals = result["signals"]
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>dedup calibrate</title>",
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;max-width:1200px}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;"
        "text-align:right}th{text-align:left}.l{font-size:10px}.pair{display:inline-flex;"
        "gap:4px;border:1px solid #ddd;padding:4px;margin:3px}.pair img{max-width:110px;"
        "max-height:90px}.noimg{color:#888}</style></head><body>",
        "<h1>dedup calibrate</h1>",
        f"<p>{esc(json.dumps(result['sample']))}</p>",
        f"<p>thresholds: {esc(thresholds_text(result['thresholds']))}</p>",
        "<h2>Recall per edit</h2><table><tr><th>edit</th><th>copies</th><th>any</th>",
        *(f"<th>{esc(s)}</th>" for s in signals),
        "</tr>",
    ]
    for edit, row in result["recall"].items():
        cells = "".join(
            f"<td>{'-' if row.get(s) is None else f'{100 * row[s]:.0f}%'}</td>" for s in signals
        )
        any_ = "-" if row["any"] is None else f"{100 * row['any']:.0f}%"
        out.append(f"<tr><th>{esc(edit)}</th><td>{row['copies']}</td><td>{any_}</td>{cells}</tr>")
    out.append("</table><h2>False links among unrelated sampled images</h2><table>")
    out.append(
        "<tr><th>signal</th><th>pairs</th><th>linked</th><th>rate</th><th>95% upper</th>"
        "<th>per image at the dataset's size</th></tr>"
    )
    for name, f in result["false_links"].items():
        out.append(
            f"<tr><th>{esc(name)}</th><td>{f['pairs']:,}</td><td>{f['linked']:,}</td>"
            f"<td>{f['rate']:.2e}</td><td>{f['upper95']:.2e}</td>"
            f"<td>{f['per_image_at_dataset_size']:.3g} "
            f"(upper {f['upper95_per_image']:.3g})</td></tr>"
        )
    out.append("</table>")
    copies = copies_in_sample(result)
    if copies:
        out.append(
            f"<p>Left out as copies of each other (the input holds duplicates): {esc(copies)}.</p>"
        )
    out.append("<h2>Thresholds</h2>")
    rec = result["recommend"]
    for name, curve in result["curves"].items():
        key = f"{name}_threshold"
        r = rec.get(key, {})
        out.append(f"<h3>{esc(name)}</h3>" + _svg(curve, name))
        out.append(
            f"<p>recommended for precision {rec['target_precision']}: "
            f"{esc(str(r.get('value')))} {esc(r.get('note', ''))}</p>"
        )
        if r.get("value") is not None:
            out.append(_examples(name, r["value"], planted, pairs, image_of))
    out.append("</body></html>\n")
    write_atomic(os.path.join(report_dir, "calibration.html"), "".join(out).encode())


def _examples(name: str, value, planted, pairs, image_of) -> str:
    """Copies just inside the recommended threshold and just outside it, beside their
    originals."""
    if name == "phash":
        d = pairs.phash_distance.astype(float)
        d[d < 0] = np.nan
        inside, outside = d <= value, d > value
        key = d
    elif name == "views":
        d = pairs.views_distance.astype(float)
        inside, outside = d <= value, d > value
        key = d
    else:
        s = pairs.clip_similarity.astype(float)
        inside, outside = s >= value, s < value
        key = -s
    ok = pairs.usable & ~np.isnan(key)
    parts = []
    for label, mask, order in (("inside", inside & ok, -1), ("outside", outside & ok, 1)):
        at = np.flatnonzero(mask)
        at = at[np.argsort(order * key[at], kind="stable")][:EXAMPLES]
        parts.append(f"<p>{label} the threshold:</p><div>")
        for k in at.tolist():
            original = image_of(int(planted.pair_original[k]))
            copy = image_of(int(planted.pair_copy[k]))
            value_text = f"{key[k]:.0f} bits" if name != "clip" else f"cos {-key[k]:.3f}"
            parts.append(
                f"<span class=pair>{_img(original)}{_img(copy)}<span>"
                f"{html.escape(planted.edit_of[k])}<br>{value_text}</span></span>"
            )
        parts.append("</div>")
    return "".join(parts)
