"""What a run matches its input against (--against REF): reference sets turned into
feature files the global phase searches with the input's rows.

A REF is, checked in this order:
- a stored reference index (`dedup index`: INDEX/dedup-index.json), whose features are
  used as they are;
- an earlier dedup OUT (OUT/.dedup/job.json): its stored features, of the samples that
  run kept (read from its samples.parquet); nothing is decoded again;
- a feature store (--state-dir of an earlier run): every usable sample it holds;
- a shard set (a directory of *.tar, a shard, a glob, braces, a URL);
- a directory of plain image files, searched recursively.
Shard sets and folders are read like input shards; their features are kept under
OUT/.dedup/references/ (reused by a rerun). Reference items are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup import signals
from dedup.core.config import Config
from dedup.core.errors import ConfigError, DedupError, InputError
from dedup.engine.extract import STATUS_OK, ShardFeatures
from dedup.engine.featurestore import DONE_SUFFIX, FEATURE_SCHEMA, feature_path, read_features
from dedup.io import storage
from dedup.io.fsutil import open_regular, read_regular_file
from dedup.io.shards import FileGroup, Shard, at_hand, display_name, list_shards

log = logging.getLogger("dedup")

INDEX_FILE = "dedup-index.json"
INDEX_FORMAT = 1
# Image files per FileGroup: a folder is read in parts of this many files, in parallel.
FILES_PER_GROUP = 1000
KINDS = ("index", "run", "store", "shards", "files")


class ReferencesError(ConfigError):
    """A REF that cannot serve this run (exit 2): missing, empty, no images, or stored
    with other settings."""


@dataclass
class Source:
    """One feature file of a reference, the local rows that take part (None: every
    usable row), and where its images are (a Shard or FileGroup; None when not at hand)."""

    features: ShardFeatures
    only: np.ndarray | None = None
    images: Shard | None = None


@dataclass
class Reference:
    """One --against REF, resolved."""

    label: str  # the REF as given
    kind: str  # one of KINDS
    sources: list[Source] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)  # to extract first (shards, files)
    store: str | None = None  # where their features go

    def key_of(self, shard: Shard, key: str) -> str:
        """reference_key: a file's path relative to REF, or `shard key` for a sample."""
        if isinstance(shard, FileGroup) or self.kind == "files":
            return key
        return f"{display_name(shard.path)} {key}"


def _fail(ref: str, why: str) -> ReferencesError:
    return ReferencesError(f"against {ref}: {why}")


def resolve_references(
    refs: list[str], config: Config, store_root: str, forbidden: list[Shard], out: str
) -> list[Reference]:
    """Each REF's kind and sources; shard sets and folders still to be extracted (into
    `store_root`/<digest of REF>). A REF that is missing, empty, holds no images, is an
    input shard or OUT itself, or was stored with other settings: ReferencesError."""
    inputs = {storage.real(s.path) for s in forbidden}
    found = []
    for ref in refs:
        if storage.real(ref) == storage.real(out):
            raise _fail(ref, "is this run's --out")
        r = _resolve_one(ref, config, store_root)
        for shard in r.shards:
            if storage.real(shard.path) in inputs:
                raise _fail(ref, f"{shard.path} is also an input shard")
        for source in r.sources:  # an earlier run or index made from this run's input
            images = source.images
            shard = images is not None and not isinstance(images, FileGroup)
            if shard and storage.real(images.path) in inputs:
                raise _fail(ref, f"was made from {images.path}, an input shard of this run")
        parents = {storage.real(os.path.dirname(p)) for p in inputs}
        if r.kind == "run" and storage.real(ref) in parents:
            raise _fail(ref, "its shards are also input shards")
        found.append(r)
    return found


