"""Phase 3: copy kept samples, every member byte for byte, into a new shard, atomically."""

from __future__ import annotations

import tarfile

from dedup.core.errors import ShardError
from dedup.core.progress import REPORT_EVERY, advance
from dedup.engine.extract import ShardFeatures
from dedup.engine.featurestore import read_features
from dedup.io.fsutil import atomic_path
from dedup.io.shards import ShardSource
from dedup.io.tarscan import BLOCK, REGULAR, header_checksum_ok

RECORD = 20 * BLOCK  # what tarfile pads an archive to; readers expect whole records
COPY_CHUNK = 1 << 22
CAPTURE_MAX = 1 << 26  # larger members are never a thumbnail or a caption


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


WRITE_COLUMNS = ["member_names", "member_offsets", "member_sizes"]


def write_shard(
    features: ShardFeatures,
    keep: list[bool],
    output: str,
    capture: frozenset[int] = frozenset(),
    table=None,
) -> tuple[int, dict[int, list[bytes]]]:
    """Write the samples of a shard whose position has keep=True to `output` (a path or
    URL). Return how many were written, and the member bytes of the `capture` rows (for
    the report's thumbnails: read in the same pass, kept or not). `table` holds the
    shard's WRITE_COLUMNS when the caller has read them already.

    The source is read in one sequential pass (one streaming GET from a store), member
    bytes taken from the offsets phase 1 recorded. The shard must still be what was read
    (file identity, ETag, or for a pipe: command the same bytes), and the tar header in
    front of every copied member must name that member and its size: a changed shard or
    a damaged feature record is an error, never a shifted member.
    """
    shard = features.shard
    if table is None:
        table = read_features(features.path, WRITE_COLUMNS)
    if table.num_rows != len(keep):
        raise ShardError(shard.path, "stored features do not match the plan; rerun")
    raw_names = table.column("member_names").to_pylist()
    offsets = table.column("member_offsets").to_pylist()
    sizes = table.column("member_sizes").to_pylist()
    samples = 0
    captured: dict[int, list[bytes]] = {}
    with (
        ShardSource(features.shard, features.identity, features.content) as src,
        atomic_path(output) as tmp,
    ):
        with open(tmp, "wb", buffering=1 << 20) as out:
            written = 0
            for row, kept in enumerate(keep):
                if not kept and row not in capture:
                    continue
                # Members are read one by one, each in bounded chunks: the header in
                # front of it is checked, its bytes are copied; nothing is held whole but
                # what the report's thumbnails need.
                members = zip(raw_names[row], offsets[row], sizes[row], strict=True)
                held = []
                for raw, offset, size in members:
                    src.skip_to(offset - BLOCK)
                    header_block = src.read(BLOCK)
                    _check_header(header_block, raw, size, shard.path, offset - BLOCK)
                    keep_bytes = row in capture and size <= CAPTURE_MAX
                    parts = []
                    if kept:
                        header = member_header(raw.decode("utf-8", "surrogateescape"), size)
                        out.write(header)
                        written += len(header)
                    for chunk in src.chunks(size):
                        if kept:
                            out.write(chunk)
                        if keep_bytes:
                            parts.append(chunk)
                    if kept:
                        pad = -size % BLOCK
                        out.write(bytes(pad))
                        written += size + pad
                    held.append(b"".join(parts) if keep_bytes else b"")
                if row in capture:
                    captured[row] = held
                if not kept:
                    continue
                samples += 1
                if samples % REPORT_EVERY == 0:
                    advance(REPORT_EVERY)
            advance(samples % REPORT_EVERY)
            end = 2 * BLOCK + (-(written + 2 * BLOCK) % RECORD)
            out.write(bytes(end))
        src.finish()
    return samples, captured


def _check_header(header: bytes, raw_name: bytes, size: int, path: str, offset: int) -> None:
    """The 512-byte header in front of a member's data must be a valid header of a
    regular member whose name and size agree with what phase 1 recorded (the name where
    it fits the header; longer names come from extended headers before it)."""
    ok = len(header) == BLOCK and header_checksum_ok(header) and header[156:157] in REGULAR
    if ok:
        field = header[124:136]
        if not field[0] & 0x80 and field.strip(b"\x00 "):
            ok = int(field.split(b"\x00", 1)[0].strip(b" ") or b"0", 8) in (size, 0)
    if ok and len(raw_name) <= 100 and raw_name.isascii() and header[345] == 0:
        ok = header[:100].split(b"\x00", 1)[0] == raw_name
    if not ok:
        raise ShardError(
            path,
            "the tar header here does not match the member recorded for it; "
            "the shard or its stored features changed; rerun",
            offset,
        )
