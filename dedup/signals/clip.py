"""CLIP image embeddings through open_clip: weights resolved once, models set up once per
worker, images in batches, L2-normalized float16 vectors out.

torch and open_clip are imported only here, and only when the clip signal is on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from dataclasses import dataclass

import numpy as np

from dedup.core.errors import ClipNotInstalled, ModelError

HUB_HOST = ("huggingface.co", 443)
PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class ClipSpec:
    """Everything a worker needs to build the model without touching the network."""

    model: str  # open_clip model name
    config_file: str | None  # a model config JSON registered with open_clip, if custom
    checkpoint: str | None  # local weights file; None only for random weights in tests
    preprocess: tuple  # (name, value) overrides: image_mean, image_std, interpolation...
    fingerprint: str  # what the embeddings depend on
    # The model's input: (size, mean, std, interpolation, resize_mode), overrides applied;
    # what a reader needs to prepare pixels without building the model.
    pixels: tuple = ()
    decode: str = "pillow"  # where JPEGs are decoded: "pillow" (reader CPUs) or "device"


def _remedy(model: str) -> str:
    return (
        f"pass --clip-pretrained PATH to a local {model} checkpoint, "
        "or run without CLIP: --signals exact,phash,views"
    )


def resolve(model: str, pretrained: str) -> ClipSpec:
    """Find the weights for `model` and `pretrained` (an open_clip tag or a checkpoint path)
    without downloading unless the hub answers; raise ModelError with the remedies.

    What is missing is found before torch is imported (seconds): the packages first, then
    the weights in the caches open_clip downloads to, so a run without them pays nothing."""
    _check_installed()
    if _is_tag(model, pretrained):
        places = weight_caches()
        if not any(_holds_weights(place) for place in places) and not _hub_reachable():
            raise ModelError(
                f"clip: weights {model}/{pretrained} are not in the local cache (looked in "
                f"{' and '.join(places)}) and the model hub cannot be reached; {_remedy(model)}"
            )
    try:
        import open_clip
        import torch
    except ImportError as e:  # found, but broken
        raise ClipNotInstalled(_not_installed(e.name)) from None
    # This process forks the workers of every later phase. Once torch has run a parallel
    # region on more than one thread, its OpenMP pool is part of the process, and a
    # forked child that enters OpenMP (FAISS's searches do) hangs on threads it does not
    # have. Building the model below would start that pool; one thread never does.
    torch.set_num_threads(1)
    config_file = None
    name = model
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise ModelError(f"clip: model config {model} not found")
        config_file = os.path.abspath(model)
        try:
            with open(config_file, encoding="utf-8") as fh:
                json.load(fh)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"clip: model config {model} is not a readable JSON file ({e})"
            ) from None
        open_clip.add_model_config(config_file)
        name = os.path.splitext(os.path.basename(model))[0]
    if name not in open_clip.list_models():
        raise ModelError(
            f"clip: unknown model {model!r}; see open_clip.list_models() or pass a config JSON"
        )
    preprocess: dict = {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        for key in ("mean", "std"):
            if key in tag_cfg:
                preprocess[f"image_{key}"] = tuple(tag_cfg[key])
        for key in ("interpolation", "resize_mode"):
            if key in tag_cfg:
                preprocess[f"image_{key}"] = tag_cfg[key]
        checkpoint = _cached_weights(tag_cfg)
        if checkpoint is None:
            if not _hub_reachable():
                raise ModelError(
                    f"clip: weights {name}/{pretrained} are not in the local cache and the "
                    f"model hub cannot be reached; {_remedy(name)}"
                )
            try:
                checkpoint = open_clip.download_pretrained(tag_cfg)
            except Exception as e:
                raise ModelError(
                    f"clip: downloading {name}/{pretrained} failed ({e}); {_remedy(name)}"
                ) from None
    elif os.path.isfile(pretrained):
        checkpoint = os.path.abspath(pretrained)
    else:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelError(
            f"clip: {pretrained!r} is neither a checkpoint file nor an open_clip tag of "
            f"{name} (tags: {tags}); {_remedy(name)}"
        )
    pixels = _check_loads(name, checkpoint, preprocess)
    st = os.stat(checkpoint)
    fingerprint = json.dumps(
        {
            "model": name,
            "config": _file_text(config_file),
            "checkpoint": [os.path.realpath(checkpoint), st.st_size, st.st_mtime_ns],
            "preprocess": preprocess,
            "versions": [open_clip.__version__, torch.__version__],
        },
        sort_keys=True,
    )
    return ClipSpec(
        name, config_file, checkpoint, tuple(sorted(preprocess.items())), fingerprint, pixels
    )


def _check_loads(name: str, checkpoint: str, overrides: dict) -> tuple:
    """Build the model on the CPU with these weights once, so a wrong or damaged file ends
    the run here, with the remedies, not later inside every worker; returns its input
    spec (see ClipSpec.pixels)."""
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=checkpoint, device="cpu")
        cfg = dict(open_clip.get_model_preprocess_cfg(model))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"clip: {checkpoint} does not load into {name} ({first[:200]}); {_remedy(name)}"
        ) from None
    for key, value in overrides.items():
        cfg[key.removeprefix("image_")] = value
    size = cfg.get("size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return (
        size,
        tuple(float(v) for v in cfg.get("mean", OPENAI_MEAN)),
        tuple(float(v) for v in cfg.get("std", OPENAI_STD)),
        cfg.get("interpolation") or "bicubic",
        cfg.get("resize_mode") or "shortest",
    )


# open_clip's defaults, when a model config names none.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _file_text(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read()


CLIP_PACKAGES = ("torch", "torchvision", "open_clip")  # dedup-wds[clip]


def _not_installed(name: str | None) -> str:
    return (
        f"clip: needs torch and open_clip (cannot import {name}): "
        "pip install 'dedup-wds[clip]', or run without CLIP: --signals exact,phash,views"
    )


def _check_installed() -> None:
    """ClipNotInstalled unless torch, torchvision and open_clip can be found (not imported)."""
    for name in CLIP_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ClipNotInstalled(_not_installed(name))


def weights_found(model: str, pretrained: str) -> bool:
    """Whether CLIP looks runnable here, from what is on disk alone: its packages are
    installed and its weights are at the path given or, for an open_clip tag, some
    cache holds weights. No import of torch, no network, no error (a run checks it all:
    resolve)."""
    try:
        _check_installed()
    except ClipNotInstalled:
        return False
    if _is_tag(model, pretrained):
        return any(_holds_weights(place) for place in weight_caches())
    return os.path.isfile(pretrained)


def _is_tag(model: str, pretrained: str) -> bool:
    """Whether `pretrained` names weights open_clip downloads for one of its built-in
    models (whose configs it ships as JSON files), not a checkpoint file; anything else
    is left to open_clip itself to judge."""
    path_like = os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
    if path_like or os.path.isfile(pretrained) or os.sep in model:
        return False
    package = importlib.util.find_spec("open_clip")
    folders = (package.submodule_search_locations or []) if package else []
    return any(os.path.isfile(os.path.join(f, "model_configs", f"{model}.json")) for f in folders)


def weight_caches() -> list[str]:
    """Where open_clip puts the weights of a pretrained tag it downloads: the Hugging Face
    hub cache, and ~/.cache/clip for those it fetches by URL."""
    from huggingface_hub import constants

    return [constants.HF_HUB_CACHE, os.path.expanduser("~/.cache/clip")]


WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def _holds_weights(folder: str) -> bool:
    """Whether a cache folder holds any weights file at all: when none does, no tag's
    weights are there, and open_clip (which imports torch) need not be asked which."""
    for _, _, files in os.walk(folder):
        if any(name.endswith(WEIGHT_SUFFIXES) for name in files):
            return True
    return False


def _cached_weights(tag_cfg: dict) -> str | None:
    """The local file of a pretrained tag, if a download already put it in a cache."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo, filename = os.path.split(hub)
        for name in (
            [filename]
            if filename
            else ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        ):
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = tag_cfg.get("url", "")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return path if os.path.isfile(path) else None
    return None