def _resolve_one(ref: str, config: Config, store_root: str) -> Reference:
    store = storage.join(store_root, hashlib.sha256(storage.real(ref).encode()).hexdigest()[:16])
    if storage.local_dir(ref):
        if os.path.isfile(os.path.join(ref, INDEX_FILE)):
            return open_index(ref, config)
        if os.path.isfile(os.path.join(ref, ".dedup", "job.json")):
            return _earlier_run(ref, config)
        if any(n.endswith(".parquet" + DONE_SUFFIX) for n in os.listdir(ref)):
            return _feature_store(ref, config)
        if any(n.endswith(".tar") for n in os.listdir(ref)):
            return Reference(ref, "shards", shards=list_shards([ref]), store=store)
        files = image_files(ref, config)
        if not files:
            raise _fail(ref, "holds no shards and no image files")
        groups = [
            FileGroup.of(ref, files[k : k + FILES_PER_GROUP], k // FILES_PER_GROUP)
            for k in range(0, len(files), FILES_PER_GROUP)
        ]
        return Reference(ref, "files", shards=groups, store=store)
    if storage.local_file(ref) and not ref.endswith(".tar"):
        raise _fail(ref, "is a file, not a shard (.tar), a folder or an index")
    try:
        shards = list_shards([ref])
    except InputError as e:
        why = str(e).split(": ", 1)[-1] if str(e).startswith(ref) else str(e)
        if not storage.exists(ref, InputError) and not _has_pattern(ref):
            why = "does not exist"
        raise _fail(ref, why) from None
    if not shards:
        raise _fail(ref, "names no shards")
    return Reference(ref, "shards", shards=shards, store=store)


def _has_pattern(ref: str) -> bool:
    return any(c in ref for c in "*?[{")


def image_files(root: str, config: Config) -> list[str]:
    """Image files under `root` (by extension, any depth; hidden names left out), as
    sorted paths relative to it. Only names are listed: what a name turns out to be (a
    FIFO, a device, a link to a folder) is found, and counted, when it is read."""
    out = []
    for folder, dirs, names in os.walk(root):
        # A link to a folder is never followed (it could loop back); named as an image,
        # it is listed, to be counted as not a regular file.
        linked = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in linked)
        for name in [*names, *linked]:
            if name.startswith(".") or "." not in name:
                continue
            if name.rsplit(".", 1)[1].lower() in config.image_extension_set:
                out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


# ---------------------------------------------------------------- stored features


def _stored(path: str, config: Config, clip, ref: str) -> int:
    """Rows of an intact stored feature file computed with this run's feature settings;
    else a ReferencesError naming REF."""
    try:
        marker = json.loads(read_regular_file(path + DONE_SUFFIX))
        data = read_regular_file(path)
    except (OSError, ValueError, DedupError) as e:
        raise _fail(ref, f"stored features unreadable ({path}: {_why(e)})") from None
    if blake3.blake3(data).hexdigest() != marker.get("blake3"):
        raise _fail(ref, f"stored features damaged ({path})")
    _check_settings(json.loads(marker["fingerprint"]), config, clip, ref)
    return int(marker["rows"])


def _check_settings(stored: dict, config: Config, clip, ref: str) -> None:
    if stored.get("config") != signals.feature_fingerprint(config):
        raise _fail(
            ref,
            "its features were computed with other settings (signals or their feature "
            f"settings: this run uses {','.join(config.signals)}); rebuild it with "
            "`dedup index` and this run's options, or match with the same options",
        )
    want = clip.fingerprint if clip is not None else None
    if want is not None and stored.get("clip") != want:
        raise _fail(ref, "its CLIP embeddings come from another model or route")


def _raw_path(path: str, raw_names: dict[str, str]) -> str:
    """A shard path as summary.json writes it (a name's bytes that are not UTF-8 as \\xNN
    text), with its file name as the run's own record (job.json's outputs: outputs keep
    input names) holds it, so that its stored features are found by that name."""
    head, sep, name = path.rpartition("/")
    raw = raw_names.get(name)
    return path if raw is None else head + sep + raw


