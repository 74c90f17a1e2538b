"""Where bytes live: local paths, object stores (s3://, gs://), http(s):// and pipe:CMD.

One small surface over fsspec that the rest of dedup uses for everything that is not a
local path: list, identify an object, stream it in one pass, read a range, read and put
small files, and put a file atomically (an object appears complete or not at all).
Network calls are retried with backoff, then reported with the URL: InputError (exit 3)
for reading inputs, OutputError (exit 4) for writing.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from braceexpand import braceexpand

from dedup.core.errors import ConfigError, DedupError, InputError, OutputError

T = TypeVar("T")
PIPE = "pipe:"
# URL scheme -> the extra that brings its fsspec backend.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
RETRIES = 4
BACKOFF_SECONDS = 0.5
STREAM_BLOCK = 1 << 22


def is_url(path: str) -> bool:
    """Whether `path` names something other than a local file."""
    return path.startswith(PIPE) or "://" in path


def scheme(url: str) -> str:
    return "pipe" if url.startswith(PIPE) else url.split("://", 1)[0].lower()


SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs"}


def normal_url(url: str) -> str:
    """One spelling of a store URL: `s3a://` is `s3://`, `gcs://` is `gs://`, repeated
    and trailing slashes dropped; used to tell whether two names are one place."""
    if not is_url(url) or url.startswith(PIPE):
        return url
    protocol, rest = url.split("://", 1)
    protocol = SCHEME_ALIASES.get(protocol.lower(), protocol.lower())
    return f"{protocol}://" + "/".join(p for p in rest.split("/") if p)


def join(base: str, name: str) -> str:
    """`base`/`name` for a local path or a URL."""
    if is_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def basename(path: str) -> str:
    if path.startswith(PIPE):
        return os.path.basename(shlex.split(path[len(PIPE) :])[-1]) if path[5:].strip() else ""
    if is_url(path):
        return posixpath.basename(path.split("?", 1)[0].rstrip("/"))
    return os.path.basename(path)


def _filesystem(protocol: str):
    # fsspec keeps one instance per protocol and process (a forked worker gets its own).
    import fsspec

    try:
        return fsspec.filesystem(protocol)
    except ImportError as e:
        extra = EXTRAS.get(protocol, protocol)
        raise ConfigError(
            f"{protocol}:// needs an extra package ({e.name or e}): "
            f"pip install 'dedup-wds[{extra}]'"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{protocol}://: not a storage protocol dedup can use ({e})") from None


def filesystem(url: str):
    """The fsspec filesystem of `url` (one per protocol and process)."""
    protocol = scheme(url)
    if protocol not in EXTRAS:
        raise ConfigError(
            f"{url}: unknown storage scheme {protocol!r}; dedup reads local paths, s3://, "
            "gs://, http(s):// and pipe:COMMAND"
        )
    return _filesystem("s3" if protocol == "s3a" else protocol)


def retry(call: Callable[[], T], url: str, error: type[DedupError] = InputError) -> T:
    """`call()`, retried with backoff on network errors; then `error` naming `url`.

    A missing object or a refused permission is not retried: it will not change.
    """
    delay = BACKOFF_SECONDS
    for attempt in range(RETRIES):
        try:
            return call()
        except DedupError:
            raise
        except (FileNotFoundError, PermissionError) as e:
            raise error(f"{url}: {_reason(e)}") from None
        except Exception as e:  # network and service errors come in many types
            if attempt == RETRIES - 1:
                raise error(f"{url}: {_reason(e)} (after {RETRIES} tries)") from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, FileNotFoundError):
        return "no such object"
    if isinstance(e, PermissionError):
        return f"permission denied ({text})" if text else "permission denied"
    return f"{type(e).__name__}: {text}"[:300]


# ---------------------------------------------------------------- listing


_PATTERN_CHARS = "*?[{"


def list_url(spec: str) -> list[str]:
    """The shards a URL names: one object, a prefix ending in `/` (its `*.tar` objects,
    sorted), or a brace pattern or glob over them. A URL that names an existing object
    or prefix is itself, before any expansion: `s3://b/x[1].tar` is that object, never a
    pattern matching `x1.tar`. http(s) and pipe: URLs name one shard each, never listed
    (braces still expand into several)."""
    patterned = any(c in spec for c in _PATTERN_CHARS)
    if spec.startswith(PIPE):
        return list(braceexpand(spec))
    if scheme(spec) in ("http", "https"):
        if patterned and exists(spec, InputError):
            return [spec]
        return list(braceexpand(spec))
    fs = filesystem(spec)
    protocol = scheme(spec)
    if patterned:
        literal = _listed(fs, protocol, spec, must_exist=False)
        if literal is not None:
            return literal
    found: list[str] = []
    for item in braceexpand(spec) if patterned else [spec]:
        if any(c in item for c in "*?["):
            matches = retry(lambda item=item: fs.glob(item), item)
            found.extend(sorted(f"{protocol}://{p}" for p in matches))
        else:
            found.extend(_listed(fs, protocol, item, must_exist=True))
    return found


def _listed(fs, protocol: str, spec: str, must_exist: bool) -> list[str] | None:
    """A prefix's `*.tar` objects (sorted) or the one object `spec` names; when neither
    exists, InputError, or None unless `must_exist`."""
    if retry(lambda: fs.isdir(spec), spec) or (must_exist and spec.endswith("/")):
        entries = retry(lambda: fs.ls(spec.rstrip("/"), detail=True), spec)
        return sorted(
            f"{protocol}://{e['name']}"
            for e in entries
            if e.get("type") == "file" and e["name"].endswith(".tar")
        )
    if retry(lambda: fs.isfile(spec), spec):
        return [spec]
    if must_exist:
        raise InputError(f"{spec}: no such object")
    return None


def identity(url: str) -> tuple | None:
    """What tells a changed object from the one that was read: size with ETag (S3),
    generation (GCS) or ETag / Last-Modified (HTTP); None where nothing does (pipe:)."""
    if url.startswith(PIPE):
        return None
    fs = filesystem(url)
    info = retry(lambda: fs.info(url), url)
    tags = [info.get(k) for k in ("ETag", "etag", "generation", "VersionId", "Last-Modified")]
    tags = [str(t) for t in tags if t]
    if not tags and scheme(url) in ("http", "https"):
        return None
    return (int(info.get("size") or 0), *tags)


def size(url: str) -> int:
    ident = identity(url)
    return int(ident[0]) if ident else 0


# ---------------------------------------------------------------- reading


class Stream:
    """A sequential reader over one GET (or one command's stdout): `read(n)` only.

    Reads from the source in blocks of STREAM_BLOCK and serves small reads (a tar
    header is 512 bytes) from that buffer. `skip(n)` reads past bytes without keeping
    them; `tell()` counts bytes read.
    """

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None], url: str):
        self._read = read
        self._close = close
        self.url = url
        self.position = 0
        self._buffer = b""
        self._at = 0

    def _fill(self) -> bool:
        chunk = self._read(STREAM_BLOCK)
        self._buffer, self._at = chunk, 0
        return bool(chunk)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(STREAM_BLOCK):
                parts.append(chunk)
            return b"".join(parts)
        out = []
        while n > 0:
            if self._at >= len(self._buffer) and not self._fill():
                break
            piece = self._buffer[self._at : self._at + n]
            self._at += len(piece)
            out.append(piece)
            n -= len(piece)
        data = out[0] if len(out) == 1 else b"".join(out)
        self.position += len(data)
        return data

    def skip(self, n: int) -> int:
        skipped = 0
        while skipped < n:
            chunk = self.read(min(STREAM_BLOCK, n - skipped))
            if not chunk:
                break
            skipped += len(chunk)
        return skipped

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(url: str) -> Stream:
    """Open `url` for one sequential pass: one streaming GET for S3 and HTTP, the
    command's stdout for pipe:."""
    if url.startswith(PIPE):
        return _pipe_stream(url)
    fs = filesystem(url)
    protocol = scheme(url)
    if protocol in ("s3", "s3a"):
        return retry(lambda: _s3_stream(fs, url), url)
    if protocol in ("http", "https"):
        fh = retry(lambda: fs.open(url, "rb", block_size=0), url)
    else:
        fh = retry(lambda: fs.open(url, "rb", block_size=1 << 26, cache_type="readahead"), url)
    return Stream(_guarded(fh.read, url), fh.close, url)


def _guarded(read: Callable[[int], bytes], url: str) -> Callable[[int], bytes]:
    def guarded(n: int) -> bytes:
        try:
            return read(n)
        except DedupError:
            raise
        except Exception as e:
            raise InputError(f"{url}: reading failed ({_reason(e)})") from None

    return guarded


def _s3_stream(fs, url: str) -> Stream:
    from fsspec.asyn import sync

    bucket, key, version = fs.split_path(url)
    kwargs = {"VersionId": version} if version else {}
    response = sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key, **kwargs)
    body = response["Body"]

    def read(n: int) -> bytes:
        return sync(fs.loop, body.read, n)

    def close() -> None:
        with contextlib.suppress(Exception):
            body.close()

    return Stream(_guarded(read, url), close, url)


