"""Phase 1: per-shard features (digest, pHash, size, member layout) into one Parquet file."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3
import numpy as np
import pyarrow as pa

from dedup import __version__, signals
from dedup.core.config import Config, keep_by_field
from dedup.core.errors import DedupError, ShardError
from dedup.core.progress import REPORT_EVERY, advance
from dedup.io import storage
from dedup.io.decode import decode_image, image_member, is_image_name, read_header
from dedup.io.fsutil import read_regular_file
from dedup.io.shards import (
    MAX_FILE_BYTES,
    FileGroup,
    Shard,
    display_name,
    is_pipe,
    iter_samples,
    raw_name,
    shard_size,
    spool_shard,
)
from dedup.signals.exact import digest
from dedup.signals.keep import is_json_name, json_values, measure, quality_of
from dedup.signals.views import grey_levels, view_codes, view_input

if TYPE_CHECKING:
    from dedup.signals.clip import ClipSpec
from dedup.engine.featurestore import (
    FEATURE_SCHEMA,
    SIGNAL_COLUMNS,
    TEXTURE_COLUMNS,
    feature_path,
    load_if_current,
    store_features,
)
from dedup.signals import clipstage
from dedup.signals.clip import pick_device
from dedup.signals.phash import (
    IMG_SIZE,
    LOW_DETAIL_BITS,
    TINY_PIXELS,
    colour_signature,
    phash_and_detail,
    shrink_pixels,
)

STATUS_OK = "ok"
# Why a sample passes through untouched; decode.py and compute_features set these.
PASSTHROUGH_REASONS = ("no_image", "undecodable", "unsupported_format", "too_large")
PHASH_BATCH = 256


@dataclass
class ShardFeatures:
    """Where a shard's features are stored and what phase 1 saw while reading it."""

    shard: Shard  # as listed; a pipe: input's names the run's copy of its bytes (spool)
    path: str
    rows: int
    skipped_members: dict[str, int]
    identity: tuple | None  # the input's identity when read (see input_identity)
    reused: bool = False
    content: str | None = None  # BLAKE3 of the input's bytes, where it was computed
    clip_decode: dict[str, int] = field(default_factory=dict)  # images per CLIP decode route


def input_identity(shard: Shard) -> tuple | None:
    """A local file's (size, mtime, ctime, inode); an object's size and ETag or
    generation; None for a pipe: command, which only its bytes identify."""
    if isinstance(shard, FileGroup):  # each file's identity; a file gone: not the same
        out = []
        for name in shard.files:
            try:
                out.append((name, *storage.file_identity(os.stat(shard.file(name)))))
            except OSError:
                out.append((name,))
        return tuple(out)
    try:
        return storage.path_identity(shard.path)
    except OSError as e:
        raise ShardError(shard.path, f"cannot stat ({e.strerror or e})") from None


