"""CLIP's stage: image bytes in, L2-normalized float16 vectors out, one batch at a time.

A reader (a CPU worker reading shards) packs a batch into one byte buffer and a table of
rows: a JPEG's encoded bytes (decoded by the stage, on its device, in one
`torchvision.io.decode_jpeg` call over the list), or RGB pixels the reader already
decoded, resized and cropped on its CPU (images that are not JPEGs, JPEGs whose colour
space the device decoder does not take, and every image when `clip_decode` is pillow).
The stage decodes, applies EXIF orientation, resizes and normalizes on its device, runs
the model (fp16 on a GPU) and returns one vector per row. A JPEG the device decoder
refuses is decoded again with Pillow in the stage, counted.

Where the stage runs:
- `inline`: in the reader's own process (one model per worker; the CPU default);
- `shared`: one process per device that owns the model (the GPU default). Readers reach
  it over a local socket; each batch's bytes travel through a shared-memory block the
  reader creates, never as pickled arrays; the vectors come back on the socket.
- under the Ray executor, one actor per GPU (see dedup/executors/ray.py).

Each batch is one reader's batch, never mixed with another reader's, so a vector does not
depend on which rows other workers happened to send at the same time.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import tempfile
import threading
import warnings
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from dedup.core.errors import ModelError
from dedup.core.processes import die_with_parent
from dedup.io.decode import normalize
from dedup.signals.clip import ClipSpec, Embedder

JPEG = 0  # row holds a JPEG's bytes
PIXELS = 1  # row holds size x size x 3 RGB uint8 pixels, ready for the model
# table columns: kind, offset, length, EXIF orientation
TABLE_COLUMNS = 4

# Counted per image that reached the model, in the summary's `clip_decode`.
ON_DEVICE = "device"  # decoded by the stage's decoder (nvJPEG on a GPU)
CPU_NOT_JPEG = "cpu_not_jpeg"  # not a JPEG: decoded by the reader with Pillow
CPU_COLOUR_SPACE = "cpu_cmyk"  # CMYK/YCCK JPEG: decoded by the reader with Pillow
CPU_REFUSED = "cpu_refused"  # the device decoder refused it: Pillow in the stage
CPU_PILLOW = "cpu_pillow"  # clip_decode: pillow, every image on the reader's CPU
CPU_LARGE = "cpu_large"  # a JPEG above DEVICE_MAX_PIXELS: the reader's draft decode
DEVICE_MODES = ("RGB", "L")  # JPEG colour spaces sent to the device decoder
# A JPEG is decoded at full size on the device (nvJPEG has no DCT scaling); above this
# many pixels the reader's Pillow draft decode (1/2 to 1/8 scale) is cheaper and keeps
# a batch of camera originals from filling the GPU's memory.
DEVICE_MAX_PIXELS = 16_000_000
# Float values resized at once by the stage (256 MiB): a batch of large images is
# resized a few at a time, not all in one tensor.
PREPARE_VALUES = 64 * 2**20


def pixel_transform(spec: ClipSpec):
    """open_clip's own resize and crop for this model, without ToTensor and Normalize:
    a Pillow image in, the model's input as a Pillow image out."""
    from open_clip import image_transform

    size, mean, std, interpolation, resize_mode = spec.pixels
    full = image_transform(
        size,
        is_train=False,
        mean=mean,
        std=std,
        resize_mode=resize_mode,
        interpolation=interpolation,
    )
    from torchvision.transforms import Compose

    return Compose(full.transforms[:-2])  # ... MaybeToTensor, Normalize


def pixels_of(image, transform) -> np.ndarray:
    """A decoded Pillow image as the model's RGB uint8 input (size x size x 3)."""
    return np.array(transform(image.convert("RGB")), dtype=np.uint8)  # writable, for torch