def _pipe_stream(url: str) -> Stream:
    command = url[len(PIPE) :]
    try:
        proc = subprocess.Popen(  # noqa: S602 - pipe: runs the user's own command, by design
            command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
    except OSError as e:
        raise InputError(f"{url}: cannot run ({e.strerror or e})") from None
    done = {"checked": False}

    def read(n: int) -> bytes:
        data = proc.stdout.read(n)
        if not data and not done["checked"]:
            done["checked"] = True
            if proc.wait() != 0:
                raise InputError(f"{url}: the command exited with status {proc.returncode}")
        return data

    def close() -> None:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    return Stream(read, close, url)


def read_ranges(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes at each (offset, size) of a local file or URL: pread locally, a ranged
    GET per range from a store, one pass over a pipe: command's output."""
    if not is_url(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, size, offset) for offset, size in ranges]
        finally:
            os.close(fd)
    if path.startswith(PIPE):
        found: dict[tuple[int, int], bytes] = {}
        with open_stream(path) as stream:
            for offset, size in sorted(set(ranges)):
                stream.skip(offset - stream.tell())
                found[(offset, size)] = stream.read(size)
        return [found[r] for r in ranges]
    if not ranges:
        return []
    fs = filesystem(path)
    starts = [offset for offset, _ in ranges]
    ends = [offset + size for offset, size in ranges]
    # Concurrent ranged GETs (fsspec runs them together on its event loop).
    return retry(lambda: fs.cat_ranges([path] * len(ranges), starts, ends), path)


def read_bytes(url: str, error: type[DedupError] = InputError) -> bytes:
    fs = filesystem(url)
    return retry(lambda: fs.cat_file(url), url, error)


def exists(url: str, error: type[DedupError] = OutputError) -> bool:
    """Whether a local path or an object (or prefix) exists."""
    if not is_url(url):
        return os.path.exists(url)
    fs = filesystem(url)

    def now() -> bool:
        fs.invalidate_cache(url)  # as the store holds it now, not as listed earlier
        return fs.exists(url)

    return retry(now, url, error)


# ---------------------------------------------------------------- a path or a URL
# What the layers above ask of a location without asking which kind it is.


def absolute(path: str) -> str:
    """A URL as it is, a local path made absolute (never relative to the caller's
    working directory)."""
    return path if is_url(path) else os.path.abspath(path)


def real(path: str) -> str:
    """A location's one spelling: a URL normalised, a local path with links resolved."""
    return normal_url(path) if is_url(path) else os.path.realpath(path)


def makedirs(path: str) -> None:
    """A local folder made, parents too; nothing for a prefix (it exists once an object
    is put under it)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def local_dir(path: str) -> bool:
    """Whether `path` is a folder on this machine (not a URL)."""
    return not is_url(path) and os.path.isdir(path)


def local_file(path: str) -> bool:
    """Whether `path` is a file on this machine (not a URL)."""
    return not is_url(path) and os.path.isfile(path)


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells a rewritten file from the one that was read. `cp -p`, `rsync -a` and
    `tar x` restore the modification time, but the change time and the inode are set
    by the kernel; none of the three can give a rewritten file the old ones."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def path_identity(path: str) -> tuple | None:
    """A local file's (size, mtime, ctime, inode); an object's size and ETag or
    generation (see identity); None where nothing identifies it."""
    if is_url(path):
        return identity(path)
    return file_identity(os.stat(path))


def names_in(path: str) -> list[str]:
    """Names directly in a local folder or under a prefix, sorted ([] when none)."""
    if is_url(path):
        return listdir(path)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def listdir(url: str, error: type[DedupError] = OutputError) -> list[str]:
    """Names directly under a prefix ([] when there is none), as the store holds them now:
    never a listing cached earlier in this process (a claim, a retired output or another
    task's results may have changed it since)."""
    fs = filesystem(url)

    def names() -> list[str]:
        fs.invalidate_cache(url.rstrip("/"))
        try:
            return sorted(basename(e) for e in fs.ls(url.rstrip("/"), detail=False))
        except FileNotFoundError:
            return []

    return retry(names, url, error)


# ---------------------------------------------------------------- writing


def put_file(local: str, url: str) -> None:
    """Upload a finished local file to `url`. An S3 or GCS object appears whole or not
    at all: a single PUT, or a multipart upload whose completion comes last."""
    fs = filesystem(url)
    retry(lambda: fs.put_file(local, url), url, OutputError)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(url)


def put_bytes(url: str, data: bytes) -> None:
    fs = filesystem(url)
    retry(lambda: fs.pipe_file(url, data), url, OutputError)


def remove(url: str) -> None:
    fs = filesystem(url)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(url)

    retry(rm, url, OutputError)


def remove_tree(path: str) -> None:
    """Delete a folder (a local path, or every object under a prefix); gone already is fine."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs = filesystem(path)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path.rstrip("/"), recursive=True)
        with contextlib.suppress(Exception):
            fs.invalidate_cache(path)

    retry(rm, path, OutputError)


def create_exclusive(url: str, data: bytes) -> bool:
    """Create `url` only if it does not exist (S3 conditional PUT); False if it does."""
    fs = filesystem(url)
    if scheme(url) not in ("s3", "s3a"):
        if exists(url):
            return False
        put_bytes(url, data)
        return True
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(url)

    def put() -> bool:
        try:
            sync(
                fs.loop,
                fs._call_s3,
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
            )
        except FileExistsError:
            return False
        return True

    created = retry(put, url, OutputError)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(url)
    return created


def modified_seconds_ago(url: str) -> float | None:
    """Age of an object from its LastModified, when the store gives one."""
    fs = filesystem(url)
    try:
        info = fs.info(url)
    except FileNotFoundError:
        return None
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if stamp is None:
        return None
    if hasattr(stamp, "timestamp"):
        stamp = stamp.timestamp()
    return time.time() - float(stamp)


def open_local_or_stream(path: str) -> IO[bytes] | Stream:
    """A sequential reader of a local file or a URL."""
    if is_url(path):
        return open_stream(path)
    return open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - the caller closes it


def iter_chunks(reader: Any, block: int = STREAM_BLOCK) -> Iterator[bytes]:
    while chunk := reader.read(block):
        yield chunk
