"""`make bench-gpu`: CLIP throughput per stage and end to end (ViT-B-32, random weights).

Stages, each timed alone on the same images: read (tar parse), decode (JPEG draft to
the model's input size, RGB), preprocess (open_clip's transform), embed (forward pass in
batches, fp16 autocast on a GPU), index (FAISS search over the embeddings). Then
`dedup --signals clip` end to end as a user runs it, process start included.

Speed does not depend on the weights, so a randomly initialized ViT-B-32 is saved to a
checkpoint and loaded by path, as real weights would be. Runs on the CPU too (slowly:
pass --images 2000 there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared data builder)

DEDUP = os.path.join(os.path.dirname(sys.executable), "dedup")


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} images/s  ({seconds:.2f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--images", type=int, default=24_000)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--stage-images", type=int, default=4000, help="images for the per-stage timings"
    )
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import open_clip
    import torch
    from PIL import Image

    from dedup.pairs import cosine_pairs
    from dedup.tarscan import scan

    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(f"machine: {bench.machine()}; GPU: {gpu}; torch {torch.__version__}")
    root = os.path.join(args.data, "small")
    bench.build(root, args.images, 1000, 512, 384)
    shards = sorted(
        os.path.join(root, "shards", f) for f in os.listdir(os.path.join(root, "shards"))
    )
    ckpt = os.path.join(args.data, f"{args.model}-random.pt")
    if not os.path.exists(ckpt):
        torch.manual_seed(0)
        torch.save(open_clip.create_model(args.model).state_dict(), ckpt)
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.model, pretrained=ckpt, device=device
    )
    model.eval()
    size = model.visual.image_size
    size = max(size) if isinstance(size, (tuple, list)) else int(size)

    t = time.perf_counter()
    blobs = []
    for path in shards:
        with open(path, "rb", buffering=1 << 20) as fh:
            for _, name, _, _, data in scan(fh, path, os.fstat(fh.fileno()).st_size, Counter()):
                if name.endswith(".jpg"):
                    blobs.append(data)
    print(f"  read         {rate(len(blobs), time.perf_counter() - t)}  (1 process)")
    sample = blobs[: args.stage_images]
    t = time.perf_counter()
    images = []
    for data in sample:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
        images.append(img.convert("RGB"))
    print(f"  decode       {rate(len(images), time.perf_counter() - t)}  (1 process)")
    t = time.perf_counter()
    tensors = [preprocess(img) for img in images]
    print(f"  preprocess   {rate(len(tensors), time.perf_counter() - t)}  (1 process)")
    batch = torch.stack(tensors[: args.batch_size]).to(device)
    vectors = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            model.encode_image(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        done = 0
        for start in range(0, len(tensors), args.batch_size):
            x = torch.stack(tensors[start : start + args.batch_size]).to(device)
            if device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.float16):
                    v = model.encode_image(x)
            else:
                v = model.encode_image(x)
            vectors.append(torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy())
            done += len(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        print(
            f"  embed        {rate(done, time.perf_counter() - t)}  ({device}, "
            f"batch {args.batch_size})"
        )
    x = np.concatenate(vectors).astype(np.float16)
    reps = max(1, len(blobs) // len(x))
    tiled = np.tile(x, (reps, 1))
    tiled += np.random.default_rng(0).normal(0, 0.01, tiled.shape).astype(np.float16)
    t = time.perf_counter()
    pairs = cosine_pairs(tiled, 0.94, device=device)
    print(f"  index        {rate(len(tiled), time.perf_counter() - t)}  ({len(pairs[0]):,} pairs)")

    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        cmd = [
            DEDUP,
            *shards,
            "--out",
            os.path.join(tmp, "out"),
            "--signals",
            "clip",
            "--clip-pretrained",
            ckpt,
            "--clip-model",
            args.model,
            "--device",
            device,
            "--batch-size",
            str(args.batch_size),
            "--json",
            "-q",
        ]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        summary = json.loads(proc.stdout)
        n = summary["counts"]["samples"]
        phases = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in summary["phases"].items())
        print(f"  end to end   {rate(n, seconds)}  dedup --signals clip ({phases})")


if __name__ == "__main__":
    main()