def device_decodes(spec: ClipSpec) -> bool:
    """Whether the stage can prepare this model's input itself (square input resized by
    its shortest side and centre-cropped, or squashed); else readers prepare pixels."""
    size, _, _, interpolation, resize_mode = spec.pixels
    return (
        size[0] == size[1]
        and resize_mode in ("shortest", "squash")
        and interpolation
        in (
            "bicubic",
            "bilinear",
        )
    )


# ------------------------------------------------------------------ the batch format


class BatchBuilder:
    """Collects one batch: rows in the order added, bytes in one growing buffer."""

    def __init__(self) -> None:
        self.parts: list = []
        self.table: list[tuple[int, int, int, int]] = []
        self.size = 0

    def add(self, kind: int, data, orientation: int = 1) -> None:
        view = memoryview(data).cast("B")
        self.table.append((kind, self.size, len(view), orientation))
        self.parts.append(view)
        self.size += len(view)

    def __len__(self) -> int:
        return len(self.table)

    def pack_into(self, target) -> np.ndarray:
        """Copy the bytes into `target` (a writable buffer of `self.size` bytes); the table."""
        out = np.frombuffer(target, dtype=np.uint8, count=self.size)
        pos = 0
        for view in self.parts:
            out[pos : pos + len(view)] = np.frombuffer(view, dtype=np.uint8)
            pos += len(view)
        return np.asarray(self.table, dtype=np.int64).reshape(-1, TABLE_COLUMNS)

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        buffer = bytearray(self.size)
        table = self.pack_into(buffer)
        return np.frombuffer(buffer, dtype=np.uint8), table


# ------------------------------------------------------------------ the stage


class ClipStage:
    """The model and its input preparation on one device."""

    def __init__(self, spec: ClipSpec, device: str) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        self.device = device
        self.embedder = Embedder.get(spec, device)
        size, mean, std, interpolation, resize_mode = spec.pixels
        self.height, self.width = size
        self.size = size[0]  # the side of a square input: the device decode needs one
        self.squash = resize_mode == "squash"
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self._transform = None

    def embed(self, buffer: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """(vectors float16 (n, dim), ok bool (n,), {decode route: count}) for one batch;
        a row that no decoder could read has ok False and a zero vector."""
        torch = self.torch
        n = len(table)
        ok = np.ones(n, dtype=bool)
        counts: Counter = Counter()
        images: list = [None] * n
        jpeg_rows = [r for r in range(n) if table[r, 0] == JPEG]
        if jpeg_rows:
            decoded = self._decode_jpegs(buffer, table, jpeg_rows)
            for r, image in zip(jpeg_rows, decoded, strict=True):
                if image is None:
                    image = self._decode_with_pillow(buffer, table[r])
                    if image is None:
                        ok[r] = False
                        continue
                    counts[CPU_REFUSED] += 1
                else:
                    counts[ON_DEVICE] += 1
                images[r] = image
        for r in range(n):
            if table[r, 0] == PIXELS:
                kind, offset, length, _ = table[r]
                pixels = torch.from_numpy(buffer[offset : offset + length].copy())
                images[r] = pixels.view(self.height, self.width, 3).permute(2, 0, 1).to(self.device)
        dim = self.embedder.output_dim
        vectors = np.zeros((n, dim), dtype=np.float16)
        rows = [r for r in range(n) if images[r] is not None]
        if rows:
            batch = self._prepare([images[r] for r in rows])
            vectors[rows] = self.embedder.embed_tensor(batch)
        return vectors, ok, dict(counts)

    def _decode_jpegs(self, buffer, table, rows) -> list:
        """Each row's CHW uint8 tensor on the device, oriented; None where refused."""
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = [
            self.torch.from_numpy(buffer[table[r, 1] : table[r, 1] + table[r, 2]]) for r in rows
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice
            try:
                out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
            except Exception:  # the whole list fails on one bad image: find which
                out = []
                for data in datas:
                    try:
                        out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                    except Exception:
                        out.append(None)
        return [
            None if image is None else orient(image, int(table[r, 3]))
            for r, image in zip(rows, out, strict=True)
        ]

    def _decode_with_pillow(self, buffer, row):
        from PIL import Image

        if self._transform is None:
            self._transform = pixel_transform(self.spec)
        _, offset, length, orientation = (int(v) for v in row)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(io.BytesIO(buffer[offset : offset + length].tobytes()))
                img.draft("RGB", (self.size, self.size))
                img.load()
                image = normalize(img, orientation)
        except Exception:
            return None
        pixels = self.torch.from_numpy(pixels_of(image, self._transform))
        return pixels.permute(2, 0, 1).to(self.device)

    def _prepare(self, images: list):
        """Resize (images of one size together), crop, normalize: the model's batch."""
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode

        torch = self.torch
        bilinear = self.interpolation == "bilinear"
        mode = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        s = self.size
        shape = (len(images), 3, self.height, self.width)
        out = torch.empty(shape, device=self.device, dtype=torch.float32)
        by_shape: dict = {}
        for pos, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape[1:]), []).append(pos)
        for (h, w), same_size in by_shape.items():
            # In float, a group of large images is large: resized a few at a time.
            step = max(1, PREPARE_VALUES // (3 * h * w))
            for start in range(0, len(same_size), step):
                positions = same_size[start : start + step]
                group = torch.stack([images[p] for p in positions]).float()
                if (h, w) != (self.height, self.width):
                    if self.squash:
                        group = F.resize(group, [s, s], interpolation=mode, antialias=True)
                    else:
                        group = F.resize(group, [s], interpolation=mode, antialias=True)
                        group = F.center_crop(group, [s, s])
                    # Pillow rounds and clamps to 8 bits between resize and normalize
                    group = group.clamp_(0, 255).round_()
                out[positions] = group
        return (out - self.mean) / self.std


def orient(image, orientation: int):
    """Apply an EXIF orientation (2-8) to a CHW tensor, as Pillow's exif_transpose does."""
    import torch

    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1).flip(2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(1, 2))
    if orientation == 7:
        return image.transpose(1, 2).flip(1).flip(2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(1, 2))
    return image


