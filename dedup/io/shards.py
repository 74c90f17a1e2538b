"""Find input shards and stream their samples: (shard, key, members) in tar order."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import blake3
from braceexpand import braceexpand

from dedup.core.errors import InputError, ShardError
from dedup.io import storage, tarscan
from dedup.io.fsutil import (
    FileTooLarge,
    NotARegularFile,
    atomic_path,
    check_regular,
    open_regular,
    read_regular_file,
)

SHARD_SUFFIX = ".tar"
READ_CHUNK = 1 << 22  # what a forward read hands over at most
_GLOB_CHARS = set("*?[")
# A file of a FileGroup larger than this is counted `too_large` and never read: a
# 100-megapixel image (max_pixels' default) is 400 MB even as uncompressed RGBA.
MAX_FILE_BYTES = 1 << 30
# The folder in OUT's state (OUT/.dedup/spool) where a run keeps the bytes of its pipe:
# inputs, read once, until the run ends.
SPOOL_DIR = "spool"
# OUT's state folder and the job file in it that marks a folder as dedup's OUT (outdir.py
# uses them; they are here so that a folder's scan knows an OUT named *.tar inside it).
STATE_DIR = ".dedup"
JOB_FILE = "job.json"


@dataclass(frozen=True)
class Shard:
    """One input shard: `path` as listed (used in reports) and `name`, its output file name.

    `spool`: where this run keeps a pipe: input's bytes, read once (see spool_shard); a
    shard is the same shard with or without it."""

    path: str
    spool: str | None = field(default=None, compare=False, kw_only=True)

    @property
    def name(self) -> str:
        return storage.basename(self.path)

    @property
    def is_url(self) -> bool:
        return storage.is_url(self.path)

    @property
    def read_path(self) -> str:
        """Where the shard's bytes are read: its spool once it has one, else its path.
        Every reader of a shard's bytes reads here, never `path` directly."""
        return self.spool or self.path


def is_pipe(shard: Shard) -> bool:
    """Whether the shard is a pipe: command's output, known only by its bytes."""
    return shard.path.startswith(storage.PIPE)


def spool_shard(shard: Shard, folder: str) -> tuple[Shard, str]:
    """Run a pipe: shard's command once, keeping its output under `folder` (a path or a
    URL, written atomically): the shard that reads it there, and the BLAKE3 of those
    bytes, hashed as they stream. A command's output may differ on every invocation;
    what a run decides on and what it writes come from this one read."""
    name = hashlib.sha256(shard.path.encode("utf-8", "surrogateescape")).hexdigest()
    final = storage.join(folder, name + SHARD_SUFFIX)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    try:
        with (
            storage.open_stream(shard.path) as stream,
            atomic_path(final) as tmp,
            open(tmp, "wb") as out,
        ):
            for chunk in storage.iter_chunks(stream):
                hasher.update(chunk)
                out.write(chunk)
    except OSError as e:
        raise ShardError(shard.path, f"cannot read ({e.strerror or e})") from None
    return dataclasses.replace(shard, spool=final), hasher.hexdigest()


def remove_spool(folder: str) -> None:
    """Delete a run's spool folder (a path or a URL) and every input's bytes in it."""
    storage.remove_tree(folder)


@dataclass(frozen=True)
class FileGroup(Shard):
    """Plain image files under a folder (an evaluation set kept as files), read as a shard
    is: each file one sample whose key and only member are its path relative to `root`.
    Only ever read (a reference: --against), never written."""

    root: str = ""
    files: tuple[str, ...] = ()  # relative paths, sorted

    @staticmethod
    def of(root: str, files: list[str], number: int) -> FileGroup:
        return FileGroup(f"{root}#files-{number:06d}", root, tuple(files))

    def file(self, relative: str) -> str:
        return os.path.join(self.root, relative)


