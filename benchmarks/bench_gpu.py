"""`make bench-gpu`: CLIP on a GPU, ceilings against the run a user gets, in one script.

On about 0.2-megapixel JPEGs (512x384) with ViT-B-32 (random weights: speed does not
depend on them; saved to a checkpoint and loaded by path, as real weights are):

1. the device's decode ceiling: JPEGs decoded by the stage's decoder (nvJPEG on a GPU),
   alone, then with the resize and normalization the model needs;
2. the model's ceiling: forward passes (fp16 on a GPU) over ready tensors, at several
   batch sizes; the fastest (the smallest within 5% of it) is the batch size chosen;
3. one stage in one process: bytes in, vectors out (decode + prepare + model);
4. end to end, as a user runs it: `dedup --signals exact,phash` (the CPU side alone:
   readers, pHash, writing), `dedup --signals exact,phash,clip` (shared stage, device
   decode: the defaults on a GPU, named explicitly so a CPU run measures them too), and
   the Pillow path it replaced (`--clip-decode pillow --clip-stage inline`) as the
   baseline of the same run; process start included.

The end-to-end input is the image set `--copies` times over (shards copied under other
names: every copy is read and decoded again), so that a run lasts long enough for its
start-up (processes, model loading) not to hide the rate. Targets from issue 12 are
checked and printed; everything is written to bench-data/bench-gpu.json.

On a CPU it runs too, slowly: `--images 1000 --copies 1 --stage-images 200`.
`--smoke`: 40 images, a tiny random model at ViT-B-32's input size, batches of 8 and 16,
in a temporary folder, on the GPU if there is one and else on the CPU (the test suite
runs it: tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared data builder)

# `python -m dedup`: the same whether dedup is installed or only on PYTHONPATH (as on a
# lent GPU machine, see benchmarks/gpu_device.sh).
DEDUP = [sys.executable, "-m", "dedup"]
TARGET_RATE = 15_000  # images per second end to end on one H200 with 16 cores
TARGET_SHARE = 0.8  # of the slower ceiling
# --smoke's model: ViT-B-32's input size, two layers of width 64 (random weights).
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def line(label: str, n: int, seconds: float, note: str = "") -> float:
    r = rate(n, seconds)
    print(f"  {label:<34} {r:>10,.0f} images/s  ({n:,} in {seconds:.2f} s){note}", flush=True)
    return r


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class GpuMemory:
    """The most memory in use on the GPUs while a command runs (nvidia-smi, every 0.2 s)."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak_mib = max([self.peak_mib, *(int(v) for v in out.split() if v.isdigit())])
            except (OSError, subprocess.SubprocessError):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load_jpegs(shards: list[str]) -> list[bytes]:
    from dedup.io.tarscan import scan

    blobs = []
    for path in shards:
        with open(path, "rb", buffering=1 << 20) as fh:
            for _, name, _, _, data in scan(fh, path, os.fstat(fh.fileno()).st_size, Counter()):
                if name.endswith(".jpg"):
                    blobs.append(data)
    return blobs


