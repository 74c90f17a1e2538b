"""Signals: functions from a batch of samples to feature columns, and the registry that
lists them.

Each signal declares its name, the feature columns it stores, the other signals whose
features it reads, the settings and constants its features depend on (the feature
store's fingerprint), its thresholds (the summary), the kinds of link it makes (the
report), and its pair search over in-memory candidates (`dedup.engine.cluster.cluster`, the
one-process oracle). The phases loop over the registry; a new signal is a module here,
an entry below, its compute step in engine/extract.py and its partitioned search in
engine/pairtasks.py and engine/records.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dedup.core.config import Config, settings_digest
from dedup.signals import views as _views
from dedup.signals.phash import (
    CODE_BYTES,
    DETAIL_FLOOR,
    LOW_DETAIL_BITS,
    SIGNATURE_BYTES,
    SIGNATURE_SIDE,
    TINY_PIXELS,
)


@dataclass(frozen=True)
class Signal:
    """One duplicate signal, as the phases see it."""

    name: str
    summary: str  # for --help and messages
    columns: tuple[pa.Field, ...]  # feature-store columns it fills
    needs: tuple[str, ...]  # signals whose features it reads too (computed with it)
    links: tuple[str, ...]  # the kinds of link it makes (cluster.SIGNALS names)
    settings: tuple[str, ...]  # Config fields its features depend on
    constants: tuple  # algorithm constants its features depend on
    thresholds: Callable[[Config], dict[str, Any]]  # for the summary
    pairs: str  # "module:function" (Candidates, Config) -> list of Edges

    def find_pairs(self) -> Callable:
        """The signal's in-memory pair search (imported on first use)."""
        module, function = self.pairs.split(":")
        return getattr(importlib.import_module(module), function)


REGISTRY: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal(
            name="exact",
            summary="identical image bytes",
            columns=(pa.field("digest", pa.binary(32)),),
            needs=(),
            links=("exact",),
            settings=("exact_digest",),
            constants=(),
            thresholds=lambda c: {},
            pairs="dedup.signals.edges:exact_signal_edges",
        ),
        Signal(
            name="phash",
            summary="64-bit DCT perceptual hash",
            columns=(
                pa.field("phash", pa.binary(CODE_BYTES)),
                # confident pHash bits; below LOW_DETAIL_BITS: low-detail
                pa.field("detail", pa.int16()),
                # RGB thumbnail of a low-detail or tiny image (null for the others)
                pa.field("colour_signature", pa.binary(SIGNATURE_BYTES)),
            ),
            needs=(),
            links=("phash", "flat", "tiny"),
            settings=("phash_draft",),
            constants=(DETAIL_FLOOR, SIGNATURE_SIDE, TINY_PIXELS, "tiny: square, rgb"),
            thresholds=lambda c: {"phash": c.phash_threshold},
            pairs="dedup.signals.edges:phash_signal_edges",
        ),
        Signal(
            name="views",
            summary="hashes of the trimmed frame, crops and mirror images",
            columns=(pa.field("views", pa.binary(_views.VIEW_BYTES)),),
            needs=("phash",),  # its decode, and detail: low-detail rows take no part
            links=("views", "verified"),
            settings=("phash_draft",),
            constants=(
                _views.VIEW_NAMES,
                _views.CROP_FRACTIONS,
                _views.GRID,
                "grid: bilinear; trim: Lanczos; weak views: the full frame's code",
                _views.BORDER_TOLERANCE,
                _views.MAX_TRIM,
                LOW_DETAIL_BITS,
            ),
            # the two full frames are compared at the pHash's threshold
            thresholds=lambda c: (
                {"phash": c.phash_threshold, "views": c.views_threshold}
                | ({"verify": c.verify_threshold or "auto"} if c.verify else {})
            ),
            pairs="dedup.signals.edges:views_signal_edges",
        ),
        Signal(
            name="clip",
            summary="CLIP image embeddings (needs model weights)",
            columns=(pa.field("clip", pa.binary()),),  # float16 L2-normalized embedding
            needs=(),
            links=("clip",),
            settings=(),  # the model's own fingerprint is added by engine/extract.py
            constants=(),
            thresholds=lambda c: {"clip": c.clip_threshold},
            pairs="dedup.signals.edges:clip_signal_edges",
        ),
    )
}


def enabled(config: Config) -> list[Signal]:
    """The signals a config turns on, in registry order (`auto`: all of them, until a
    run chooses those that can run here: dedup.commands.run.choose_signals)."""
    return [s for s in REGISTRY.values() if s.name in config.signal_names]


def computed(config: Config) -> set[str]:
    """The signals whose features are computed: those turned on and those they need."""
    out = set()
    for s in enabled(config):
        out.add(s.name)
        out.update(s.needs)
    return out


def feature_columns() -> list[pa.Field]:
    """Every signal's feature columns, in registry order (all stored, null when off)."""
    return [column for s in REGISTRY.values() for column in s.columns]


def fingerprint(config: Config) -> dict[str, Any]:
    """What the stored features of each signal depend on; None for signals not computed."""
    on = computed(config)
    return {
        s.name: (
            {"settings": {f: getattr(config, f) for f in s.settings}, "constants": s.constants}
            if s.name in on
            else None
        )
        for s in REGISTRY.values()
    }


def feature_fingerprint(config: Config) -> str:
    """Hash of the settings that change per-shard features (not thresholds or keep rule):
    the reading settings, and each signal's."""
    relevant = {
        "max_pixels": config.max_pixels,
        "image_extensions": sorted(config.image_extensions),
        "image_formats": sorted(config.image_formats),
        # the digest is stored whatever the signals: the verification tier checks it
        "exact_digest": config.exact_digest,
        "signals": fingerprint(config),
    }
    return settings_digest(relevant)


def thresholds(config: Config) -> dict[str, Any]:
    """The thresholds of the signals turned on, for the summary."""
    out: dict[str, Any] = {}
    for s in enabled(config):
        out.update(s.thresholds(config))
    return out
