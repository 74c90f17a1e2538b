"""The row space: every sample of the input, shard after shard in input order, then
every item of the references (--against), source after source, numbered as one range of
global rows. Which source a row falls in is asked here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dedup.engine.references import Reference


@dataclass
class References:
    """Items INPUT's samples are matched against (--against), as global rows after the
    input's: per source, its feature file and first row, the local rows that take part
    (None: every decoded image) and where its images are read for the views signal's
    verification (a shard path, a FileGroup, or None when they are not at hand)."""

    sources: list[tuple[str, int]] = field(default_factory=list)
    only: list = field(default_factory=list)
    images: list = field(default_factory=list)

    @property
    def rows(self) -> int:
        return 0 if not self.sources else self.end - self.sources[0][1]

    end: int = 0  # one past the last reference row


def reference_rows(references: list[Reference], first: int) -> References:
    """The references' sources as global rows after the input's `first` rows."""
    out = References(end=first)
    for ref in references:
        for source in ref.sources:
            out.sources.append((source.features.path, out.end))
            out.only.append(source.only)
            out.images.append(source.images)
            out.end += source.features.rows
    return out


def starts_of(counts) -> np.ndarray:
    """int64 (len(counts) + 1,): the first global row of each source, then the end."""
    return np.concatenate([[0], np.cumsum(list(counts))]).astype(np.int64)


def source_of(starts, rows) -> np.ndarray:
    """The position of the source (shard) each global row falls in; `starts` holds each
    source's first row (a last total entry may follow)."""
    return np.searchsorted(np.asarray(starts), rows, side="right") - 1


def rows_by_shard(shard_starts, rows: np.ndarray):
    """(shard position, indices into `rows`) for each shard that global `rows` fall in;
    `shard_starts` holds each shard's first row (a last total entry may follow)."""
    shard_of = source_of(shard_starts, rows)
    for pos in np.unique(shard_of).tolist():
        yield pos, np.flatnonzero(shard_of == pos)