def ceilings(spec, device: str, blobs: list[bytes], batch_sizes: list[int], results: dict):
    """Decode, model and one-stage ceilings in this process; returns the batch size chosen."""
    import torch

    from dedup.signals.clipstage import JPEG, BatchBuilder, ClipStage

    stage = ClipStage(spec, device)
    packed = []
    for start in range(0, len(blobs), batch_sizes[0]):
        batch = BatchBuilder()
        for data in blobs[start : start + batch_sizes[0]]:
            batch.add(JPEG, data)
        packed.append(batch.packed())
    rows = list(range(batch_sizes[0]))
    for buffer, table in packed[:2]:  # warm-up: nvJPEG handles, kernels, allocator
        stage._prepare(stage._decode_jpegs(buffer, table, rows[: len(table)]))
    sync(torch, device)
    t = time.perf_counter()
    for buffer, table in packed:
        images = stage._decode_jpegs(buffer, table, rows[: len(table)])
    sync(torch, device)
    results["decode_only"] = line(
        "decode only (device decoder)", len(blobs), time.perf_counter() - t
    )
    del images
    t = time.perf_counter()
    for buffer, table in packed:
        prepared = stage._prepare(stage._decode_jpegs(buffer, table, rows[: len(table)]))
    sync(torch, device)
    results["decode_prepare"] = line(
        "decode + resize + normalize", len(blobs), time.perf_counter() - t
    )
    del prepared
    size = stage.size
    model_rates = {}
    for bs in batch_sizes:
        x = torch.randn(bs, 3, size, size, device=device)
        for _ in range(3):
            stage.embedder.embed_tensor(x)
        sync(torch, device)
        reps = max(2, len(blobs) // bs)
        t = time.perf_counter()
        for _ in range(reps):
            stage.embedder.embed_tensor(x)
        sync(torch, device)
        model_rates[bs] = line(f"model only, batch {bs}", reps * bs, time.perf_counter() - t)
    best = max(model_rates.values())
    chosen = min(bs for bs, r in model_rates.items() if r >= 0.95 * best)
    results["model_only"] = {str(k): v for k, v in model_rates.items()}
    results["batch_size"] = chosen
    packed = []
    for start in range(0, len(blobs), chosen):
        batch = BatchBuilder()
        for data in blobs[start : start + chosen]:
            batch.add(JPEG, data)
        packed.append(batch.packed())
    stage.embed(*packed[0])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    vectors = [stage.embed(buffer, table)[0] for buffer, table in packed]
    sync(torch, device)
    results["one_stage"] = line(
        f"one stage: bytes to vectors, batch {chosen}", len(blobs), time.perf_counter() - t
    )
    # Random weights map every picture to nearly the same direction: at a trained model's
    # threshold every image would link to every other, and the global phase would face
    # N^2 / 2 pairs no real run has. The end-to-end runs use a threshold halfway between
    # the 99.9th percentile of these images' cosines and 1, so few pairs link, as with a
    # trained model.
    v = np.concatenate(vectors).astype(np.float32)
    sims = (v @ v.T)[np.triu_indices(len(v), 1)]
    q = float(np.percentile(sims, 99.9))
    results["clip_threshold"] = round(q + (1.0 - q) / 2, 6)
    print(
        f"  random weights: 99.9% of cosines below {q:.5f}; end-to-end runs use "
        f"--clip-threshold {results['clip_threshold']}"
    )
    if device.startswith("cuda"):
        results["stage_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"  stage's GPU memory at batch {chosen}: {results['stage_gpu_memory_mib']:,.0f} MiB")
    return chosen


def end_to_end(label: str, inputs: str, args: list[str], tmp: str, results: dict, key: str):
    out = os.path.join(tmp, key)
    with GpuMemory() as memory:
        t = time.perf_counter()
        proc = subprocess.run(
            [*DEDUP, inputs, "--out", out, *args, "--json", "-q"], capture_output=True, text=True
        )
        seconds = time.perf_counter() - t
    if proc.returncode != 0:
        # recorded, not fatal: the other runs' figures still come back
        print(f"{label}: exit {proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
        results[key] = {"exit": proc.returncode, "stderr": proc.stderr[-3000:]}
        return
    summary = json.loads(proc.stdout)
    n = summary["counts"]["samples"]
    phases = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in summary["phases"].items())
    extract = summary["phases"].get("extract", {}).get("seconds", 0.0)
    results[key] = {
        "images_per_second": line(label, n, seconds),
        "extract_images_per_second": rate(n, extract),
        "seconds": seconds,
        "phases": summary["phases"],
        "clip_decode": summary["counts"].get("clip_decode"),
        "gpu_memory_peak_mib": memory.peak_mib,
    }
    print(f"  {'':<34} phases: {phases}; extract alone {rate(n, extract):,.0f} images/s")
    if summary["counts"].get("clip_decode"):
        print(f"  {'':<34} decoded by: {summary['counts']['clip_decode']}")
    if memory.peak_mib:
        print(f"  {'':<34} GPU memory in use at most: {memory.peak_mib:,} MiB (nvidia-smi)")
    subprocess.run(["rm", "-rf", out], check=False)
    save(results, os.path.dirname(tmp))  # so far: a run cut short still leaves its figures


def save(results: dict, data: str) -> None:
    with open(os.path.join(data, "bench-gpu.json"), "w") as fh:
        json.dump(results, fh, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--images", type=int, default=24_000)
    ap.add_argument("--copies", type=int, default=4, help="end-to-end input: the set N times")
    ap.add_argument("--stage-images", type=int, default=8000, help="images for the ceilings")
    ap.add_argument("--batch-sizes", default="128,256,512")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-baseline", action="store_true", help="no Pillow-path run")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and model, temporary folder")
    args = ap.parse_args()
    if not args.smoke:
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-gpu-smoke-") as data:
        model = os.path.join(data, "bench-tiny.json")
        with open(model, "w") as fh:
            json.dump(TINY_MODEL, fh)
        args.data, args.model, args.images, args.copies = data, model, 40, 1
        args.stage_images, args.batch_sizes = 40, "8,16"
        print("--smoke: a tiny random model (2 layers of width 64) at ViT-B-32's input size")
        measure(args)


def measure(args: argparse.Namespace) -> None:
    import open_clip
    import torch

    from dedup.signals.clip import resolve

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    import torchvision

    print(
        f"machine: {bench.machine()}; GPU: {gpu}; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, open_clip {open_clip.__version__}",
        flush=True,
    )
    results: dict = {"machine": bench.machine(), "gpu": gpu, "device": device}
    root = os.path.join(args.data, "small")
    bench.build(root, args.images, min(1000, args.images), 512, 384)
    shards = sorted(
        os.path.join(root, "shards", f) for f in os.listdir(os.path.join(root, "shards"))
    )
    name = args.model
    if args.model.endswith(".json"):  # a model config file, as dedup's --clip-model takes
        open_clip.add_model_config(args.model)
        name = os.path.splitext(os.path.basename(args.model))[0]
    ckpt = os.path.join(args.data, f"{name}-random.pt")
    if not os.path.exists(ckpt):
        torch.manual_seed(0)
        torch.save(open_clip.create_model(name).state_dict(), ckpt)
    spec = resolve(args.model, ckpt)
    blobs = load_jpegs(shards)
    print(f"{len(blobs):,} JPEGs of 512x384; ceilings on {args.stage_images:,} of them:")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    chosen = ceilings(spec, device, blobs[: args.stage_images], batch_sizes, results)
    slower = min(results["decode_prepare"], results["model_only"][str(chosen)])

    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        linked = os.path.join(tmp, "in")
        os.makedirs(linked)
        for c in range(args.copies):
            for path in shards:
                # copies, not links: dedup refuses one file listed twice under two names
                shutil.copyfile(path, os.path.join(linked, f"c{c}-{os.path.basename(path)}"))
        total = len(blobs) * args.copies
        print(
            f"end to end on {total:,} images ({args.copies} copies of the set), "
            f"{os.cpu_count()} cores:"
        )
        clip = ["--clip-model", args.model, "--clip-pretrained", ckpt, "--device", device]
        clip += ["--batch-size", str(chosen), "--clip-threshold", str(results["clip_threshold"])]
        end_to_end(
            "dedup --signals exact,phash",
            linked,
            ["--signals", "exact,phash"],
            tmp,
            results,
            "phash_only",
        )
        end_to_end(
            "dedup --signals exact,phash,clip", linked,
            ["--signals", "exact,phash,clip", *clip, "--clip-decode", "device",
             "--clip-stage", "shared"], tmp, results, "clip_device",
        )  # fmt: skip
        if not args.skip_baseline:
            end_to_end(
                "  the Pillow path (baseline)", linked,
                ["--signals", "exact,phash,clip", *clip, "--clip-decode", "pillow",
                 "--clip-stage", "inline"], tmp, results, "clip_pillow",
            )  # fmt: skip
        # The default run a user gets on a GPU: signals auto (exact, phash, views with
        # verification, clip), shared stage and device decode.
        end_to_end("dedup (default signals)", linked, clip, tmp, results, "default")
    if "images_per_second" not in results["clip_device"]:
        raise SystemExit("the CLIP run failed: no targets to check")
    e2e = results["clip_device"]["images_per_second"]
    results["targets"] = {
        "end_to_end_at_least": TARGET_RATE,
        "end_to_end": e2e,
        "share_of_slower_ceiling": e2e / slower,
        "met": e2e >= TARGET_RATE and e2e / slower >= TARGET_SHARE,
    }
    print("targets (one H200, 16 cores):")
    print(f"  end to end {e2e:,.0f} images/s (target {TARGET_RATE:,})")
    print(
        f"  {e2e / slower:.2f} of the slower ceiling ({slower:,.0f} images/s; target "
        f"{TARGET_SHARE})"
    )
    phash = results["phash_only"].get("images_per_second", 0.0)
    print(
        f"  the CPU side alone (exact,phash) runs at {phash:,.0f} images/s: "
        + ("it limits the CLIP run" if phash < 1.15 * e2e else "not the limit")
    )
    if "images_per_second" in results.get("clip_pillow", {}):
        old = results["clip_pillow"]["images_per_second"]
        print(f"  against the Pillow path in the same run: {e2e / old:.2f}x")
    save(results, args.data)
    print(f"written: {os.path.join(args.data, 'bench-gpu.json')}")


if __name__ == "__main__":
    main()