def read_ranges_of(shard: Shard, names: list[str], ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of members (`names`, at (offset, size) `ranges`) of a shard, or of the
    files of a FileGroup."""
    if not isinstance(shard, FileGroup):
        return storage.read_ranges(shard.read_path, ranges)
    out = []
    for name, (offset, size) in zip(names, ranges, strict=True):
        fd = open_regular(shard.file(name))  # never a FIFO or device swapped in since
        try:
            out.append(os.pread(fd, size, offset))
        finally:
            os.close(fd)
    return out


@dataclass
class Member:
    """One regular tar member: its name, where its data starts in the shard, its size, and
    its bytes (None when the reader was asked not to hold them)."""

    name: str
    offset: int
    size: int
    data: bytes | None


@dataclass
class Sample:
    """Members sharing a key, in tar order; `index` is the sample's position in its shard
    and `offset` the byte offset of its first member's header."""

    key: str
    index: int
    offset: int
    members: list[Member] = field(default_factory=list)


# Per-shard files img2dataset writes beside each tar (`00000.tar`: `00000.parquet`, one row
# per sample it tried, and `00000_stats.json`); dedup carries them to OUT, filtered.
SIDECAR_SUFFIXES = (".parquet", "_stats.json")


def sidecars(shard: Shard) -> list[str]:
    """The img2dataset sidecar files beside a shard that exist (paths or URLs)."""
    if isinstance(shard, FileGroup) or is_pipe(shard):
        return []
    stem = shard.path[: -len(SHARD_SUFFIX)] if shard.path.endswith(SHARD_SUFFIX) else None
    if stem is None:
        return []
    found = []
    for suffix in SIDECAR_SUFFIXES:
        path = stem + suffix
        try:
            exists = storage.exists(path, InputError) if shard.is_url else os.path.isfile(path)
        except InputError:
            exists = False
        if exists:
            found.append(path)
    return found


def shard_size(shard: Shard) -> int:
    """The shard's size in bytes, 0 when it cannot be had (progress only)."""
    if isinstance(shard, FileGroup):
        files = [shard.file(f) for f in shard.files]
        return sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    try:
        return storage.size(shard.path) if shard.is_url else os.path.getsize(shard.path)
    except (OSError, InputError):
        return 0


def raw_name(name: str) -> bytes:
    """The exact bytes of a member name as the tar held them (see tarscan)."""
    return name.encode("utf-8", "surrogateescape")


def display_name(name: str) -> str:
    """A name as valid UTF-8 text for reports: bytes that are not UTF-8 become \\xNN."""
    return raw_name(name).decode("utf-8", "backslashreplace")


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's key rule: `a/b/c.d.jpg` -> (`a/b/c`, `d.jpg`); no dot -> (name, "")."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def list_shards(inputs: list[str]) -> list[Shard]:
    """Expand directories (their *.tar, sorted), globs and brace patterns into shards.

    A path that exists is taken literally, before any brace or glob expansion: a shard
    named `x[1].tar` or `a{b}.tar` is itself, not a pattern. So is a URL that names an
    object or a prefix (storage.list_url).
    """
    if not inputs:
        raise InputError("no input given: name shard files, directories, globs or brace patterns")
    paths: list[str] = []
    for spec in inputs:
        if storage.is_url(spec):
            found = [_check_shard_name(url) for url in storage.list_url(spec)]
            if not found:
                raise InputError(f"{spec}: names no *{SHARD_SUFFIX} shards")
            paths.extend(found)
            continue
        if os.path.lexists(spec):
            paths.extend(_expand_one(spec, literal=True))
            continue
        for item in braceexpand(spec):
            paths.extend(_expand_one(item))
    seen: dict[str, str] = {}
    names: dict[str, str] = {}
    shards = []
    for path in paths:
        real = path if storage.is_url(path) else os.path.realpath(path)
        if real in seen:
            raise InputError(f"{path}: the same shard is listed twice (also as {seen[real]})")
        seen[real] = path
        name = Shard(path).name
        if name in names:
            raise InputError(
                f"{path}: shares the file name {name!r} with {names[name]}; "
                "output shards keep input names, so they would collide"
            )
        names[name] = path
        shards.append(Shard(path))
    return shards


def is_dedup_out(path: str) -> bool:
    """Whether a local path is a folder that a dedup run made as its OUT: its state
    folder is there (made first, before the job file, so a run killed early or one
    starting beside this listing counts too). An OUT named `clean.tar` inside a scanned
    input folder is no input shard, so the same command runs again."""
    return os.path.isdir(os.path.join(path, STATE_DIR))


def _expand_one(item: str, literal: bool = False) -> list[str]:
    if os.path.isdir(item):
        try:
            names = os.listdir(item)
        except OSError as e:
            raise InputError(f"{item}: cannot list ({e.strerror or e})") from None
        found = sorted(
            os.path.join(item, n)
            for n in names
            if n.endswith(SHARD_SUFFIX) and not is_dedup_out(os.path.join(item, n))
        )
        if not found:
            raise InputError(f"{item}: directory holds no *{SHARD_SUFFIX} shards")
        return [_check_shard_file(p) for p in found]
    if not literal and _GLOB_CHARS & set(item):
        # A match that is a dangling link or not a file is an error, not a silent skip.
        found = sorted(glob.glob(item))
        if not found:
            raise InputError(f"{item}: pattern matches no files")
        return [_check_shard_file(p) for p in found if not os.path.isdir(p)]
    if not os.path.lexists(item):
        raise InputError(f"{item}: no such file or directory")
    return [_check_shard_file(item)]


def _check_shard_name(url: str) -> str:
    if not storage.basename(url).endswith(SHARD_SUFFIX):
        raise InputError(
            f"{url}: not a {SHARD_SUFFIX} shard (the name must end in {SHARD_SUFFIX}; "
            "for pipe: the last word of the command)"
        )
    return url


def _check_shard_file(path: str) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{path}: a symbolic link to a file that does not exist")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file")
    if not path.endswith(SHARD_SUFFIX):
        raise InputError(
            f"{path}: not a {SHARD_SUFFIX} shard (compressed shards are not supported)"
        )
    return path