def _earlier_run(ref: str, config: Config) -> Reference:
    """An earlier OUT: its kept samples, from its feature store and samples.parquet.

    The run's own record, OUT/.dedup/job.json, says whether it finished, whether it was a
    dry run, and where its report went (`--report` may have put it outside OUT; an older
    record without `report` means OUT/dedup-report)."""
    job = _run_record(ref)
    if job.get("complete") is not True:
        raise _fail(ref, "its run did not finish (.dedup/job.json says so); rerun it to the end")
    if job.get("dry_run"):
        raise _fail(ref, "its run was a dry run: it kept nothing")
    report = job.get("report") or os.path.join(ref, "dedup-report")
    if not isinstance(report, str):
        raise _fail(ref, "its run record .dedup/job.json is damaged (report)")
    try:
        summary = json.loads(read_regular_file(storage.join(report, "summary.json")))
    except (OSError, ValueError, DedupError):
        raise _fail(
            ref, f"its report {report} is gone or holds no readable summary.json; rerun it"
        ) from None
    output = summary.get("output") if isinstance(summary, dict) else None
    if not isinstance(output, dict):
        raise _fail(ref, f"its report {report} holds a damaged summary.json")
    if output.get("dry_run"):
        raise _fail(ref, "its run was a dry run: it kept nothing")
    described = output.get("dir")
    if isinstance(described, str) and storage.real(described) != storage.real(ref):
        raise _fail(ref, f"its report {report} now describes another run (of {described})")
    store = output.get("state_dir") or os.path.join(ref, ".dedup", "features")
    samples_path = storage.join(report, "samples.parquet")
    try:
        samples = pq.read_table(
            pa.BufferReader(read_regular_file(samples_path)), columns=["shard", "kept"]
        )
    except (OSError, DedupError, pa.ArrowException) as e:
        raise _fail(ref, f"its report's {samples_path} is unreadable ({_why(e)})") from None
    shard_col = samples.column("shard").to_pylist()
    kept = samples.column("kept").to_numpy(zero_copy_only=False)
    r = Reference(ref, "run")
    start = 0
    try:
        raw = {display_name(n): n for n in job.get("outputs") or [] if isinstance(n, str)}
        entries = [
            (Shard(_raw_path(e["shard"], raw)), int(e["samples"]))
            for e in summary.get("shards", [])
        ]
    except (KeyError, TypeError, ValueError):
        raise _fail(ref, f"its report {report} holds a damaged summary.json") from None
    for shard, n in entries:
        if shard_col[start : start + n] != [display_name(shard.path)] * n:
            raise _fail(ref, "its samples.parquet does not match its summary; rerun it")
        path = feature_path(store, shard)
        rows = _stored_rows(path, ref)
        if rows != n:
            raise _fail(ref, f"its stored features of {shard.path} do not match its report")
        only = np.flatnonzero(kept[start : start + n])
        r.sources.append(Source(ShardFeatures(shard, path, n, {}, None), only, at_hand(shard)))
        start += n
    if start != len(shard_col):
        raise _fail(ref, "its samples.parquet does not match its summary; rerun it")
    if not r.sources:
        raise _fail(ref, "its run kept no samples")
    return r


def _run_record(ref: str) -> dict:
    path = os.path.join(ref, ".dedup", "job.json")
    try:
        job = json.loads(read_regular_file(path))
    except (OSError, ValueError, DedupError) as e:
        raise _fail(ref, f"its run record {path} is unreadable ({_why(e)})") from None
    if not isinstance(job, dict):
        raise _fail(ref, f"its run record {path} is damaged (not a JSON object)")
    return job


def _why(e: BaseException) -> str:
    """An error's reason in a few words: an OSError's strerror, else its message."""
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0][:200]


def _stored_rows(path: str, ref: str) -> int:
    try:
        return int(json.loads(read_regular_file(path + DONE_SUFFIX))["rows"])
    except (OSError, ValueError, KeyError, TypeError, DedupError):
        why = f"its stored features are missing ({path}); was --state-dir used?"
        raise _fail(ref, why) from None


def _feature_store(ref: str, config: Config) -> Reference:
    """A bare feature store (--state-dir): every usable sample it holds."""
    r = Reference(ref, "store")
    for name in sorted(os.listdir(ref)):
        if name.endswith(".parquet") and os.path.isfile(os.path.join(ref, name + DONE_SUFFIX)):
            path = os.path.join(ref, name)
            rows = _stored_rows(path, ref)
            shard = Shard(f"{ref}#{name}")
            r.sources.append(Source(ShardFeatures(shard, path, rows, {}, None)))
    if not r.sources:
        raise _fail(ref, "holds no stored features")
    return r


