"""A strict, streaming reader of tar structure (ustar, GNU long names, PAX records).

Python's tarfile stops quietly at a damaged header in the middle of an archive and
reports no offsets; this reader checks every header's checksum, that data is complete,
and that only zero blocks follow the end-of-archive marker, and names the byte offset
of any damage. Member names are only ever strings: nothing here touches the filesystem.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import BinaryIO

from dedup.core.errors import ShardError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\x00", b"7")
KINDS = {
    b"1": "link",
    b"2": "link",
    b"3": "device",
    b"4": "device",
    b"5": "directory",
    b"6": "fifo",
}


def _number(field: bytes, path: str, offset: int, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ShardError(path, f"damaged tar header (bad {what} field)", offset) from None


def _checksum_ok(header: bytes, path: str, offset: int) -> bool:
    stored = _number(header[148:156], path, offset, "checksum")
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 2 * sum(b for b in header if b > 127)
    return stored == signed


def header_checksum_ok(header: bytes) -> bool:
    """Whether a 512-byte block is a tar header whose checksum is right."""
    try:
        return _checksum_ok(header, "", 0)
    except ShardError:
        return False


# The numeric fields of a header (mode, uid, gid, size, mtime, checksum): octal digits,
# spaces and NULs, or GNU base-256 (first byte 0x80 or 0xff).
_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156))
_OCTAL_BYTES = frozenset(b"01234567 \x00")


def _header_prefix(partial: bytes) -> bool:
    """Whether the bytes of a file shorter than one block can be the start of a tar
    header (a tar cut short inside its first header), rather than some other small file
    named .tar: a NUL-padded name, then numeric fields as far as they go, then ustar's
    magic. A cut inside a name of 100 bytes or more cannot be told from other bytes."""
    name = partial[:100]
    end = name.find(b"\x00")
    if end <= 0 or name[end:].count(0) != len(name) - end:
        return False
    for start, stop in _NUMERIC_FIELDS:
        field = partial[start:stop]
        if field[:1] in (b"\x80", b"\xff") and start != 148:
            continue
        if not set(field) <= _OCTAL_BYTES:
            return False
    magic = partial[257:263]
    return magic == b"ustar\x00"[: len(magic)] or magic == b"ustar "[: len(magic)] or not any(magic)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, path: str, offset: int) -> dict[str, str]:
    records = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ShardError(path, "damaged PAX header record", offset) from None
        if space < 0 or length <= 0 or pos + length > len(data):
            raise ShardError(path, "damaged PAX header record", offset)
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        records[_decode(key)] = _decode(value)
        pos += length
    return records


def scan(
    fh: BinaryIO,
    path: str,
    file_size: int | None,
    skipped: Counter,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[int, str, int, int, bytes | None]]:
    """Yield (header offset, name, data offset, size, data) for each regular member of a
    tar read sequentially from `fh` (a file or a stream: only `read` is used); count the
    other kinds in `skipped`. `file_size`, when known, catches truncation early. With
    `keep`, only members whose name it accepts are read into memory; the others are
    passed over in bounded chunks and yielded with data None."""
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    entry_start: int | None = None  # first header of a member with extended headers
    while True:
        header = fh.read(BLOCK)
        if not header:
            raise ShardError(path, "tar ends without its end-of-archive blocks (truncated?)", pos)
        if len(header) < BLOCK:
            if pos == 0 and not _header_prefix(header):
                size = len(header)
                raise ShardError(path, f"not a tar archive ({size} bytes, less than one header)")
            raise ShardError(path, "tar is truncated inside a header", pos)
        if header == ZERO_BLOCK:
            _check_trailer(fh, path, pos + BLOCK)
            if long_name is not None or pax:
                raise ShardError(path, "extended header without a member", pos)
            return
        if not header_checksum_ok(header):
            if pos == 0:
                raise ShardError(path, "not a readable tar archive (no valid header)", 0)
            raise ShardError(path, "damaged tar header (bad checksum)", pos)
        kind = header[156:157]
        size = _number(header[124:136], path, pos, "size")
        if size < 0:
            raise ShardError(path, "damaged tar header (negative size)", pos)
        data_offset = pos + BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if file_size is not None and data_offset + size > file_size:
            raise ShardError(path, "tar is truncated: a member's data runs past the end", pos)
        start = pos if entry_start is None else entry_start
        if kind in (b"L", b"K", b"x", b"g"):
            data = _read(fh, size, padded, path, pos)
            entry_start = start
            if kind == b"L":
                long_name = _decode(data.split(b"\x00", 1)[0])
            elif kind == b"x":
                pax.update(_pax_records(data, path, pos))
            elif kind == b"g":
                entry_start = None  # global headers apply to no single member
            pos = data_offset + padded
            continue
        name = header[0:100].split(b"\x00", 1)[0]
        if header[257:263] == b"ustar\x00" and header[345] != 0:
            name = header[345:500].split(b"\x00", 1)[0] + b"/" + name
        member_name = pax.get("path", long_name if long_name is not None else _decode(name))
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise ShardError(path, "damaged PAX size record", pos) from None
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if file_size is not None and data_offset + size > file_size:
                raise ShardError(path, "tar is truncated: a member's data runs past the end", pos)
        if "\x00" in member_name:
            raise ShardError(path, f"member name {member_name!r} holds a NUL byte", start)
        sparse = kind == b"S" or any(k.startswith("GNU.sparse.") for k in pax)
        if sparse:
            # Old GNU (type S) and PAX (GNU.sparse.* records) sparse members store a map
            # of holes, not the file's bytes: copying them would change the member.
            real_name = pax.get("GNU.sparse.name", member_name)
            raise ShardError(
                path, f"member {real_name!r} is a sparse file, which dedup does not read", start
            )
        long_name, pax, entry_start = None, {}, None
        if kind in REGULAR and not (kind == b"\x00" and member_name.endswith("/")):
            if keep is None or keep(member_name):
                data = _read(fh, size, padded, path, pos)
            else:
                data = _pass_over(fh, padded, path, pos)
            yield start, member_name, data_offset, size, data
        else:
            skipped[KINDS.get(kind, "directory" if kind == b"\x00" else "other")] += 1
            _pass_over(fh, padded, path, pos)
        pos = data_offset + padded


def _read(fh: BinaryIO, size: int, padded: int, path: str, pos: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise ShardError(path, "tar is truncated inside a member's data", pos)
    if padded > size:
        fh.read(padded - size)  # read, not seek: the input may be a stream
    return data


def _pass_over(fh: BinaryIO, padded: int, path: str, pos: int) -> None:
    """Read past a member's data without holding it (a 1 GB member costs 1 MiB)."""
    left = padded
    while left > 0:
        chunk = fh.read(min(left, 1 << 20))
        if not chunk:
            raise ShardError(path, "tar is truncated inside a member's data", pos)
        left -= len(chunk)


def _check_trailer(fh: BinaryIO, path: str, pos: int) -> None:
    """After the first zero block only zeros may follow; else a header was zeroed out."""
    while True:
        chunk = fh.read(1 << 16)
        if not chunk:
            return
        if chunk.count(0) != len(chunk):
            first = next(i for i, b in enumerate(chunk) if b)
            raise ShardError(
                path,
                "data after the end-of-archive marker (damaged header?)",
                pos + first // BLOCK * BLOCK,
            )
        pos += len(chunk)
