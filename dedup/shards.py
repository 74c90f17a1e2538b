"""Find input shards and stream their samples: (shard, key, members) in tar order."""

from __future__ import annotations

import glob
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from braceexpand import braceexpand

from dedup.errors import InputError, ShardError

SHARD_SUFFIX = ".tar"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Shard:
    """One input shard: `path` as listed (used in reports) and `name`, its output file name."""

    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class Member:
    """One regular tar member: its full name inside the tar and its bytes."""

    name: str
    data: bytes


@dataclass
class Sample:
    """Members sharing a key, in tar order; `index` is the sample's position in its shard."""

    key: str
    index: int
    offset: int
    members: list[Member] = field(default_factory=list)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's key rule: `a/b/c.d.jpg` -> (`a/b/c`, `d.jpg`); no dot -> (name, "")."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def list_shards(inputs: list[str]) -> list[Shard]:
    """Expand directories (their *.tar, sorted), globs and brace patterns into shards."""
    if not inputs:
        raise InputError("no input given: name shard files, directories, globs or brace patterns")
    paths: list[str] = []
    for spec in inputs:
        if "://" in spec:
            raise InputError(f"{spec}: URLs are not supported yet; copy the shards to local disk")
        for item in braceexpand(spec):
            paths.extend(_expand_one(item))
    seen: dict[str, str] = {}
    names: dict[str, str] = {}
    shards = []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise InputError(f"{path}: the same shard is listed twice (also as {seen[real]})")
        seen[real] = path
        name = os.path.basename(path)
        if name in names:
            raise InputError(
                f"{path}: shares the file name {name!r} with {names[name]}; "
                "output shards keep input names, so they would collide"
            )
        names[name] = path
        shards.append(Shard(path))
    return shards


def _expand_one(item: str) -> list[str]:
    if os.path.isdir(item):
        found = sorted(
            os.path.join(item, n)
            for n in os.listdir(item)
            if n.endswith(SHARD_SUFFIX) and os.path.isfile(os.path.join(item, n))
        )
        if not found:
            raise InputError(f"{item}: directory holds no *{SHARD_SUFFIX} shards")
        return found
    if _GLOB_CHARS & set(item):
        found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        if not found:
            raise InputError(f"{item}: pattern matches no files")
        return [_check_shard_file(p) for p in found]
    if not os.path.exists(item):
        raise InputError(f"{item}: no such file or directory")
    return [_check_shard_file(item)]


def _check_shard_file(path: str) -> str:
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file")
    if not path.endswith(SHARD_SUFFIX):
        raise InputError(
            f"{path}: not a {SHARD_SUFFIX} shard (compressed shards are not supported)"
        )
    return path


def iter_samples(shard: Shard, skipped: Counter | None = None) -> Iterator[Sample]:
    """Stream a shard's samples in tar order.

    Non-regular members (directories, links, devices) carry no sample data; they are
    counted in `skipped` by type and never followed. Structural damage raises ShardError.
    """
    try:
        fh = open(shard.path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise ShardError(shard.path, f"cannot open ({e.strerror or e})") from None
    with fh:
        yield from _iter_open_shard(shard, fh, skipped if skipped is not None else Counter())


def _iter_open_shard(shard: Shard, fh, skipped: Counter) -> Iterator[Sample]:
    finished: set[str] = set()
    current: Sample | None = None
    offset = 0
    try:
        tar = tarfile.open(fileobj=fh, mode="r|")  # noqa: SIM115 (closed in finally)
    except tarfile.ReadError as e:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ShardError(shard.path, "empty file, not a tar archive") from None
        raise ShardError(shard.path, f"not a readable tar archive ({e})", 0) from None
    index = 0
    try:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError) as e:
                raise ShardError(shard.path, f"damaged tar header ({e})", tar.offset) from None
            if info is None:
                break
            offset = info.offset
            if not info.isreg():
                skipped[_member_kind(info)] += 1
                continue
            try:
                reader = tar.extractfile(info)
                data = reader.read() if reader is not None else b""
            except (tarfile.TarError, EOFError, OSError) as e:
                raise ShardError(
                    shard.path, f"member {info.name!r} is truncated ({e})", offset
                ) from None
            if len(data) != info.size:
                raise ShardError(shard.path, f"member {info.name!r} is truncated", offset)
            key, _ = split_member_name(info.name)
            if current is None or key != current.key:
                if current is not None:
                    finished.add(current.key)
                    yield current
                    index += 1
                if key in finished:
                    raise ShardError(
                        shard.path,
                        f"members of sample {key!r} are not adjacent "
                        f"(member {info.name!r} comes after another sample)",
                        offset,
                    )
                current = Sample(key=key, index=index, offset=offset)
            elif any(m.name == info.name for m in current.members):
                raise ShardError(
                    shard.path, f"sample {key!r} has the member {info.name!r} twice", offset
                )
            current.members.append(Member(info.name, data))
        _check_end_of_archive(shard, fh, tar.offset)
    finally:
        tar.close()
    if current is not None:
        yield current


def _check_end_of_archive(shard: Shard, fh, end: int) -> None:
    """tarfile stops quietly at a damaged header; make sure what follows is the zero trailer."""
    size = os.fstat(fh.fileno()).st_size
    if end >= size:
        if end > size:
            raise ShardError(shard.path, "tar is truncated", size)
        raise ShardError(shard.path, "tar ends without its end-of-archive blocks (truncated?)", end)
    fh.seek(end)
    while True:
        block = fh.read(1 << 16)
        if not block:
            return
        if block.count(0) != len(block):
            raise ShardError(shard.path, "damaged tar header (not a valid member)", end)


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "directory"
    if info.issym() or info.islnk():
        return "link"
    if info.isdev():
        return "device"
    return "other"