def check_stored(refs: list[Reference], config: Config, clip) -> None:
    """Stored features (runs, stores) intact and computed with this run's settings."""
    for r in refs:
        if r.kind in ("run", "store", "index"):
            for s in r.sources:
                _stored(s.features.path, config, clip, r.label)


# ---------------------------------------------------------------- the index


def open_index(ref: str, config: Config, clip=None) -> Reference:
    """A stored reference index: its manifest, sources and settings. Every file the
    manifest names is checked before any is used (present, a regular file inside the
    index, a Parquet footer with the feature schema and the manifest's rows, its .done
    marker, its rows.npy in range): a damaged index is a ReferencesError naming the file."""
    manifest_path = os.path.join(ref, INDEX_FILE)
    try:
        manifest = json.loads(read_regular_file(manifest_path))
    except (OSError, DedupError) as e:
        raise _index_damaged(ref, manifest_path, _why(e)) from None
    except ValueError:
        raise _index_damaged(ref, manifest_path, "not valid JSON") from None
    if not isinstance(manifest, dict):
        raise _index_damaged(ref, manifest_path, "not a JSON object")
    if manifest.get("format") != INDEX_FORMAT:
        raise _fail(ref, f"an index of another format ({manifest.get('format')})")
    if manifest.get("feature_fingerprint") != signals.feature_fingerprint(config):
        built = manifest.get("config")
        built = ",".join(map(str, built.get("signals", []))) if isinstance(built, dict) else "?"
        mine = ",".join(config.signals)
        how = (
            f"signals {built}; this run: {mine}"
            if built != mine
            else f"signals {built} as this run's, features computed another way: another "
            "dedup version, or other reading settings"
        )
        raise _fail(
            ref, f"an index built with other settings ({how}); rebuild it with this run's options"
        )
    try:
        entries = [_IndexEntry.of(entry) for entry in manifest["sources"]]
    except (KeyError, TypeError, ValueError) as e:
        why = f"a source entry lacks {e}" if isinstance(e, KeyError) else _why(e)
        raise _index_damaged(ref, manifest_path, why) from None
    r = Reference(ref, "index")
    for entry in entries:
        path = _index_file(ref, entry.features, manifest_path)
        skipped = _check_index_features(ref, path, entry.rows)
        if entry.kind == "files":
            try:
                keys = read_features(path, ["key"]).column("key").to_pylist()
            except DedupError as e:
                raise _index_damaged(ref, path, _why(e)) from None
            location = entry.location
            shard = FileGroup(entry.shard, location, tuple(keys))
            images = shard if location and os.path.isdir(location) else None
        else:
            shard = Shard(entry.shard)
            images = at_hand(shard)
            skipped = {}  # a shard's skipped members are not items
        only = None
        if entry.only is not None:
            only = _index_rows(ref, _index_file(ref, entry.only, manifest_path), entry.rows)
        features = ShardFeatures(shard, path, entry.rows, skipped, None)
        r.sources.append(Source(features, only, images))
    if not r.sources:
        raise _fail(ref, "an empty index")
    return r


@dataclass(frozen=True)
class _IndexEntry:
    """One source of an index manifest, its fields checked for type."""

    kind: str
    shard: str
    location: str | None
    features: str
    rows: int
    only: str | None

    @staticmethod
    def of(entry: dict) -> _IndexEntry:
        e = _IndexEntry(
            entry["kind"],
            entry["shard"],
            entry.get("location"),
            entry["features"],
            entry["rows"],
            entry.get("only"),
        )
        texts = (e.kind, e.shard, e.features)
        optional = (e.location, e.only)
        if not all(isinstance(t, str) for t in texts) or not all(
            t is None or isinstance(t, str) for t in optional
        ):
            raise TypeError(f"a source entry of the wrong shape ({_short(entry)})")
        if e.kind not in ("files", "shard"):
            raise ValueError(f"a source of unknown kind {e.kind!r}")
        if isinstance(e.rows, bool) or not isinstance(e.rows, int) or e.rows < 0:
            raise ValueError(f"a source with {e.rows!r} rows")
        return e


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _index_damaged(ref: str, path: str, why: str) -> ReferencesError:
    return _fail(ref, f"damaged index: {path}: {why}; rebuild it with `dedup index`")


