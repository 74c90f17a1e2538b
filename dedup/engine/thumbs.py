"""Thumbnails and captions of the few samples the HTML report shows.

Phase 3 reads them by the byte offsets phase 1 recorded, so making the report reads
those samples only, never every shard again.
"""

from __future__ import annotations

import io
import json
import warnings

from PIL import Image

from dedup.io.decode import normalize
from dedup.io.shards import Shard, display_name, read_ranges_of

THUMB_SIZE = 128
CAPTION_CHARS = 300


def thumbnail(data: bytes) -> bytes | None:
    """A small JPEG of an image, or None when it does not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > 100_000_000:
                return None
            if img.format == "JPEG":
                img.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
            img = normalize(img).convert("RGB")
            img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=75)
            return buf.getvalue()
    except Exception:
        return None


def caption(members: dict[str, bytes]) -> str | None:
    """The sample's caption: its .txt member, else a json member's caption field."""
    for ext, data in members.items():
        if ext == "txt" or ext.endswith(".txt"):
            return data.decode("utf-8", "replace").strip()[:CAPTION_CHARS]
    for ext, data in members.items():
        if ext == "json" or ext.endswith(".json"):
            try:
                value = json.loads(data)
            except ValueError:
                continue
            if isinstance(value, dict) and isinstance(value.get("caption"), str):
                return value["caption"].strip()[:CAPTION_CHARS]
    return None


def read_previews(
    path: str | Shard,
    rows: list[int],
    names: list,
    offsets: list,
    sizes: list,
    image_members: list,
    captured: dict[int, list[bytes]] | None = None,
) -> list[tuple[int, bytes | None, str | None]]:
    """(row, thumbnail, caption) for the given rows of one shard (a path, or a Shard: a
    FileGroup's files too): from `captured` member bytes (read during the write pass)
    where given, else read by offset."""
    captured = captured or {}
    wanted = []  # (row, "image" or caption extension, offset, size, captured bytes)
    for row in rows:
        have = captured.get(row)
        for k, (raw, offset, size) in enumerate(
            zip(names[row], offsets[row], sizes[row], strict=True)
        ):
            name = display_name(raw.decode("utf-8", "surrogateescape"))
            base = name.rsplit("/", 1)[-1]
            ext = base.split(".", 1)[1] if "." in base else ""
            data = have[k] if have is not None else None
            raw_name = raw.decode("utf-8", "surrogateescape")
            if name == image_members[row]:
                wanted.append((row, None, offset, size, data, raw_name))
            elif size <= 1 << 16 and (ext.endswith("txt") or ext.endswith("json")):
                wanted.append((row, ext, offset, size, data, raw_name))
    missing = [(offset, size) for _, _, offset, size, data, _ in wanted if data is None]
    missing_names = [name for *_, data, name in wanted if data is None]
    shard = path if isinstance(path, Shard) else Shard(path)
    fetched = iter(read_ranges_of(shard, missing_names, missing))
    found = [data if data is not None else next(fetched) for *_, data, _ in wanted]
    images: dict[int, bytes] = {}
    captions: dict[int, dict[str, bytes]] = {row: {} for row in rows}
    for (row, ext, *_), data in zip(wanted, found, strict=True):
        if ext is None:
            images[row] = data
        else:
            captions[row][ext] = data
    return [
        (row, thumbnail(images[row]) if images.get(row) else None, caption(captions[row]))
        for row in rows
    ]