# ------------------------------------------------------------------ readers' side


class Feed:
    """One shard's CLIP rows on their way to a stage: batches of `batch_size` sent as they
    fill, at most `depth` in flight, vectors put back by row when they return."""

    def __init__(self, client, batch_size: int, depth: int = 2) -> None:
        self.client = client
        self.batch_size = batch_size
        self.depth = depth
        self.batch = BatchBuilder()
        self.rows: list[int] = []
        self.in_flight: deque = deque()
        self.vectors: dict[int, bytes] = {}
        self.failed: set[int] = set()
        self.counts: Counter = Counter()

    def add(self, row: int, kind: int, data, orientation: int = 1, route: str = "") -> None:
        self.batch.add(kind, data, orientation)
        self.rows.append(row)
        if route:
            self.counts[route] += 1
        if len(self.batch) >= self.batch_size:
            self._send()

    def _send(self) -> None:
        if not len(self.batch):
            return
        self.in_flight.append((self.client.submit(self.batch), self.rows))
        self.batch, self.rows = BatchBuilder(), []
        while len(self.in_flight) > self.depth:
            self._collect()

    def _collect(self) -> None:
        ticket, rows = self.in_flight.popleft()
        vectors, ok, counts = self.client.collect(ticket)
        self.counts.update(counts)
        for row, vector, good in zip(rows, vectors, ok, strict=True):
            if good:
                self.vectors[row] = vector.tobytes()
            else:
                self.failed.add(row)

    def finish(self) -> None:
        self._send()
        while self.in_flight:
            self._collect()

    def abandon(self) -> None:
        """Give up the batches in flight (the shard failed): their shared memory goes
        now; replies that still come are dropped by the client."""
        while self.in_flight:
            ticket, _ = self.in_flight.popleft()
            self.client.discard(ticket)


