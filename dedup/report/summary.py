"""The report from the phases' results: samples.parquet merged, counts checked,
summary.json, previews, matches and calibration tables, report.html."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup import signals
from dedup.core.config import Config
from dedup.core.errors import DedupError
from dedup.core.processes import check_stop
from dedup.engine.blocklist import Blocklist
from dedup.engine.extract import STATUS_OK
from dedup.engine.featurestore import read_features
from dedup.engine.finish import Finished
from dedup.engine.job import Job
from dedup.engine.plan import REASONS, Plan, identities, keys_at
from dedup.engine.references import (
    Reference,
    status_counts,
)
from dedup.engine.rows import reference_rows, rows_by_shard, source_of
from dedup.engine.tables import (
    merge_parts,
    write_table,
)
from dedup.engine.thumbs import read_previews
from dedup.io import storage
from dedup.io.outdir import (
    remove_output,
)
from dedup.io.shards import (
    display_name,
)
from dedup.report.html import CALIBRATION_SCHEMA, MATCHES_SCHEMA, PREVIEWS_SCHEMA
from dedup.report.html import render as render_html
from dedup.report.tables import (
    LARGEST_CLUSTERS,
    package_versions,
    report_paths,
    size_histogram,
    write_summary,
)
from dedup.signals.edges import DECISIONS, NO_DISTANCE
from dedup.signals.keep import NOTE_NAMES, NOTE_OK


def make_report(
    features,
    bad,
    the_plan: Plan,
    finished,
    job: Job,
    report_dir,
    parts_dir,
    seconds,
    canaries: dict | None = None,
    shown_as: str | None = None,
) -> dict[str, Any]:
    """The report from the phases' results, made in the local folder `report_dir`:
    samples.parquet merged from the write tasks' parts, the counts checked, clusters,
    previews, summary.json, report.html. `shown_as`: where the report will be read (a
    store's prefix, when `report_dir` is its staging folder), for summary.json."""
    merge_parts(
        [storage.join(parts_dir, f"{k:08d}.parquet") for k in range(len(features))],
        report_paths(report_dir)["samples"],
    )
    shard_counts = _check_counts(features, the_plan, finished, job.dry_run)
    n = len(the_plan.keep)
    phases = {
        "extract": _phase(seconds["extract"], n),
        "cluster": _phase(seconds["cluster"], int((~the_plan.passthrough).sum())),
        "write": _phase(seconds["write"], n),
    }
    if "canaries" in seconds:
        phases["canaries"] = _phase(seconds["canaries"], (canaries or {}).get("planted", 0))
    paths = report_paths(report_dir)
    write_table(the_plan.clusters, paths["clusters"])
    _write_report_extras(features, the_plan, finished, report_dir, job.references)
    summary = _summary(
        features,
        the_plan,
        shard_counts,
        job.config,
        phases,
        job.out,
        shown_as or report_dir,
        job.dry_run,
    )
    summary["output"]["state_dir"] = absolute(job.store)
    if job.references or job.blocklists:
        summary["references"] = match_counts(the_plan, job.references, job.blocklists)
    if canaries is not None:
        summary["canaries"] = canaries
    summary["skipped_shards"] = [{"shard": absolute(b.shard.path), "error": b.error} for b in bad]
    summary = displayable(summary)
    check_stop()  # a stop signal that came while the report was made still stops the run
    write_summary(summary, paths["summary"])
    render_html(report_dir)
    return summary


def _write_report_extras(
    features, p: Plan, finished: list[Finished], report_dir: str, references=()
) -> None:
    """previews.parquet (thumbnails and captions of the shown samples and reference
    items), calibration.parquet, and matches.parquet when there are references."""
    shard_col, key_col, thumb_col, cap_col = [], [], [], []
    for done in finished:
        for key, thumb, cap in done.previews:
            shard_col.append(display_name(absolute(done.shard_path)))
            key_col.append(key)
            thumb_col.append(thumb)
            cap_col.append(cap)
    if references:
        matches, items = _matches_table(features, p, references)
        write_table(matches, os.path.join(report_dir, "matches.parquet"))
        for shard, key, thumb, cap in items:
            shard_col.append(shard)
            key_col.append(key)
            thumb_col.append(thumb)
            cap_col.append(cap)
    else:  # a matches.parquet of an earlier run with references no longer applies
        remove_output(os.path.join(report_dir, "matches.parquet"))
    write_table(
        pa.table(
            {"shard": shard_col, "key": key_col, "thumbnail": thumb_col, "caption": cap_col},
            schema=PREVIEWS_SCHEMA,
        ),
        os.path.join(report_dir, "previews.parquet"),
    )
    cal = p.calibration
    rows_a = np.array([c[2] for c in cal], dtype=np.int64)
    rows_b = np.array([c[3] for c in cal], dtype=np.int64)
    shards_a, keys_a = keys_at(features, p.shard_starts, rows_a)
    shards_b, keys_b = keys_at(features, p.shard_starts, rows_b)
    write_table(
        pa.table(
            {
                "signal": [c[0] for c in cal],
                "side": [c[1] for c in cal],
                "value": [float(c[4]) for c in cal],
                "shard_a": shards_a,
                "key_a": keys_a,
                "shard_b": shards_b,
                "key_b": keys_b,
            },
            schema=CALIBRATION_SCHEMA,
        ),
        os.path.join(report_dir, "calibration.parquet"),
    )


def match_counts(p: Plan, references: list[Reference], blocklists: list[Blocklist]) -> dict:
    """summary.json's references section: per REF and blocklist, what it held and how
    many input samples it removed, by the signal that matched."""
    n = len(p.keep)
    refs = reference_rows(references, n)
    owner = [ref for ref in references for _ in ref.sources]
    starts = np.asarray([start for _, start in refs.sources], dtype=np.int64)
    matched = {id(ref): Counter() for ref in references}
    by_list: dict[str, Counter] = {b.label: Counter() for b in blocklists}
    names = np.array(DECISIONS, dtype=object)
    for row in np.flatnonzero(p.reason == REASONS.index("reference")).tolist():
        at = int(source_of(starts, p.survivor[row]))
        matched[id(owner[at])][names[p.link[row]]] += 1
    for row in np.flatnonzero(p.reason == REASONS.index("blocklist")).tolist():
        if row in p.blocked:
            label, entry = p.blocked[row]
            by_list[label]["phash" if entry.startswith("phash:") else "exact"] += 1
        else:  # a copy of a blocklisted sample
            label = p.blocked[int(p.survivor[row])][0]
            by_list[label][names[p.link[row]]] += 1
    out = {"against": [], "blocklists": []}
    for ref in references:
        statuses: Counter = Counter()
        for source in ref.sources:
            statuses.update(status_counts(source))
        usable = statuses.pop(STATUS_OK, 0)
        out["against"].append(
            {
                "reference": absolute(ref.label),
                "kind": ref.kind,
                "items": usable + sum(statuses.values()),
                "usable": usable,
                "skipped_by_reason": dict(sorted(statuses.items())),
                "matched": sum(matched[id(ref)].values()),
                "matched_by_signal": dict(sorted(matched[id(ref)].items())),
            }
        )
    for b in blocklists:
        out["blocklists"].append(
            {
                "blocklist": absolute(b.label),
                **b.counts(),
                "matched": sum(by_list[b.label].values()),
                "matched_by_signal": dict(sorted(by_list[b.label].items())),
            }
        )
    return out


def _matches_table(features, p: Plan, references: list[Reference]):
    """matches.parquet (the shown matches of each reference), and the previews of the
    reference items in them: (shard, key, thumbnail, caption)."""
    shown = p.shown_matches
    rows = np.asarray([row for _, _, row in shown], dtype=np.int64)
    items = p.survivor[rows] if len(rows) else np.zeros(0, np.int64)
    paths, keys = keys_at(features, p.shard_starts, rows)
    r_paths, r_keys, _, ref_keys = identities(features, p.shard_starts, references, items)
    names = np.array(DECISIONS, dtype=object)
    table = pa.table(
        {
            "reference": [absolute(label) for label, _, _ in shown],  # as in summary.json
            "side": [side for _, side, _ in shown],
            "signal": [names[p.link[row]] for row in rows.tolist()],
            "phash_distance": pa.array(
                p.phash_distance[rows], mask=p.phash_distance[rows] == NO_DISTANCE
            ),
            "clip_similarity": pa.array(
                p.clip_similarity[rows], mask=np.isnan(p.clip_similarity[rows])
            ),
            "shard": paths,
            "key": keys,
            "reference_shard": r_paths,
            "reference_item": r_keys,
            "reference_key": ref_keys,
        },
        schema=MATCHES_SCHEMA,
    )
    # The items' thumbnails, read from where their images are (none for a stored index
    # whose images are gone).
    refs = reference_rows(references, len(p.keep))
    starts = np.asarray([start for _, start in refs.sources], dtype=np.int64)
    sources = [source for ref in references for source in ref.sources]
    previews = {}
    wanted = np.unique(items)
    for pos, at in rows_by_shard(starts, wanted):
        source = sources[pos]
        if source.images is None:
            continue
        local = (wanted[at] - starts[pos]).tolist()
        f = read_features(
            source.features.path, ["member_names", "member_offsets", "member_sizes", "image_member"]
        )
        found = read_previews(
            source.images,
            local,
            f.column("member_names").to_pylist(),
            f.column("member_offsets").to_pylist(),
            f.column("member_sizes").to_pylist(),
            f.column("image_member").to_pylist(),
        )
        for global_row, (_, thumb, cap) in zip(wanted[at].tolist(), found, strict=True):
            previews[global_row] = (thumb, cap)
    out, seen = [], set()
    for k, row in enumerate(items.tolist()):
        if row in previews and row not in seen:
            seen.add(row)
            out.append((r_paths[k], r_keys[k], *previews[row]))
    return table, out


def absolute(path: str) -> str:
    """A path for summary.json: a URL as it is, a local path made absolute (never
    relative to the caller's working directory)."""
    return storage.absolute(path)


def displayable(value):
    """`value` with every string as valid UTF-8 text: a file name's bytes that are not
    UTF-8 (held as lone surrogates) become \\xNN, as in samples.parquet, since strict JSON
    parsers (jq, Go, Rust) reject the "\\udce9" escapes json.dumps would write."""
    if isinstance(value, str):
        return display_name(value)
    if isinstance(value, dict):
        return {displayable(k): displayable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [displayable(v) for v in value]
    return value


def _phase(seconds: float, items: int) -> dict[str, float]:
    return {
        "seconds": round(seconds, 3),
        "images_per_second": round(items / seconds, 1) if seconds > 0 else 0.0,
    }


def _check_counts(features, p: Plan, finished, dry_run) -> list[dict[str, Any]]:
    """Samples in = kept + removed + passthrough, per shard; the writer agrees. Else fail."""
    out = []
    for pos, f in enumerate(features):
        rows = p.rows(pos)
        samples = rows.stop - rows.start
        passthrough = int(p.passthrough[rows].sum())
        removed = int((~p.keep[rows]).sum())
        kept = int((p.keep[rows] & ~p.passthrough[rows]).sum())
        if samples != kept + removed + passthrough or samples != f.rows:
            raise DedupError(
                f"{f.shard.path}: sample counts do not add up "
                f"({samples} != {kept} + {removed} + {passthrough})"
            )
        if not dry_run and finished[pos].samples_written != kept + passthrough:
            raise DedupError(
                f"{f.shard.path}: wrote {finished[pos].samples_written} samples, "
                f"expected {kept + passthrough}"
            )
        out.append(
            {
                "shard": absolute(f.shard.path),
                "output": None if finished[pos].output is None else absolute(finished[pos].output),
                "samples": samples,
                "kept": kept,
                "removed": removed,
                "passthrough": passthrough,
                "skipped_members": f.skipped_members,
                "features_reused": f.reused,
                "output_unchanged": finished[pos].unchanged,
            }
        )
    return out


def keep_by_counts(features, config: Config) -> dict[str, dict[str, int]]:
    """Per keep_by spec, the decoded images whose JSON gave no usable number, by why
    (they rank after those with one)."""
    counts = [Counter() for _ in config.keep_by]
    for f in features:
        table = read_features(f.path, ["status", "keep_notes"])
        ok = pc.equal(table.column("status"), STATUS_OK)
        for notes in table.filter(ok).column("keep_notes").to_pylist():
            for k, note in enumerate(notes or []):
                if note != NOTE_OK:
                    counts[k][NOTE_NAMES[note]] += 1
    return {spec: dict(sorted(c.items())) for spec, c in zip(config.keep_by, counts, strict=True)}


def _summary(
    features, p: Plan, shard_counts, config: Config, phases, out, report_dir, dry_run
) -> dict[str, Any]:
    names = np.array(REASONS, dtype=object)
    removed_by = Counter(names[p.reason[~p.keep]].tolist())
    passthrough_by = Counter(names[p.reason[p.passthrough]].tolist())
    clusters = p.clusters
    sizes = clusters.column("size").to_numpy()
    largest = np.lexsort((clusters.column("cluster_id").to_numpy(), -sizes))[:LARGEST_CLUSTERS]
    largest_rows = clusters.take(pa.array(largest, type=pa.int64())).to_pylist()
    skipped, routes = Counter(), Counter()
    for f in features:
        skipped.update(f.skipped_members)
        routes.update(f.clip_decode)
    return {
        "counts": {
            "samples": int(len(p.keep)),
            "kept": int(sum(c["kept"] for c in shard_counts)),
            "removed": int((~p.keep).sum()),
            "passthrough": int(p.passthrough.sum()),
            "removed_by_reason": dict(sorted(removed_by.items())),
            "passthrough_by_reason": dict(sorted(passthrough_by.items())),
            "skipped_members": dict(sorted(skipped.items())),
            # images embedded, by where they were decoded (see README: CLIP on a GPU)
            **(
                {"clip_decode": dict(sorted(routes.items()))}
                if "clip" in config.signal_names
                else {}
            ),
            # the views signal's grey zone: pairs checked by local features (README)
            **({"verify": p.verify} if p.verify is not None else {}),
            # alone in their cluster though linked to another row (README: Which copy
            # survives)
            "detached": int(p.detached.sum()) if p.detached is not None else 0,
            **({"keep_by": keep_by_counts(features, config)} if config.keep_by else {}),
        },
        "clusters": {
            "count": clusters.num_rows,
            "size_histogram": size_histogram(sizes),
            "largest": largest_rows,
        },
        "thresholds": signals.thresholds(config)
        | ({"verify": p.verify["bound"]} if p.verify is not None else {}),
        "digest": config.exact_digest,
        "config": config.to_dict()
        | {"against": [absolute(a) for a in config.against]}
        | {"blocklist": [absolute(b) for b in config.blocklist]},
        "versions": package_versions(),
        "phases": phases,
        "shards": shard_counts,
        "output": {"dir": absolute(out), "report": absolute(report_dir), "dry_run": dry_run},
    }
