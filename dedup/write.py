"""Phase 3: copy kept samples, every member byte for byte, into a new shard, atomically."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

from dedup.errors import ShardError
from dedup.fsutil import atomic_path
from dedup.shards import Member, Shard, iter_samples


@dataclass
class WriteResult:
    shard: Shard
    output: str
    samples_written: int
    members_written: int


def member_header(member: Member) -> tarfile.TarInfo:
    """A deterministic header: the member's name and size, nothing from the clock or host."""
    info = tarfile.TarInfo(member.name)
    info.size = len(member.data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_shard(shard: Shard, keys: list[str], keep: list[bool], output: str) -> WriteResult:
    """Write the samples of `shard` whose position has keep=True to `output`.

    `keys` are the keys phase 1 saw at each position; a shard that changed since then is
    an error, not a silent mismatch.
    """
    samples = members = 0
    with (
        atomic_path(output) as tmp,
        open(tmp, "wb") as fh,
        tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar,
    ):
        seen = 0
        for sample in iter_samples(shard):
            seen += 1
            if sample.index >= len(keys) or sample.key != keys[sample.index]:
                raise ShardError(
                    shard.path, "shard changed since its features were computed", sample.offset
                )
            if not keep[sample.index]:
                continue
            for member in sample.members:
                tar.addfile(member_header(member), io.BytesIO(member.data))
                members += 1
            samples += 1
        if seen != len(keys):
            raise ShardError(shard.path, "shard changed since its features were computed")
    return WriteResult(shard, output, samples, members)
