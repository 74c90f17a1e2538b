"""Blocklists (--blocklist FILE): image digests and 64-bit pHash codes whose matches are
removed, with the entry they matched.

Read from a file:
- Parquet or CSV (by extension): the columns `sha256`, `blake3`, `digest` (the run's
  digest kind) and `phash` are read, hex text (or raw bytes in Parquet); others are
  ignored; an empty cell is no entry.
- any other file: text, one entry per line, `sha256:HEX`, `blake3:HEX`, `phash:HEX` or
  bare hex (64 digits: a digest of the run's kind; 16 digits: a pHash code). Blank lines
  and lines starting with `#` are skipped. Lines end at `\n` (or `\r\n`) only: a form feed
  or U+2028 inside a comment is part of it. A leading UTF-8 BOM is ignored (CSV too).
A list with no entries (only comments, or empty: an opt-out list before its first
request) is valid and matches nothing.
A digest matches exactly; a pHash code matches detailed images within phash_threshold.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup import signals
from dedup.core.config import Config
from dedup.core.errors import ConfigError, DedupError
from dedup.core.progress import Progress
from dedup.engine.extract import STATUS_OK, ShardFeatures
from dedup.engine.featurestore import read_features
from dedup.io.fsutil import read_regular_file
from dedup.search.pairs import hamming_pairs
from dedup.signals.phash import by_signature

DIGEST_KINDS = ("sha256", "blake3")
COLUMNS = (*DIGEST_KINDS, "digest", "phash")


class BlocklistError(ConfigError):
    """A blocklist that cannot be read or parsed (exit 2), with its file and line."""


@dataclass
class Blocklist:
    """One --blocklist FILE, parsed: its entries as written, digests and codes."""

    label: str
    entries: list[str] = field(default_factory=list)  # "sha256:<hex>", "phash:<hex>"
    digests: dict[bytes, int] = field(default_factory=dict)  # digest -> entry
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # distinct
    code_entry: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    digest_kind: str | None = None

    def counts(self) -> dict[str, int]:
        return {"digests": len(self.digests), "phash_codes": len(self.codes)}


def load_blocklist(path: str, config: Config) -> Blocklist:
    """Parse FILE; a value that does not parse is a BlocklistError naming file and line."""
    try:
        data = read_regular_file(path)  # never a FIFO or a device (/dev/zero never ends)
    except (OSError, DedupError) as e:  # a URL's failure is an OutputError
        why = getattr(e, "strerror", None) or e
        raise BlocklistError(f"blocklist {path}: cannot read ({why})") from None
    b = Blocklist(path)
    codes: dict[int, int] = {}
    lower = path.lower()
    if lower.endswith(".parquet"):
        rows = _parquet_rows(path, data)
    elif lower.endswith(".csv"):
        rows = _csv_rows(path, data)
    else:
        rows = _text_rows(path, data, config)
    for line, kind, value in rows:
        text = value.strip().lower()
        if kind == "digest":
            kind = config.exact_digest
        width = 16 if kind == "phash" else 64
        if len(text) != width or any(c not in "0123456789abcdef" for c in text):
            raise BlocklistError(
                f"{path}:{line}: {kind} must be {width} hex digits, got {_short(value)}"
            )
        if kind == "phash":
            codes.setdefault(int(text, 16), len(b.entries))
        else:
            if kind != config.exact_digest:
                raise BlocklistError(
                    f"{path}:{line}: a {kind} digest, but this run's digests are "
                    f"{config.exact_digest} (set exact_digest: {kind})"
                )
            b.digests.setdefault(bytes.fromhex(text), len(b.entries))
            b.digest_kind = kind
        b.entries.append(f"{kind}:{text}")
    if codes and "phash" not in signals.computed(config):
        raise BlocklistError(
            f"blocklist {path}: lists pHash codes; no pHash is computed (signals "
            f"{','.join(config.signals)}: add phash)"
        )
    if codes:
        words = np.fromiter(codes.keys(), dtype=np.uint64, count=len(codes))
        entry = np.fromiter(codes.values(), dtype=np.int64, count=len(codes))
        order = np.argsort(words)
        b.codes, b.code_entry = words[order], entry[order]
    return b


def _short(value) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _text_rows(path: str, data: bytes, config: Config):
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BlocklistError(f"blocklist {path}: not UTF-8 text, CSV or Parquet") from None
    # str.splitlines would also end lines at form feeds, U+2028 and other separators,
    # and so number them differently from every editor.
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r").strip()
        if not line or line.startswith("#"):
            continue
        kind, sep, value = line.partition(":")
        if sep:
            kind = kind.strip().lower()
            if kind not in (*DIGEST_KINDS, "phash"):
                raise BlocklistError(
                    f"{path}:{number}: unknown entry kind {_short(kind)} "
                    "(sha256:, blake3:, phash: or bare hex)"
                )
            yield number, kind, value
        elif len(line) == 16:
            yield number, "phash", line
        elif len(line) == 64:
            yield number, "digest", line
        else:
            raise BlocklistError(
                f"{path}:{number}: not a digest (64 hex digits) or a pHash code (16): "
                f"{_short(line)}"
            )


def _csv_rows(path: str, data: bytes):
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
        header = [h.strip().lower() for h in next(reader, [])]
    except (UnicodeDecodeError, csv.Error) as e:
        raise BlocklistError(f"blocklist {path}: not a readable CSV file ({e})") from None
    wanted = [(k, c) for k, c in enumerate(header) if c in COLUMNS]
    if not wanted:
        raise BlocklistError(f"blocklist {path}: no {', '.join(COLUMNS)} column in its header line")
    try:
        for row in reader:  # line_num: a quoted value may span lines
            for k, column in wanted:
                if k < len(row) and row[k].strip():
                    yield reader.line_num, column, row[k]
    except csv.Error as e:
        raise BlocklistError(f"{path}:{reader.line_num}: {e}") from None


def _parquet_rows(path: str, data: bytes):
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as e:
        raise BlocklistError(f"blocklist {path}: not a readable Parquet file ({e})") from None
    columns = [c for c in table.column_names if c.lower() in COLUMNS]
    if not columns:
        raise BlocklistError(f"blocklist {path}: no {', '.join(COLUMNS)} column")
    for column in columns:
        for number, value in enumerate(table.column(column).to_pylist(), 1):
            if value is None or value == "":
                continue
            if isinstance(value, bytes):
                value = value.hex()
            yield number, column.lower(), str(value)


# ---------------------------------------------------------------- matching


@dataclass
class _Match:
    """A task: one shard's usable images against every blocklist."""

    blocklists: list[Blocklist]
    config: Config

    def __call__(self, item: tuple[int, str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(global rows, blocklist, entry) of the shard's matches, sorted by row."""
        pos, path, start = item
        table = read_features(path, ["status", "digest", "phash", "detail", "width", "height"])
        ok = np.flatnonzero(
            pc.equal(table.column("status"), STATUS_OK).to_numpy(zero_copy_only=False)
        )
        found: dict[int, tuple[int, int]] = {}
        digests = table.column("digest").take(pa.array(ok, type=pa.int64())).to_pylist()
        for b, blocklist in enumerate(self.blocklists):
            if blocklist.digests:
                for row, value in zip(ok.tolist(), digests, strict=True):
                    entry = blocklist.digests.get(value)
                    if entry is not None and row not in found:
                        found[row] = (b, entry)
            if len(blocklist.codes) and table.column("phash").null_count < table.num_rows:
                for row, entry in self._near(table, ok, blocklist):
                    found.setdefault(row, (b, entry))
        rows = np.array(sorted(found), dtype=np.int64)
        which = np.array([found[r][0] for r in rows.tolist()], dtype=np.int64)
        entry = np.array([found[r][1] for r in rows.tolist()], dtype=np.int64)
        return rows + start, which, entry

    def _near(self, table: pa.Table, ok: np.ndarray, blocklist: Blocklist):
        """(row, entry) of detailed images within phash_threshold of a listed code (the
        nearest; ties: the first entry)."""
        cand = table.take(pa.array(ok, type=pa.int64()))
        detail = np.asarray(cand.column("detail").to_numpy(zero_copy_only=False), dtype=np.int16)
        w = np.asarray(cand.column("width").to_numpy(zero_copy_only=False), dtype=np.int64)
        h = np.asarray(cand.column("height").to_numpy(zero_copy_only=False), dtype=np.int64)
        detailed = np.flatnonzero(~by_signature(detail, w * h))
        if not len(detailed):
            return []
        words = np.frombuffer(
            b"".join(cand.column("phash").take(pa.array(detailed)).to_pylist()), dtype=">u8"
        ).astype(np.uint64)
        table_codes = blocklist.codes
        both = np.concatenate([table_codes, words]).astype(">u8").view(np.uint8).reshape(-1, 8)
        i, j, d = hamming_pairs(both, self.config.phash_threshold)
        n = len(table_codes)
        cross = (i < n) & (j >= n)
        i, j, d = i[cross], j[cross] - n, d[cross]
        order = np.lexsort((blocklist.code_entry[i], d, j))
        first = np.ones(len(order), dtype=bool)
        first[1:] = j[order][1:] != j[order][:-1]
        pick = order[first]
        return list(
            zip(ok[detailed[j[pick]]].tolist(), blocklist.code_entry[i[pick]].tolist(), strict=True)
        )


def _describe(item) -> str:
    return f"blocklist matching of shard {item[0]} ({os.path.basename(item[1])})"


def match_blocklists(
    blocklists: list[Blocklist], features: list[ShardFeatures], starts, config: Config, executor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global rows, blocklist, entry) of every usable image a blocklist names, by row."""
    if not blocklists or not features:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    items = [(pos, f.path, int(starts[pos])) for pos, f in enumerate(features)]
    results = executor.map(
        _Match(blocklists, config),
        items,
        Progress("blocklist", total_items=len(items)),
        describe=_describe,
    )
    rows = np.concatenate([r[0] for r in results])
    return rows, np.concatenate([r[1] for r in results]), np.concatenate([r[2] for r in results])
