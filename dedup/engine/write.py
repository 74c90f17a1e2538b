"""Phase 3: copy kept samples, every member byte for byte, into a new shard, atomically."""

from __future__ import annotations

import os
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
        field = b"%011o\x00" % size
        header[: len(raw)] = raw
        header[124:136] = field
        # the template's sum plus the two fields filled in: the sum of the whole block
        header[148:155] = b"%06o\x00" % (_TEMPLATE_SUM + sum(raw) + sum(field))
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
_TEMPLATE_SUM = sum(_TEMPLATE)


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
        atomic_path(output, sync_folder=False) as tmp,  # the phase syncs OUT once
    ):
        with open(tmp, "wb", buffering=0) as out:
            copy = _Copy(src, out.fileno(), shard.path)
            for row, kept in enumerate(keep):
                if not kept and row not in capture:
                    continue
                members = list(zip(raw_names[row], offsets[row], sizes[row], strict=True))
                held = copy.sample(members, kept, row in capture)
                if row in capture:
                    captured[row] = held
                if not kept:
                    continue
                samples += 1
                if samples % REPORT_EVERY == 0:
                    advance(REPORT_EVERY)
            advance(samples % REPORT_EVERY)
            copy.pieces.append(
                bytes(2 * BLOCK + (-(copy.written + copy.pending + 2 * BLOCK) % RECORD))
            )
            copy.flush()
        src.finish()
    return samples, captured


WINDOW = 1 << 24  # bytes of a local shard read at once by the writer
FLUSH = 1 << 22  # bytes of output gathered before they are written (one writev)
IOV_MAX = 1024  # buffers per writev (Linux's limit)
_PADS = [bytes(n) for n in range(BLOCK)]
_window: bytearray | None = None  # one per process, reused: no page faults per window


class _Copy:
    """The writer's member copy. A local shard is read a window at a time (one read for
    many samples, into a buffer the process reuses) and the output written by writev
    from that buffer: no per-member system call, no copy but the kernel's. A sample
    larger than a window, an object store's stream or an input checked by its bytes (a
    pipe:'s spool) is read member by member in bounded chunks instead."""

    def __init__(self, src: ShardSource, fd: int, path: str) -> None:
        self.src, self.fd, self.path = src, fd, path
        self.direct = src.direct
        self.window = memoryview(b"")
        self.start = 0  # the window's offset in the shard
        self.position = 0  # where the last member read ends: offsets only go forward
        self.pieces: list = []
        self.pending = 0  # bytes in pieces
        self.written = 0

    def sample(self, members: list, kept: bool, capture: bool) -> list[bytes]:
        """Copy one sample's members (when `kept`); the member bytes when `capture`."""
        if not members:
            return []
        lo = members[0][1] - BLOCK
        hi = max(offset + size for _, offset, size in members)
        if not self.direct or hi - lo > WINDOW:
            return self._streamed(members, kept, capture)
        if lo < self.position:
            raise ShardError(self.path, "stored offsets are out of order; rerun", lo)
        if hi > self.start + len(self.window):
            self._fill(lo, hi)
        held = []
        for raw, offset, size in members:
            if offset - BLOCK < self.position:
                raise ShardError(self.path, "stored offsets are out of order; rerun", offset)
            self.position = offset + size
            at = offset - self.start
            _check_header(
                self.window[at - BLOCK : at].tobytes(), raw, size, self.path, offset - BLOCK
            )
            data = self.window[at : at + size]
            if kept:
                header = member_header(raw.decode("utf-8", "surrogateescape"), size)
                pad = _PADS[-size % BLOCK]
                self.pieces += (header, data, pad)
                self.pending += len(header) + size + len(pad)
            held.append(data.tobytes() if capture and size <= CAPTURE_MAX else b"")
        if self.pending >= FLUSH:
            self.flush()
        return held

    def _fill(self, lo: int, hi: int) -> None:
        """Read the window from `lo` (at least to `hi`) into the process's buffer."""
        global _window
        self.flush()  # the pieces gathered point into the buffer
        if _window is None:
            _window = bytearray(WINDOW)
        got = os.preadv(self.src.fileno(), [_window], lo)
        if got < hi - lo:
            raise ShardError(self.path, "shard is shorter than when it was read", lo + got)
        self.window, self.start = memoryview(_window)[:got], lo

    def flush(self) -> None:
        """Write the pieces gathered, all of them (writev may write less than asked)."""
        pieces = self.pieces
        while pieces:
            batch = pieces[:IOV_MAX]
            done = os.writev(self.fd, batch)
            size = sum(len(p) for p in batch)
            if done < size:  # rare: the rest of the batch goes again, from where it stopped
                rest = memoryview(b"".join(batch))[done:]
                while len(rest):
                    rest = rest[os.write(self.fd, rest) :]
            pieces = pieces[IOV_MAX:]
        self.written += self.pending
        self.pieces, self.pending = [], 0

    def _streamed(self, members: list, kept: bool, capture: bool) -> list[bytes]:
        """Members one by one, each in bounded chunks: the header in front of it is
        checked, its bytes copied; nothing is held whole but what `capture` asks for."""
        self.flush()
        src = self.src
        held = []
        for raw, offset, size in members:
            if offset - BLOCK < self.position:
                raise ShardError(self.path, "stored offsets are out of order; rerun", offset)
            self.position = offset + size
            src.skip_to(offset - BLOCK)
            header_block = src.read(BLOCK)
            _check_header(header_block, raw, size, self.path, offset - BLOCK)
            keep_bytes = capture and size <= CAPTURE_MAX
            parts = []
            if kept:
                header = member_header(raw.decode("utf-8", "surrogateescape"), size)
                self.pieces.append(header)
                self.pending += len(header)
            for chunk in src.chunks(size):
                if kept:
                    self.pieces.append(chunk)
                    self.pending += len(chunk)
                    self.flush()
                if keep_bytes:
                    parts.append(chunk)
            if kept:
                self.pieces.append(_PADS[-size % BLOCK])
                self.pending += -size % BLOCK
            held.append(b"".join(parts) if keep_bytes else b"")
        self.window, self.start = memoryview(b""), self.position
        return held


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