def content_digest(shard: Shard) -> str:
    """BLAKE3 of the shard's bytes (the `fingerprint: content` check)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if isinstance(shard, FileGroup):
        for name in shard.files:
            hasher.update(name.encode("utf-8", "surrogateescape") + b"\0")
            try:  # what the reader skips (not a regular file, too large) is never read
                hasher.update(read_regular_file(shard.file(name), MAX_FILE_BYTES))
            except OSError:
                hasher.update(b"\1missing")
        return hasher.hexdigest()
    try:
        with storage.open_local_or_stream(shard.read_path) as fh:
            for chunk in storage.iter_chunks(fh):
                hasher.update(chunk)
    except OSError as e:
        raise ShardError(shard.path, f"cannot read ({e.strerror or e})") from None
    return hasher.hexdigest()


def shard_fingerprint(
    shard: Shard,
    config: Config,
    identity: tuple | None,
    clip: ClipSpec | None = None,
    content: str | None = None,
) -> tuple[str, str | None]:
    """What stored features depend on: the input's identity (and, with `fingerprint:
    content` or an input without one, its bytes), the settings and the versions; and the
    BLAKE3 of the bytes where it was computed (`content`, when the caller hashed them)."""
    import PIL
    import scipy

    by_content = config.fingerprint == "content" or identity is None
    if by_content and content is None:
        content = content_digest(shard)
    where = storage.real(shard.path)
    text = json.dumps(
        {
            "path": display_name(where),
            "identity": identity,
            "content": content,
            "config": signals.feature_fingerprint(config),
            "clip": clip.fingerprint if clip is not None else None,
            "versions": [__version__, PIL.__version__, np.__version__, scipy.__version__],
        },
        sort_keys=True,
    )
    return text, content


def extract_shard(
    shard: Shard,
    config: Config,
    store: str,
    clip: ClipSpec | None = None,
    stage=None,
    spool: str | None = None,
) -> ShardFeatures:
    """Features of one shard, reused from `store` when its fingerprint still matches and
    the stored file is intact. `stage`: the shared CLIP stage to send images to (see
    dedup/signals/clipstage.py); None runs the model in this process. A pipe: shard's
    command runs once, its output kept in the `spool` folder: the features returned name
    a shard that every later phase reads there."""
    path = feature_path(store, shard)
    identity = input_identity(shard)
    content = None
    if spool is not None and is_pipe(shard):
        shard, content = spool_shard(shard, spool)
    fingerprint, content = shard_fingerprint(shard, config, identity, clip, content)
    cached = load_if_current(path, fingerprint)
    if cached is not None:
        rows, skipped, routes = cached
        advance(0, shard_size(shard))  # read before: a resumed extract still ends at 100%
        return ShardFeatures(shard, path, rows, skipped, identity, True, content, routes)
    table, skipped, routes = compute_features(shard, config, clip, stage)
    if input_identity(shard) != identity:
        raise ShardError(shard.path, "the shard changed while it was being read; rerun")
    store_features(path, table, fingerprint, skipped, routes)
    return ShardFeatures(shard, path, table.num_rows, skipped, identity, False, content, routes)


def compute_features(
    shard: Shard, config: Config, clip: ClipSpec | None = None, stage=None
) -> tuple[pa.Table, dict[str, int], dict[str, int]]:
    """Read every sample of `shard` and compute its feature row; no caching. Returns the
    table, the members skipped by reason, and the images per CLIP decode route.

    An image whose bytes repeat an earlier one of the shard is not decoded again: equal
    bytes decode to equal features.
    """
    computed = signals.computed(config)
    # `codes` plugins: their functions read the images the pHash decodes
    plugins = [
        (s.columns[0].name, s.compute_function()) for s in signals.plugins() if s.name in computed
    ]
    want_views = "views" in computed
    want_phash = "phash" in computed  # the views signal starts from the pHash's input
    hash_draft = IMG_SIZE if (want_phash and config.phash_draft) else None
    # Grayscale: all the pHash needs. The few low-detail images, compared by a colour
    # signature, are decoded again in RGB when their detail is known (see flush()).
    feed = None
    if clip is not None:
        client = (
            stage.client()
            if stage is not None
            else clipstage.inline_client(clip, clip_device(config))
        )
        feed = clipstage.Feed(client, config.batch_size)
        transform = clipstage.pixel_transform(clip)
        clip_size = max(clip.pixels[0])
        on_device = clip.decode == "device"
    cols: dict[str, list] = {name: [] for name in FEATURE_SCHEMA.names}
    keep_fields = [keep_by_field(spec)[0] for spec in config.keep_by]

    # Members whose bytes the reader holds: images, and JSON sidecars for keep_by.
    if keep_fields:
        held = lambda name: is_image_name(name, config) or is_json_name(name)  # noqa: E731
    else:
        held = lambda name: is_image_name(name, config)  # noqa: E731

    phash_col = cols["phash"]
    detail_col = cols["detail"]
    signature_col = cols["colour_signature"]
    clip_col = cols["clip"]
    views_col = cols["views"]
    pending_rows: list[int] = []
    pending_views: list = []
    pending_smalls: list = []
    pending_bytes: list = []  # image bytes, for an RGB decode if the image is low-detail
    pending_images: list = []  # decoded images, for the plugins (only when there are some)
    seen: dict[bytes, int] = {}  # digest -> first row with those image bytes
    copies: list[tuple[int, int]] = []  # (row, first row) whose features are copied at the end
    skipped: Counter = Counter()

    def flush() -> None:
        if pending_smalls:
            codes, detail = phash_and_detail(np.stack(pending_smalls))
            if want_views:
                for row_index, code in zip(pending_rows, view_codes(pending_views), strict=True):
                    views_col[row_index] = code.tobytes()
            for row_index, code, bits, data in zip(
                pending_rows, codes, detail.tolist(), pending_bytes, strict=True
            ):
                phash_col[row_index] = code.tobytes()
                detail_col[row_index] = bits
                tiny = cols["width"][row_index] * cols["height"][row_index] <= TINY_PIXELS
                if bits >= LOW_DETAIL_BITS and not tiny:
                    signature_col[row_index] = None  # matched by pHash, not by colours
                elif data is not None:
                    again = decode_image(data, config, draft=hash_draft, draft_mode="RGB")
                    if again.image is not None:
                        signature_col[row_index] = colour_signature(again.image)
            for column, compute in plugins:
                _plugin_codes(column, compute, pending_images, pending_rows, cols[column], config)
            pending_rows.clear()
            pending_images.clear()
            pending_smalls.clear()
            pending_views.clear()
            pending_bytes.clear()

    def clip_route(header) -> str:
        """How this image reaches the model: "" for the stage's JPEG decoder, else the
        Pillow route counted in the summary."""
        if not on_device:
            return clipstage.CPU_PILLOW
        if header.format != "JPEG":
            return clipstage.CPU_NOT_JPEG
        if header.mode not in clipstage.DEVICE_MODES:
            return clipstage.CPU_COLOUR_SPACE
        if header.width * header.height > clipstage.DEVICE_MAX_PIXELS:
            return clipstage.CPU_LARGE
        return ""

    try:
        reported_samples = reported_bytes = 0
        # Only image members are held in memory; captions and other members are measured.
        for sample in iter_samples(shard, skipped, keep=held):
            row = sample.index
            if row - reported_samples >= REPORT_EVERY:
                advance(row - reported_samples, sample.offset - reported_bytes)
                reported_samples, reported_bytes = row, sample.offset
            members = sample.members
            names = [m.name for m in members]
            cols["index"].append(row)
            cols["key"].append(display_name(sample.key))
            cols["offset"].append(sample.offset)
            cols["member_names"].append([raw_name(n) for n in names])
            cols["member_offsets"].append([m.offset for m in members])
            cols["member_sizes"].append([m.size for m in members])
            pos = image_member(names, config)
            status, width, height, nbytes, image_digest = "no_image", None, None, None, None
            signature = None
            keep_frame, quality, texture = (None, None), None, (None,) * len(TEXTURE_COLUMNS)
            if pos is not None:
                data = members[pos].data
                nbytes = len(data)
                image_digest = digest(data, config.exact_digest)
                first = seen.get(image_digest)
                if first is not None:
                    status, width, height = (
                        cols["status"][first],
                        cols["width"][first],
                        cols["height"][first],
                    )
                    keep_frame = (cols["content_pixels"][first], cols["overlay"][first])
                    texture = tuple(cols[c][first] for c in TEXTURE_COLUMNS)
                    quality = cols["quality"][first]
                    if status == STATUS_OK:
                        copies.append((row, first))
                else:
                    seen[image_digest] = row
                    header = read_header(data, config)
                    status, width, height = header.reason or STATUS_OK, header.width, header.height
                    quality = quality_of(data, header.format, header.img)
                    if width is not None and height is not None:
                        keep_frame = (width * height, 0)  # unless a decode says more
                    route = clip_route(header) if feed is not None and header.img else None
                    if route == "":  # the stage decodes it, while this process hashes
                        feed.add(row, clipstage.JPEG, data, header.orientation)
                    if header.img is not None and (want_phash or route):
                        # One decode serves both signals when this process prepares CLIP's
                        # pixels too: RGB, at the scale CLIP needs.
                        draft, draft_mode = (clip_size, "RGB") if route else (hash_draft, "YCbCr")
                        decoded = decode_image(data, config, draft, draft_mode, header=header)
                        status = decoded.reason or STATUS_OK
                        grey = None
                        if decoded.image is not None:
                            grey = grey_levels(decoded.image)
                            content, bits, picture, texture = measure(
                                grey, width, height, decoded.image, decoded.chroma
                            )
                            keep_frame = (content, bits)
                        if decoded.image is not None and want_phash:
                            pending_rows.append(row)
                            small = shrink_pixels(grey[1])  # shrink(decoded.image)
                            pending_smalls.append(small)
                            if plugins:
                                pending_images.append(decoded.image)
                            if want_views:
                                pending_views.append(
                                    view_input(decoded.image, small, grey, picture)
                                )
                            if decoded.image.mode == "RGB" and route:  # colours at hand
                                signature = colour_signature(decoded.image)
                                pending_bytes.append(None)
                            else:
                                pending_bytes.append(data)
                        if decoded.image is not None and route:
                            feed.add(
                                row,
                                clipstage.PIXELS,
                                clipstage.pixels_of(decoded.image, transform),
                                route=route,
                            )
                if status != STATUS_OK:
                    image_digest = None
            content, overlay = keep_frame
            cols["content_pixels"].append(content)
            cols["overlay"].append(overlay)
            cols["quality"].append(quality)
            for column, value in zip(TEXTURE_COLUMNS, texture, strict=True):
                cols[column].append(value)
            values, notes = json_values(members, keep_fields)
            cols["keep_values"].append(values)
            cols["keep_notes"].append(notes)
            cols["image_member"].append(None if pos is None else display_name(names[pos]))
            cols["status"].append(status)
            cols["width"].append(width)
            cols["height"].append(height)
            cols["bytes"].append(nbytes)
            cols["digest"].append(image_digest)
            phash_col.append(None)  # filled by flush() or from a repeat's first row
            detail_col.append(None)  # the same
            # Only low-detail images need one (set here or in flush()); a repeat's is copied.
            signature_col.append(signature)
            clip_col.append(None)
            views_col.append(None)
            for column in PLUGIN_COLUMNS:  # every plugin's; filled by flush() when computed
                cols[column].append(None)
            if len(pending_smalls) >= PHASH_BATCH:
                flush()
        flush()
        if feed is not None:
            feed.finish()
    except BaseException:
        if feed is not None:  # the shard failed: batches still in flight are given up
            feed.abandon()
        raise
    routes: dict[str, int] = {}
    if feed is not None:
        for row, vector in feed.vectors.items():
            if cols["status"][row] == STATUS_OK:  # not when the hash's decode failed
                clip_col[row] = vector
        for row in feed.failed:  # no decoder could read it for CLIP: passed through
            _not_decodable(cols, row)
        routes = dict(sorted(feed.counts.items()))
    for row, first in copies:
        if cols["status"][first] != STATUS_OK:  # its first copy failed in the CLIP stage
            _not_decodable(cols, row)
            continue
        phash_col[row] = phash_col[first]
        detail_col[row] = detail_col[first]
        signature_col[row] = signature_col[first]
        clip_col[row] = clip_col[first]
        views_col[row] = views_col[first]
        for column, _ in plugins:
            cols[column][row] = cols[column][first]
    advance(len(cols["index"]) - reported_samples, shard_size(shard) - reported_bytes)
    return pa.table(cols, schema=FEATURE_SCHEMA), dict(sorted(skipped.items())), routes


# The columns of every plugin installed (stored, null when not computed).
PLUGIN_COLUMNS = tuple(s.columns[0].name for s in signals.plugins())


def _plugin_codes(column: str, compute, images: list, rows: list, out: list, config) -> None:
    """A `codes` plugin's codes of a batch of decoded images, into its column: each one
    8 bytes (anything else is the plugin's fault: a clear error, never a bad store)."""
    codes = list(compute(images, config))
    if len(codes) != len(images):
        raise DedupError(f"signal plugin column {column}: {len(codes)} codes for {len(images)}")
    for row, code in zip(rows, codes, strict=True):
        code = bytes(code)
        if len(code) != 8:
            raise DedupError(f"signal plugin column {column}: a code of {len(code)} bytes, not 8")
        out[row] = code


def _not_decodable(cols: dict[str, list], row: int) -> None:
    cols["status"][row] = "undecodable"
    for name in SIGNAL_COLUMNS:
        cols[name][row] = None


def clip_device(config: Config) -> str:
    """The device of a model run inside a reader (`clip_stage: inline`)."""

    return pick_device(config.device)
