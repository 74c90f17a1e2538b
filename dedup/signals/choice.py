"""Which signals a run uses: `signals: auto` made concrete, and CLIP's weights and
device resolved before any work starts."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from dedup.core.config import AUTO, WITHOUT_CLIP, Config
from dedup.core.errors import ClipNotInstalled, ModelError
from dedup.signals.clip import pick_device, resolve, weights_found
from dedup.signals.clipstage import DEVICE_MAX_PIXELS, device_decodes

log = logging.getLogger("dedup")


def choose_signals(config: Config) -> tuple[Config, Any]:
    """The config with `signals: auto` made concrete, and the resolved CLIP spec (None
    without CLIP). Auto takes CLIP when it can run here (torch and open_clip installed,
    the weights found, the device there) and says in one log line why not otherwise;
    CLIP asked for by name fails fast instead (exit 6), as does a CLIP model or checkpoint
    named in the settings that cannot be loaded."""
    if config.signals != AUTO:
        return config, resolve_clip(config)
    full = dataclasses.replace(config, signals=(*WITHOUT_CLIP, "clip"))
    try:
        return full, resolve_clip(full)
    except ModelError as e:
        default = Config()
        named = (config.clip_model, config.clip_pretrained) != (
            default.clip_model,
            default.clip_pretrained,
        )
        missing_package = isinstance(e, ClipNotInstalled)
        if named and not missing_package:
            raise
        log.info(
            "clip: off, %s. Signals %s. To turn CLIP on: %s",
            str(e).removeprefix("clip: ").split(";")[0].split(": pip")[0],
            ",".join(WITHOUT_CLIP),
            "pip install 'dedup-wds[clip]'"
            if missing_package
            else "give its weights (--clip-pretrained PATH, or in a cache looked in)",
        )
        return dataclasses.replace(config, signals=WITHOUT_CLIP), None


def resolved_config(config: Config) -> Config:
    """The settings a run here would use (what --print-config shows): `signals: auto` made
    concrete, and `workers: 0` as the worker count it means. Printing loads nothing: auto
    takes CLIP when its packages and weights are on disk (clip.weights_found; a run then
    checks that they load), and signals named are shown as named, even when a run would
    refuse them (exit 6)."""
    signals = config.signals
    if signals == AUTO:
        found = weights_found(config.clip_model, config.clip_pretrained)
        signals = (*WITHOUT_CLIP, "clip") if found else WITHOUT_CLIP
    return dataclasses.replace(config, signals=signals, workers=config.worker_count)


def resolve_clip(config: Config):
    """The CLIP weights and device for this run, found before any work starts (a missing
    checkpoint ends the run in seconds, with the remedies); None without the signal."""
    if "clip" not in config.signal_names:
        return None

    spec = resolve(config.clip_model, config.clip_pretrained)
    device = pick_device(config.device)
    decode = config.clip_decode
    if decode == "auto":
        decode = "device" if device.startswith("cuda") else "pillow"
    if decode == "device" and not device_decodes(spec):
        log.info("clip: %s's input (%s) is prepared with Pillow", spec.model, spec.pixels)
        decode = "pillow"
    # What else the vectors depend on: where JPEGs are decoded, by what, and the kind of
    # device (fp16 on a GPU, fp32 on a CPU).
    import torchvision

    route = f"decode={decode} torchvision={torchvision.__version__}"
    if decode == "device":
        route += f" device_max_pixels={DEVICE_MAX_PIXELS}"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    spec = dataclasses.replace(
        spec, decode=decode, fingerprint=f"{spec.fingerprint} {route} {kind}"
    )
    log.info(
        "clip: %s from %s on %s, JPEGs decoded by %s", spec.model, spec.checkpoint, device, decode
    )
    return spec
