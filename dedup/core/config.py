"""Run settings: one frozen dataclass, loaded from YAML, overridden by flags, fingerprinted."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from dedup.core.errors import ConfigError

KNOWN_SIGNALS = ("exact", "phash", "views", "clip")  # dedup.signals.REGISTRY's built-ins
# Signals a plugin registered (dedup.signals.register adds their names here): they may be
# named in `signals`; `auto` never turns them on.
PLUGIN_SIGNALS: list[str] = []
PLUGIN_ERRORS: dict[str, str] = {}  # a plugin that failed to load: why (named: exit 2)


def signal_choices() -> tuple[str, ...]:
    """Every signal a config may name: the built-ins, then the plugins'."""
    return (*KNOWN_SIGNALS, *PLUGIN_SIGNALS)


# `signals: auto` (the default): every signal that can run here. CLIP when torch and
# open_clip are installed (dedup-wds[clip]) and its weights are found; else the others,
# with one log line saying why (dedup.commands.run.choose_signals).
AUTO = ("auto",)
WITHOUT_CLIP = ("exact", "phash", "views")
# The keep policy's criteria (dedup.signals.keep says what each measures), best first;
# `largest` and `first` alone are the old rules. keep_by adds json:FIELD[:asc|desc].
KEEP_CRITERIA = ("clean", "content", "hub", "quality", "typical", "noise", "first", "largest")
DEFAULT_KEEP = ("clean", "content", "quality", "hub", "typical", "noise", "first")
CLUSTER_RULES = ("star", "components")
CLIP_INDEXES = ("auto", "flat", "ivf")
CLIP_DECODES = ("auto", "device", "pillow")
CLIP_STAGES = ("auto", "inline", "shared")
FINGERPRINTS = ("stat", "content")
EXECUTORS = ("local", "ray")
DIGESTS = ("blake3", "sha256")  # of image bytes, for the exact signal


