"""Phase 3: copy kept samples, every member byte for byte, into a new shard, atomically."""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

from dedup.errors import ShardError
from dedup.extract import ShardFeatures, read_features
from dedup.fsutil import atomic_path
from dedup.progress import REPORT_EVERY, advance

BLOCK = 512
RECORD = 20 * BLOCK  # what tarfile pads an archive to; readers expect whole records


@dataclass
class WriteResult:
    shard_path: str
    output: str
    samples_written: int


def member_header(name: str, size: int) -> bytes:
    """A deterministic header: the member's name and size, nothing from the clock or host.

    PAX records carry names that ustar cannot (long or non-ASCII); the common case is
    filled into a template, byte for byte what tarfile writes (a test holds it to that).
    """
    if size < MAX_USTAR_SIZE and len(name) <= 100 and name.isascii():
        header = bytearray(_TEMPLATE)
        raw = name.encode("ascii")
        header[: len(raw)] = raw
        header[124:136] = b"%011o\x00" % size
        header[148:155] = b"%06o\x00" % sum(header)
        return bytes(header)
    return _tarfile_header(name, size)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


MAX_USTAR_SIZE = 8**11  # 11 octal digits; larger sizes need a PAX record
_TEMPLATE = bytearray(_tarfile_header("x", 0))
_TEMPLATE[0:100] = bytes(100)
_TEMPLATE[124:136] = bytes(12)
_TEMPLATE[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
_TEMPLATE = bytes(_TEMPLATE)


def write_shard(features: ShardFeatures, keep: list[bool], output: str) -> WriteResult:
    """Write the samples of a shard whose position has keep=True to `output`.

    Member bytes are copied from the offsets phase 1 recorded; a shard whose size or
    modification time changed since then is an error, not a silent mismatch.
    """
    shard = features.shard
    table = read_features(features.path, ["member_names", "member_offsets", "member_sizes"])
    if table.num_rows != len(keep):
        raise ShardError(shard.path, "stored features do not match the plan; rerun")
    names = [
        [raw.decode("utf-8", "surrogateescape") for raw in row]
        for row in table.column("member_names").to_pylist()
    ]
    offsets = table.column("member_offsets").to_pylist()
    sizes = table.column("member_sizes").to_pylist()
    samples = 0
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
                # A sample's members are adjacent in the input: one read covers them all.
                start = offsets[row][0]
                span = offsets[row][-1] + sizes[row][-1] - start
                blob = memoryview(os.pread(src, span, start))
                if len(blob) != span:
                    raise ShardError(shard.path, "shard is shorter than when it was read", start)
                for name, offset, size in zip(names[row], offsets[row], sizes[row], strict=True):
                    header = member_header(name, size)
                    pad = -size % BLOCK
                    out.write(header)
                    out.write(blob[offset - start : offset - start + size])
                    if pad:
                        out.write(bytes(pad))
                    written += len(header) + size + pad
                samples += 1
                if samples % REPORT_EVERY == 0:
                    advance(REPORT_EVERY)
            advance(samples % REPORT_EVERY)
            end = 2 * BLOCK + (-(written + 2 * BLOCK) % RECORD)
            out.write(bytes(end))
    finally:
        os.close(src)
    return WriteResult(shard.path, output, samples)