def _index_file(ref: str, relative: str, manifest_path: str) -> str:
    """A file the manifest names, which must lie inside the index."""
    path = os.path.join(ref, relative)
    root = os.path.realpath(ref)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise _index_damaged(ref, manifest_path, f"names {relative}, outside the index")
    return path


def _check_index_features(ref: str, path: str, rows: int) -> dict[str, int]:
    """A feature file of an index checked: its marker's rows, and a Parquet footer with
    the feature schema and those rows (a truncated file has none). Returns the items its
    extraction skipped, by reason (from the marker)."""
    marker_path = path + DONE_SUFFIX
    try:
        marker = json.loads(read_regular_file(marker_path))
        marked = marker["rows"]
        skipped = {str(k): int(v) for k, v in (marker.get("skipped_members") or {}).items()}
    except (OSError, DedupError) as e:
        raise _index_damaged(ref, marker_path, _why(e)) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _index_damaged(ref, marker_path, "not a feature file's marker") from None
    if marked != rows:
        raise _index_damaged(ref, marker_path, f"{marked} rows, the manifest says {rows}")
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            parquet = pq.ParquetFile(fh)
            schema, count = parquet.schema_arrow.remove_metadata(), parquet.metadata.num_rows
    except OSError as e:
        raise _index_damaged(ref, path, _why(e)) from None
    except pa.ArrowException:
        raise _index_damaged(ref, path, "not a readable Parquet file (truncated?)") from None
    if schema != FEATURE_SCHEMA:
        raise _index_damaged(ref, path, "not a feature file (other columns)")
    if count != rows:
        raise _index_damaged(ref, path, f"{count} rows, the manifest says {rows}")
    return skipped


def _index_rows(ref: str, path: str, rows: int) -> np.ndarray:
    """The rows of a source that take part (an index made from an earlier OUT: the samples
    it kept): sorted, distinct, each below the source's `rows`."""
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            only = np.load(fh, allow_pickle=False)
    except OSError as e:
        raise _index_damaged(ref, path, _why(e)) from None
    except (ValueError, EOFError):
        raise _index_damaged(ref, path, "not a readable .npy file (truncated?)") from None
    if only.ndim != 1 or only.dtype.kind not in "iu":
        raise _index_damaged(ref, path, f"not a list of rows ({only.dtype}, {only.ndim}-d)")
    only = only.astype(np.int64)
    if len(only) and (only[0] < 0 or only[-1] >= rows or np.any(np.diff(only) <= 0)):
        raise _index_damaged(ref, path, f"rows out of order or outside 0..{rows - 1}")
    return only


def usable_rows(source: Source) -> int:
    """Decoded images of a source that take part."""
    status = read_features(source.features.path, ["status"]).column("status")
    ok = pc.equal(status, STATUS_OK).to_numpy(zero_copy_only=False)
    if source.only is not None:
        chosen = np.zeros(len(ok), bool)
        chosen[source.only] = True
        ok &= chosen
    return int(ok.sum())


def status_counts(source: Source) -> dict[str, int]:
    """Items of a source by status (ok, undecodable, ...), of the rows that take part;
    for image files, also the files skipped unread, by reason (not_a_regular_file,
    too_large, unreadable_file)."""
    table = read_features(source.features.path, ["status"])
    if source.only is not None:
        table = table.take(pa.array(source.only, type=pa.int64()))
    counts = Counter(
        {c["values"]: int(c["counts"]) for c in pc.value_counts(table.column("status")).to_pylist()}
    )
    if isinstance(source.features.shard, FileGroup):
        counts.update(source.features.skipped_members)
    return dict(counts)