@dataclass(frozen=True)
class Config:
    """Every setting that changes what dedup computes or keeps.

    Defaults here are the product defaults; `configs/default.yaml` lists them all and a
    test keeps the two equal.
    """

    signals: tuple[str, ...] = AUTO
    phash_threshold: int = 8
    phash_draft: bool = True
    # The views signal (several hashes per image: trimmed, cropped, mirrored): the two full
    # frames are linked within phash_threshold bits, a trimmed frame, crop or mirror within
    # views_threshold; pairs up to verify_threshold, the grey zone, are checked by local
    # features when `verify` is on, the verify_per_image nearest of either image. 0: the
    # bound follows the data's size (views.grey_bound: few unrelated candidates per image).
    views_threshold: int = 4
    verify: bool = True
    verify_threshold: int = 0
    verify_per_image: int = 4
    exact_digest: str = "blake3"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    clip_threshold: float = 0.94
    clip_index: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    # Where CLIP's JPEGs are decoded and resized: on the model's device (torchvision; the
    # default on a GPU) or by the readers with Pillow (the default on a CPU). See README.
    clip_decode: str = "auto"
    # Where the model runs: `shared`, one process per device fed by every reader (the
    # default on a GPU); `inline`, in each reader (the default on a CPU).
    clip_stage: str = "auto"
    keep: tuple[str, ...] = DEFAULT_KEEP
    # Criteria ranked before `keep`: json:FIELD[:asc|desc], a number in the JSON sidecar.
    keep_by: tuple[str, ...] = ()
    cluster_rule: str = "star"
    # Canaries: edited copies of this many sampled images, planted virtually; the run
    # reports the share each signal catches, per edit (never written, never decisive).
    canaries: int = 0
    # Seed of every random choice (calibrate's sample and edits, the canaries).
    seed: int = 0
    # Reference sets the input is matched against (shard sets, image folders, earlier
    # OUTs, `dedup index` indexes): a sample matching one is removed (reason reference).
    against: tuple[str, ...] = ()
    # Lists of image digests and pHash codes whose matches are removed (reason blocklist).
    blocklist: tuple[str, ...] = ()
    workers: int = 0
    executor: str = "local"
    ray_address: str = ""
    partition_rows: int = 2_000_000
    max_pixels: int = 100_000_000
    fingerprint: str = "stat"
    image_extensions: tuple[str, ...] = (
        "jpg",
        "jpeg",
        "png",
        "webp",
        "gif",
        "bmp",
        "tif",
        "tiff",
    )
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")

    def __post_init__(self) -> None:
        # A value of the wrong type from Python (Config(phash_threshold="8")) is the same
        # one-line ConfigError naming the field as one from YAML, not a TypeError below.
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if not self.signals:
            known = ", ".join(signal_choices())
            raise ConfigError(f"signals: at least one signal is needed ({known})")
        if "auto" in self.signals and self.signals != AUTO:
            raise ConfigError("signals: auto stands alone (every signal that can run here)")
        for name in self.signals if self.signals != AUTO else ():
            if name in PLUGIN_ERRORS:
                raise ConfigError(PLUGIN_ERRORS[name])
            if name not in signal_choices():
                raise ConfigError(
                    f"signals: unknown signal {name!r}; known: {', '.join(signal_choices())}"
                )
        if len(set(self.signals)) != len(self.signals):
            raise ConfigError(f"signals: listed twice in {','.join(self.signals)}")
        if not 0 <= self.phash_threshold <= 32:
            raise ConfigError(
                f"phash_threshold: {self.phash_threshold} is outside 0..32 (bits of 64)"
            )
        if not 0 <= self.views_threshold <= 24:
            raise ConfigError(
                f"views_threshold: {self.views_threshold} is outside 0..24 (bits of 64)"
            )
        if self.verify_threshold and not self.views_threshold <= self.verify_threshold <= 24:
            raise ConfigError(
                f"verify_threshold: {self.verify_threshold} is outside "
                f"views_threshold..24 ({self.views_threshold}..24 bits of 64), or 0 (auto)"
            )
        if self.verify_per_image < 1:
            raise ConfigError(f"verify_per_image: {self.verify_per_image} must be at least 1")
        if self.exact_digest not in DIGESTS:
            raise ConfigError(
                f"exact_digest: {self.exact_digest!r} is not one of {', '.join(DIGESTS)}"
            )
        if not 0.0 < self.clip_threshold <= 1.0:
            raise ConfigError(f"clip_threshold: {self.clip_threshold} is outside (0, 1] (cosine)")
        if self.clip_index not in CLIP_INDEXES:
            raise ConfigError(
                f"clip_index: {self.clip_index!r} is not one of {', '.join(CLIP_INDEXES)}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.clip_decode not in CLIP_DECODES:
            raise ConfigError(
                f"clip_decode: {self.clip_decode!r} is not one of {', '.join(CLIP_DECODES)}"
            )
        if self.clip_stage not in CLIP_STAGES:
            raise ConfigError(
                f"clip_stage: {self.clip_stage!r} is not one of {', '.join(CLIP_STAGES)}"
            )
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size: {self.batch_size} must be positive")
        if self.cluster_rule not in CLUSTER_RULES:
            raise ConfigError(
                f"cluster_rule: {self.cluster_rule!r} is not one of {', '.join(CLUSTER_RULES)}"
            )
        if isinstance(self.keep, str):  # Config(keep="first") from Python
            object.__setattr__(self, "keep", tuple(k.strip() for k in self.keep.split(",")))
        if not self.keep:
            raise ConfigError(
                f"keep: at least one criterion is needed ({', '.join(KEEP_CRITERIA)})"
            )
        for name in self.keep:
            if name not in KEEP_CRITERIA:
                raise ConfigError(
                    f"keep: unknown criterion {name!r}; known: {', '.join(KEEP_CRITERIA)} "
                    "(a JSON field: keep_by json:FIELD[:asc|desc])"
                )
        if len(set(self.keep)) != len(self.keep):
            raise ConfigError(f"keep: a criterion listed twice in {','.join(self.keep)}")
        if isinstance(self.keep_by, str):
            object.__setattr__(self, "keep_by", (self.keep_by,) if self.keep_by else ())
        for spec in self.keep_by:
            keep_by_field(spec)  # raises naming what is wrong
        if len({keep_by_field(s)[0] for s in self.keep_by}) != len(self.keep_by):
            raise ConfigError("keep_by: a field listed twice")
        if self.workers < 0:
            raise ConfigError(f"workers: {self.workers} is negative (0 means all cores)")
        if self.executor not in EXECUTORS:
            raise ConfigError(
                f"executor: {_short(self.executor)} is not one of {', '.join(EXECUTORS)}"
            )
        if self.partition_rows <= 0:
            raise ConfigError(f"partition_rows: {self.partition_rows} must be positive")
        if self.fingerprint not in FINGERPRINTS:
            raise ConfigError(
                f"fingerprint: {self.fingerprint!r} is not one of {', '.join(FINGERPRINTS)}"
            )
        if self.canaries < 0:
            raise ConfigError(f"canaries: {self.canaries} is negative")
        if self.seed < 0:
            raise ConfigError(f"seed: {self.seed} is negative")
        if self.max_pixels <= 0:
            raise ConfigError(f"max_pixels: {self.max_pixels} must be positive")

    @property
    def signal_names(self) -> tuple[str, ...]:
        """The signals turned on: `signals`, or for `auto` every signal (a run first
        chooses those that can run here: dedup.commands.run.choose_signals)."""
        return KNOWN_SIGNALS if self.signals == AUTO else self.signals

    @functools.cached_property
    def image_extension_set(self) -> frozenset[str]:
        """`image_extensions`, lower-cased, for a membership test per tar member."""
        return frozenset(e.lower() for e in self.image_extensions)

    @property
    def worker_count(self) -> int:
        """Worker processes to use: `workers`, or when it is 0 the CPUs this process may
        use (its affinity, and a container's CPU quota), not the host's."""
        return self.workers or available_cpus()

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and YAML-ready settings (tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the CPUs of its affinity mask (`taskset`, a cpuset),
    capped by a CFS quota (a container's `--cpus`; cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def keep_by_field(spec: str) -> tuple[str, bool]:
    """(field, descending) of a keep_by spec `json:FIELD[:asc|desc]`; a ConfigError naming
    the spec otherwise. FIELD may go into objects with dots (scores.aesthetic)."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != "json" or not parts[1] or not all(parts[1].split(".")):
        raise ConfigError(f"keep_by: {spec!r} is not json:FIELD[:asc|desc]")
    if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("asc", "desc")):
        raise ConfigError(f"keep_by: {spec!r}: the order is asc or desc")
    return parts[1], not (len(parts) == 3 and parts[2] == "asc")


def _cgroup_quota(root: str) -> float | None:
    """CPUs the cgroup's quota allows (quota / period), None when unlimited or unknown."""
    try:
        with open(os.path.join(root, "cpu.max")) as fh:  # v2: "max 100000" or "200000 100000"
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as fh:  # v1
            quota_us = int(fh.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as fh:
            period_us = int(fh.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def settings_digest(obj: Any) -> str:
    """A short, stable hash of JSON-ready settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or flag value into the field's type, or raise a one-line ConfigError."""
    kind = _FIELD_TYPES[name]
    value_text = _short(value)
    if kind.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of names, got {value_text}")
        return tuple(value)
    # numbers.Integral and Real: numpy's scalars too (a threshold from a numpy sweep).
    if kind == "int":
        if _is_bool(value) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name}: expected a whole number, got {value_text}")
        return int(value)
    if kind == "float":
        if _is_bool(value) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name}: expected a number, got {value_text}")
        return float(value)
    if kind == "bool":
        if not _is_bool(value):
            raise ConfigError(f"{name}: expected true or false, got {value_text}")
        return bool(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected text, got {value_text}")
        return value
    raise AssertionError(f"unhandled config type {kind} for {name}")


def _is_bool(value: Any) -> bool:
    """Python's bool or numpy's (which is no int subclass)."""
    return isinstance(value, (bool, np.bool_))


def _short(value: Any) -> str:
    """A value for an error message: a YAML alias bomb must not be expanded into it."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxstring, short.maxother = 2, 4, 60, 60
    return short.repr(value)


CONFIG_MAX_BYTES = 1 << 20  # a settings file; anything larger is not one


def _read_text(path: str) -> str:
    """A config file's text: a regular file (a FIFO or a device is never opened for a
    blocking read, nor read without end), at most CONFIG_MAX_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config {path}: not a regular file")
        if st.st_size > CONFIG_MAX_BYTES:
            raise ConfigError(f"config {path}: larger than {CONFIG_MAX_BYTES} bytes")
        os.set_blocking(fd, True)
        data = fh.read(CONFIG_MAX_BYTES + 1)
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(f"config {path}: larger than {CONFIG_MAX_BYTES} bytes")
    return data.decode("utf-8")


def _parse(text: str) -> tuple[Any, dict[str, int]]:
    """A YAML document's value (as yaml.safe_load gives it) and the line (1-based) of
    each top-level key, for error messages: one parse, the values built from its nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        value = None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {
            str(key.value): key.start_mark.line + 1
            for key, _ in node.value
            if isinstance(key, yaml.ScalarNode)
        }
    return value, lines


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `overrides` (None values are ignored).
    An error in the file names it, with the line (and column) where YAML or the setting
    went wrong: `config FILE:LINE: setting: ...`."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        try:
            loaded, lines = _parse(_read_text(path))
        except OSError as e:
            raise ConfigError(f"config {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {path}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config {where}: not valid YAML ({problem})") from None
        except RecursionError:
            raise ConfigError(f"config {path}: nested too deeply to be a dedup config") from None
        except ValueError as e:  # e.g. an integer of thousands of digits
            raise ConfigError(f"config {path}: {str(e)[:200]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: expected a mapping of settings")
        for name, value in loaded.items():
            where = f"{path}:{lines[str(name)]}" if str(name) in lines else path
            if name not in _FIELD_TYPES:
                import difflib

                close = difflib.get_close_matches(str(name), list(_FIELD_TYPES), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"config {where}: unknown setting {_short(name)}; {hint}"
                    "`dedup --print-config` lists every setting"
                )
            try:
                values[name] = _coerce(name, value)
            except ConfigError as e:
                raise ConfigError(f"config {where}: {e}") from None
    from_file = set(values)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
            from_file.discard(name)
    try:
        return Config(**values)
    except ConfigError as e:
        # A value the file set and no flag replaced: say where it came from.
        name = str(e).split(":", 1)[0]
        if path is None or name not in from_file:
            raise
        where = f"{path}:{lines[name]}" if name in lines else path
        raise ConfigError(f"config {where}: {e}") from None


def dump_config(config: Config) -> str:
    """The config as YAML, in field order."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