def _hub_reachable() -> bool:
    """A short TCP probe, so an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def pick_device(device: str) -> str:
    """`auto` is the first GPU when torch sees one, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"clip: device {device} asked for, but torch sees no GPU")
    return device


def stage_devices(device: str) -> list[str]:
    """The devices that each get one CLIP stage: every visible GPU for `cuda` (and for
    `auto` when torch sees one), the one named by `cuda:N`, else the CPU."""
    import torch

    picked = pick_device(device)
    if picked == "cpu":
        return ["cpu"]
    count = torch.cuda.device_count()
    if picked == "cuda":
        return [f"cuda:{i}" for i in range(count)]
    index = picked.split(":", 1)[1]
    if not index.isdigit() or int(index) >= count:
        raise ModelError(f"clip: device {device}: torch sees {count} GPU(s) (cuda:0..)")
    return [picked]


class Embedder:
    """One model in one process; `embed` takes decoded images, returns (N, dim) float16."""

    _cache: dict = {}

    def __init__(self, spec: ClipSpec, device: str):
        import open_clip
        import torch

        if spec.config_file:
            open_clip.add_model_config(spec.config_file)
        if device == "cpu":
            torch.set_num_threads(1)  # one worker process per core already
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=spec.checkpoint, device=device, **dict(spec.preprocess)
            )
        except Exception as e:  # resolve() loaded it once already; a device can still fail
            raise ModelError(f"clip: cannot set up {spec.model} on {device} ({e})") from None
        model.eval()
        self.model = model
        self.preprocess = preprocess
        self.device = device
        self.torch = torch
        size = model.visual.image_size
        self.image_size = max(size) if isinstance(size, (tuple, list)) else int(size)
        # open_clip's own towers know their output size; timm towers (EVA, ConvNeXt...) do
        # not, and the model config's embed_dim is the same number.
        dim = getattr(model.visual, "output_dim", None)
        if dim is None:
            dim = (open_clip.get_model_config(spec.model) or {}).get("embed_dim")
        if dim is None:
            with torch.inference_mode():
                probe = torch.zeros(1, 3, self.image_size, self.image_size, device=device)
                dim = model.encode_image(probe).shape[-1]
        self.output_dim = int(dim)

    @classmethod
    def get(cls, spec: ClipSpec, device: str) -> Embedder:
        """The process's embedder for this spec, built on first use."""
        key = (spec, device)
        if key not in cls._cache:
            cls._cache[key] = cls(spec, device)
        return cls._cache[key]

    def embed(self, images: list) -> np.ndarray:
        """Pillow images through open_clip's own transform and the model."""
        batch = self.torch.stack([self.preprocess(img) for img in images])
        return self.embed_tensor(batch)

    def embed_tensor(self, batch) -> np.ndarray:
        """A normalized (N, 3, size, size) batch in, (N, dim) unit float16 vectors out; fp16
        on a GPU."""
        torch = self.torch
        batch = batch.to(self.device)
        with torch.inference_mode():
            if self.device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.float16):
                    vectors = self.model.encode_image(batch)
            else:
                vectors = self.model.encode_image(batch)
            vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
        return vectors.cpu().numpy().astype(np.float16)