class InlineClient:
    """The stage in this process."""

    def __init__(self, stage: ClipStage) -> None:
        self.stage = stage

    def submit(self, batch: BatchBuilder):
        return self.stage.embed(*batch.packed())

    def collect(self, ticket):
        return ticket

    def discard(self, ticket) -> None:
        pass


_INLINE: dict = {}


def inline_client(spec: ClipSpec, device: str) -> InlineClient:
    key = (spec, device)
    if key not in _INLINE:
        _INLINE[key] = InlineClient(ClipStage(spec, device))
    return _INLINE[key]


@dataclass(frozen=True)
class SharedStage:
    """How a reader reaches a stage process: its socket and key (picklable)."""

    address: str
    authkey: bytes
    device: str

    def client(self) -> SocketClient:
        key = (self.address, os.getpid())
        if key not in _CLIENTS:
            _CLIENTS[key] = SocketClient(self)
        return _CLIENTS[key]


_CLIENTS: dict = {}


class SocketClient:
    """A reader's connection to a stage process; each batch in its own shared-memory
    block, unlinked once the stage has answered. Replies carry the batch's number: the
    stage may finish two of a reader's batches in either order."""

    def __init__(self, stage: SharedStage) -> None:
        from multiprocessing.connection import Client

        self.stage = stage
        self.sent = 0
        self.replies: dict[int, tuple] = {}
        self.dropped: set[int] = set()  # numbers of discarded batches
        try:
            self.conn = Client(stage.address, family="AF_UNIX", authkey=stage.authkey)
        except OSError as e:
            raise ModelError(f"clip: cannot reach the stage on {stage.device} ({e})") from None

    def _stopped(self) -> ModelError:
        return ModelError(f"clip: stage on {self.stage.device}: the stage process stopped")

    def submit(self, batch: BatchBuilder):
        from multiprocessing import shared_memory

        block = shared_memory.SharedMemory(create=True, size=max(1, batch.size))
        number = self.sent
        try:
            try:  # reserve the pages now: a full /dev/shm is an error here, not a SIGBUS
                os.posix_fallocate(block._fd, 0, max(1, batch.size))  # noqa: SLF001
            except OSError as e:
                raise ModelError(
                    f"clip: no room in /dev/shm for a batch of {batch.size:,} bytes ({e}); "
                    "give the container more shared memory or lower --batch-size"
                ) from None
            table = batch.pack_into(block.buf)
            self.conn.send((number, block.name, batch.size, table.tobytes()))
        except BaseException as e:
            block.close()
            block.unlink()
            if isinstance(e, OSError):
                raise self._stopped() from None
            raise
        self.sent += 1
        return number, block

    def collect(self, ticket):
        number, block = ticket
        try:
            while number not in self.replies:
                reply = self.conn.recv()
                if reply[0] in self.dropped:
                    self.dropped.discard(reply[0])
                else:
                    self.replies[reply[0]] = reply[1:]
            reply = self.replies.pop(number)
        except (EOFError, OSError):
            raise self._stopped() from None
        finally:
            block.close()
            block.unlink()
        if reply[0] == "error":
            raise ModelError(f"clip: stage on {self.stage.device}: {reply[1]}")
        _, vectors, ok, counts, dim = reply
        return (
            np.frombuffer(vectors, dtype=np.float16).reshape(-1, dim),
            np.frombuffer(ok, dtype=bool),
            counts,
        )

    def discard(self, ticket) -> None:
        number, block = ticket
        block.close()
        block.unlink()
        if self.replies.pop(number, None) is None:
            self.dropped.add(number)


# ------------------------------------------------------------------ stage processes


# Batches a stage works on at once, each on its own CUDA stream: one decodes while
# another runs the model (torch and nvJPEG release the GIL).
STAGE_THREADS = 2