def iter_samples(
    shard: Shard, skipped: Counter | None = None, keep: Callable[[str], bool] | None = None
) -> Iterator[Sample]:
    """Stream a shard's samples in tar order.

    Non-regular members (directories, links, devices) carry no sample data; they are
    counted in `skipped` by kind and never followed. So are hidden members (a name whose
    last part starts with a dot: macOS AppleDouble `._x.jpg`, `.DS_Store`), which
    webdataset skips too. Structural damage raises ShardError naming the byte offset.
    """
    skipped = skipped if skipped is not None else Counter()
    if isinstance(shard, FileGroup):
        yield from _iter_files(shard, skipped, keep)
        return
    finished: set[str] = set()
    current: Sample | None = None
    names_in_sample: set[str] = set()
    index = 0
    for header_offset, name, data_offset, size, data in iter_members(shard, skipped, keep):
        if name.rsplit("/", 1)[-1].startswith("."):
            skipped["hidden"] += 1
            continue
        key, _ = split_member_name(name)
        if current is None or key != current.key:
            if current is not None:
                finished.add(current.key)
                yield current
                index += 1
            if key in finished:
                raise ShardError(
                    shard.path,
                    f"members of sample {key!r} are not adjacent "
                    f"(member {name!r} comes after another sample)",
                    header_offset,
                )
            current = Sample(key=key, index=index, offset=header_offset)
            names_in_sample = set()
        elif name in names_in_sample:
            raise ShardError(
                shard.path, f"sample {key!r} has the member {name!r} twice", header_offset
            )
        names_in_sample.add(name)
        current.members.append(Member(name, data_offset, size, data))
    if current is not None:
        yield current


def _iter_files(
    group: FileGroup, skipped: Counter, keep: Callable[[str], bool] | None
) -> Iterator[Sample]:
    """A FileGroup's files as one-member samples. Counted and never fatal: a file that is
    not a regular file (FIFO, device, socket, directory, or a link to one), never opened,
    under `not_a_regular_file`; one above MAX_FILE_BYTES, never read, under `too_large`;
    one that cannot be read (gone, unreadable) under `unreadable_file`."""
    index = 0
    for name in group.files:
        data = None
        path = group.file(name)
        try:
            if keep is None or keep(name):
                data = read_regular_file(path, MAX_FILE_BYTES)
                size = len(data)
            else:
                size = check_regular(os.stat(path), path).st_size
        except NotARegularFile:
            skipped["not_a_regular_file"] += 1
            continue
        except FileTooLarge:
            skipped["too_large"] += 1
            continue
        except OSError:
            skipped["unreadable_file"] += 1
            continue
        yield Sample(key=name, index=index, offset=0, members=[Member(name, 0, size, data)])
        index += 1


