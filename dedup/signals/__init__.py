"""Signals: functions from a batch of samples to feature columns, and the registry that
lists them.

Each signal declares its name, the feature columns it stores, the other signals whose
features it reads, the settings and constants its features depend on (the feature
store's fingerprint), its thresholds (the summary), the kinds of link it makes (the
report), and its pair search over in-memory candidates (`dedup.engine.cluster.cluster`, the
one-process oracle). The phases loop over the registry.

The four built-in signals share one decode and have searches of their own, written in
the engine (`search` names them). A new signal needs no engine code: it declares
`compute` (a function from the images the pHash decodes to its 64-bit codes) and
`search: "codes"` (codes within `threshold` bits: the engine's partitioned multi-index
search, the same one the pHash runs), and is registered with `register` or, from an
installed package, with an entry point in the group `dedup.signals` (loaded when this
module is imported, so in every worker process too). Its link name follows the built-in
decisions (samples.parquet's `reason`, the report's signals).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pyarrow as pa

from dedup.core.config import (
    KNOWN_SIGNALS,
    PLUGIN_ERRORS,
    PLUGIN_SIGNALS,
    Config,
    keep_by_field,
    settings_digest,
)
from dedup.core.errors import ConfigError
from dedup.signals import keep as _keep
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
    # "module:function" (Candidates, Config) -> list of Edges; "" for a `codes` signal
    # (the generic search: dedup.signals.edges.code_signal_edges)
    pairs: str = ""
    # The partitioned search (dedup.engine.pairtasks): a built-in's own (its name), or
    # "codes" for a plugin: its one column holds 64-bit codes (binary(8)), linked within
    # `threshold` bits.
    search: str = ""
    threshold: Callable[[Config], int] | None = None  # `codes`: the largest distance
    # `codes`: "module:function" (list of PIL images, Config) -> list of 8-byte codes, one
    # per image: the images the pHash decodes (grayscale, or RGB when CLIP's decode
    # serves both), EXIF orientation applied, before any resize.
    compute: str = ""

    def find_pairs(self) -> Callable:
        """The signal's in-memory pair search (imported on first use)."""
        return _function(self.pairs)

    def compute_function(self) -> Callable:
        """A plugin's per-image computation (imported on first use)."""
        return _function(self.compute)

    @property
    def builtin(self) -> bool:
        return self.name in KNOWN_SIGNALS


def _function(spec: str) -> Callable:
    module, function = spec.split(":")
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
            search="exact",
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
            search="phash",
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
                "trim: the keep bands' picture when smaller (dedup.signals.keep.CONSTANTS)",
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
            search="views",
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
            search="clip",
        ),
    )
}


ENTRY_POINTS = "dedup.signals"


def register(signal: Signal) -> None:
    """Add a plugin's signal to the registry (after the built-ins). Call it when this
    package is imported, before `dedup.signals.edges` is (an entry point in the group
    `dedup.signals` does so in every process): the decisions' vocabulary is fixed then."""
    problem = _invalid(signal)
    if problem:
        raise ConfigError(f"signal {signal.name!r}: {problem}")
    if "dedup.signals.edges" in sys.modules:
        raise ConfigError(
            "registered after dedup.signals.edges was imported; register it from an "
            "entry point in the group dedup.signals"
        )
    REGISTRY[signal.name] = signal
    PLUGIN_SIGNALS.append(signal.name)


def _invalid(signal: Signal) -> str:
    """What is wrong with a plugin's declaration ("" when nothing)."""
    taken = {link for s in REGISTRY.values() for link in s.links} | set(REGISTRY)
    if not signal.name.isidentifier() or signal.name == "auto":
        return "a signal's name is an identifier other than auto"
    if signal.name in taken or any(link in taken for link in signal.links):
        return "its name or a link name is taken"
    if signal.links != (signal.name,):
        return "a plugin makes one kind of link, named after it"
    if signal.search != "codes" or signal.threshold is None or not signal.compute:
        return "a plugin declares search='codes', a threshold and a compute function"
    if len(signal.columns) != 1 or signal.columns[0].type != pa.binary(8):
        return "a `codes` signal stores one binary(8) column"
    if signal.columns[0].name in {c.name for c in feature_columns()}:
        return f"column {signal.columns[0].name!r} is taken"
    if "phash" not in signal.needs:
        return "its compute reads the pHash's decode: needs=('phash',)"
    return ""


def load_plugins() -> None:
    """Register the signals that installed packages declare (entry points in the group
    `dedup.signals`, each a Signal), in name order."""
    for point in sorted(entry_points(group=ENTRY_POINTS), key=lambda p: p.name):
        if point.name in REGISTRY:
            continue
        # A broken plugin is an error of the runs that name it (one line, exit 2), not
        # of every run: its message waits in PLUGIN_ERRORS (see Config).
        try:
            signal = point.load()
            if not isinstance(signal, Signal) or signal.name != point.name:
                raise ConfigError(f"not a dedup.signals.Signal named {point.name}")
            register(signal)
        except Exception as e:
            PLUGIN_ERRORS[point.name] = f"signal plugin {point.value}: {e}"
            continue
        logging.getLogger("dedup").debug("signal plugin %s from %s", point.name, point.value)


def plugins() -> list[Signal]:
    """The registered plugins' signals, in registry order."""
    return [s for s in REGISTRY.values() if not s.builtin]


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
    """What the stored features of each signal depend on; None for built-ins not
    computed (a plugin not computed is left out: installing one changes no fingerprint)."""
    on = computed(config)
    return {
        s.name: (
            {"settings": {f: getattr(config, f) for f in s.settings}, "constants": s.constants}
            if s.name in on
            else None
        )
        for s in REGISTRY.values()
        if s.builtin or s.name in on
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
        # the keep policy's features: how bands are found, and the JSON fields read
        "keep": {
            "constants": _keep.CONSTANTS,
            "keep_by": [keep_by_field(s)[0] for s in config.keep_by],
        },
    }
    return settings_digest(relevant)


def thresholds(config: Config) -> dict[str, Any]:
    """The thresholds of the signals turned on, for the summary."""
    out: dict[str, Any] = {}
    for s in enabled(config):
        out.update(s.thresholds(config))
    return out


load_plugins()