def serve(address: str, authkey: bytes, spec: ClipSpec, device: str, ready, parent: int) -> None:
    """A stage process: build the model, say ready, answer batches until terminated, or
    until the run that started it is gone (killed: its GPU memory is freed then too)."""
    import queue
    import signal
    from multiprocessing.connection import Listener, wait

    die_with_parent(parent)
    # Ctrl-C reaches the whole process group; the run that started this stage stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
        stage = ClipStage(spec, device)
    except Exception as e:
        ready.send(("error", str(e).splitlines()[0] if str(e) else type(e).__name__))
        return
    conns: dict = {}  # connection -> the lock its replies are sent under
    lock = threading.Lock()
    work: queue.Queue = queue.Queue(maxsize=4 * STAGE_THREADS)

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
            except Exception:
                continue  # a client that failed the handshake
            with lock:
                conns[conn] = threading.Lock()

    def answer() -> None:
        import torch

        stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
        while True:
            conn, (number, name, size, table_bytes) = work.get()
            try:
                buffer = read_block(name, size)
                table = np.frombuffer(table_bytes, dtype=np.int64).reshape(-1, TABLE_COLUMNS)
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    vectors, ok, counts = stage.embed(buffer, table)
                reply = (number, "ok", vectors.tobytes(), ok.tobytes(), counts, vectors.shape[1])
            except Exception as e:
                reply = (number, "error", f"{type(e).__name__}: {e}".splitlines()[0][:300])
            with lock:
                send_lock = conns.get(conn)
            if send_lock is None:
                continue
            # a reader that went away: its requests end here
            with send_lock, contextlib.suppress(EOFError, OSError):
                conn.send(reply)

    threading.Thread(target=accept, daemon=True).start()
    for _ in range(STAGE_THREADS):
        threading.Thread(target=answer, daemon=True).start()
    ready.send(("ok", ""))
    while True:
        with lock:
            watched = list(conns)
        if not watched:
            threading.Event().wait(0.01)
            continue
        for conn in wait(watched, timeout=0.1):
            try:
                request = conn.recv()
            except (EOFError, OSError):
                with lock:
                    conns.pop(conn, None)
                continue
            work.put((conn, request))


def read_block(name: str, size: int) -> np.ndarray:
    """A copy of the first `size` bytes of a reader's shared-memory block. Read as a file
    under /dev/shm rather than attached as SharedMemory, which would register the block
    with the resource tracker that readers and stages share and unlink it twice."""
    fd = os.open(os.path.join("/dev/shm", name.lstrip("/")), os.O_RDONLY)
    data = bytearray(size)
    try:
        got = os.preadv(fd, [data], 0)
    finally:
        os.close(fd)
    if got != size:
        raise ValueError(f"shared block {name} holds {got} of {size} bytes")
    return np.frombuffer(data, dtype=np.uint8)


class StageProcesses:
    """One stage process per device, started for a phase and stopped after it."""

    def __init__(self, spec: ClipSpec, devices: list[str], timeout: float = 600.0) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.folder = tempfile.mkdtemp(prefix="dedup-clip-")
        self.processes = []
        self.stages: list[SharedStage] = []
        try:
            for n, device in enumerate(devices):
                address = os.path.join(self.folder, f"stage-{n}.sock")
                stage = SharedStage(address, secrets.token_bytes(16), device)
                parent, child = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=serve,
                    args=(address, stage.authkey, spec, device, child, os.getpid()),
                    name=f"dedup-clip-stage-{device}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self.processes.append(proc)
                if not parent.poll(timeout):
                    raise ModelError(f"clip: the stage on {device} did not start in {timeout:.0f}s")
                try:
                    status, message = parent.recv()
                except EOFError:
                    status, message = "error", f"exit code {proc.exitcode}"
                if status != "ok":
                    raise ModelError(f"clip: cannot start the stage on {device} ({message})")
                self.stages.append(stage)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        import shutil

        for stage in self.stages:  # this process's connections to them, if any
            client = _CLIENTS.pop((stage.address, os.getpid()), None)
            if client is not None:
                client.conn.close()
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            proc.join(10)
        self.processes = []
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> StageProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