def iter_members(
    shard: Shard, skipped: Counter, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[int, str, int, int, bytes | None]]:
    """(header offset, name, data offset, size, data) of each regular member, in tar
    order; with `keep`, data only for the members it accepts (None for the others)."""
    source = shard.read_path
    if storage.is_url(source):
        with storage.open_stream(source) as stream:
            first = stream.read(tarscan.BLOCK)
            if not first:
                raise ShardError(shard.path, "empty object, not a tar archive")
            yield from tarscan.scan(_Prefixed(first, stream), shard.path, None, skipped, keep)
        return
    try:
        fh = open(source, "rb", buffering=1 << 20)  # noqa: SIM115 (closed below)
    except OSError as e:
        raise ShardError(shard.path, f"cannot open ({e.strerror or e})") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise ShardError(shard.path, "empty file, not a tar archive")
        yield from tarscan.scan(fh, shard.path, size, skipped, keep)


class _Prefixed:
    """A stream with bytes already read put back in front."""

    def __init__(self, head: bytes, stream) -> None:
        self.head = head
        self.stream = stream

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            if len(out) < n:
                out += self.stream.read(n - len(out))
            return out
        return self.stream.read(n)


class ShardSource:
    """A shard read forward only (the write phase's one pass), checked against what
    phase 1 read: its `identity`, or for an input known only by its bytes (a pipe:
    command's) their BLAKE3 `content`."""

    def __init__(self, shard: Shard, identity: tuple | None, content: str | None) -> None:
        self.path = shard.path  # as listed, for messages
        self.source = shard.read_path  # where the bytes are (a pipe:'s spool)
        self.identity = identity
        self.content = content
        self.remote = storage.is_url(self.source)
        self.hasher = blake3.blake3() if identity is None else None
        # A local file checked by its identity: readable at any offset (fileno, pread).
        self.direct = not self.remote and self.hasher is None

    def __enter__(self) -> ShardSource:
        known = self.identity
        if self.remote:
            if known is not None and storage.identity(self.source) != known:
                raise ShardError(self.path, "shard changed since its features were computed")
            self.reader = storage.open_stream(self.source)
        else:
            try:
                self.reader = open(self.source, "rb", buffering=0)  # noqa: SIM115
            except OSError as e:
                raise ShardError(self.path, f"cannot open ({e.strerror or e})") from None
            if known is not None and storage.file_identity(os.fstat(self.reader.fileno())) != known:
                self.reader.close()
                raise ShardError(self.path, "shard changed since its features were computed; rerun")
        self.position = 0
        return self

    def fileno(self) -> int:
        return self.reader.fileno()

    def read(self, n: int) -> bytes:
        data = self.reader.read(n)
        self.position += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        return data

    def chunks(self, size: int):
        """The next `size` bytes, in pieces of at most READ_CHUNK."""
        left = size
        while left > 0:
            chunk = self.read(min(left, READ_CHUNK))
            if not chunk:
                raise ShardError(self.path, "shard is shorter than when it was read", self.position)
            left -= len(chunk)
            yield chunk

    def skip_to(self, offset: int) -> None:
        if offset < self.position:
            raise ShardError(self.path, "stored offsets are out of order; rerun", offset)
        if self.hasher is None and not self.remote:
            self.reader.seek(offset)
            self.position = offset
            return
        while self.position < offset:
            if not self.read(min(1 << 22, offset - self.position)):
                break

    def finish(self) -> None:
        """For an input known only by its bytes: they must be the ones phase 1 read."""
        if self.hasher is None:
            return
        while self.read(1 << 22):
            pass
        if self.hasher.hexdigest() != self.content:
            raise ShardError(self.path, "the shard's bytes changed since they were read")

    def __exit__(self, *exc) -> None:
        self.reader.close()


def at_hand(shard: Shard) -> Shard | None:
    """The shard, when it can still be read later in the run (an object is assumed to be;
    a local file must still be there)."""
    return shard if shard.is_url or os.path.isfile(shard.path) else None
