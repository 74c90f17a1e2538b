"""Phase 3: copy kept samples, every member byte for byte, into a new shard, atomically."""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

from dedup.errors import ShardError
from dedup.extract import ShardFeatures, read_features
from dedup.fsutil import atomic_path

BLOCK = 512
RECORD = 20 * BLOCK  # what tarfile pads an archive to; readers expect whole records


@dataclass
class WriteResult:
    shard_path: str
    output: str
    samples_written: int
    members_written: int


def member_header(name: str, size: int) -> bytes:
    """A deterministic header: the member's name and size, nothing from the clock or host.

    PAX records carry names that ustar cannot (long or non-ASCII)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_shard(features: ShardFeatures, keep: list[bool], output: str) -> WriteResult:
    """Write the samples of a shard whose position has keep=True to `output`.

    Member bytes are copied from the offsets phase 1 recorded; a shard whose size or
    modification time changed since then is an error, not a silent mismatch.
    """
    shard = features.shard
    table = read_features(features.path, ["member_names", "member_offsets", "member_sizes"])
    if table.num_rows != len(keep):
        raise ShardError(shard.path, "stored features do not match the plan; rerun")
    names = table.column("member_names").to_pylist()
    offsets = table.column("member_offsets").to_pylist()
    sizes = table.column("member_sizes").to_pylist()
    samples = members = 0
    try:
        src = os.open(shard.path, os.O_RDONLY)
    except OSError as e:
        raise ShardError(shard.path, f"cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(src)
        if (st.st_size, st.st_mtime_ns) != (features.input_size, features.input_mtime_ns):
            raise ShardError(shard.path, "shard changed since its features were computed")
        with atomic_path(output) as tmp, open(tmp, "wb", buffering=1 << 20) as out:
            written = 0
            for row, kept in enumerate(keep):
                if not kept:
                    continue
                for name, offset, size in zip(names[row], offsets[row], sizes[row], strict=True):
                    data = os.pread(src, size, offset)
                    if len(data) != size:
                        raise ShardError(shard.path, f"member {name!r} is truncated", offset)
                    header = member_header(name, size)
                    pad = -size % BLOCK
                    out.write(header)
                    out.write(data)
                    if pad:
                        out.write(bytes(pad))
                    written += len(header) + size + pad
                    members += 1
                samples += 1
            end = 2 * BLOCK + (-(written + 2 * BLOCK) % RECORD)
            out.write(bytes(end))
    finally:
        os.close(src)
    return WriteResult(shard.path, output, samples, members)
