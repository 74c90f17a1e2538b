"""Object storage against local disk, same data, same run: `make bench-storage`.

Starts a local S3-compatible server (moto's server mode, on 127.0.0.1), uploads the
planted shards, then runs the same dedup over local disk and over S3 (shards in, cleaned
shards and report out), twice each, and prints per-phase times and the throughput ratio.

`python benchmarks/bench_storage.py [--images N]` (3,000 by default; the IMAGES
environment variable too); `--smoke`: 100 images, one round (tests/benchmarks/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEDUP = os.path.join(os.path.dirname(sys.executable), "dedup")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict) -> tuple[float, dict]:
    start = time.monotonic()
    result = subprocess.run(
        [DEDUP, *args, "--signals", "exact,phash", "--json", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return time.monotonic() - start, json.loads(result.stdout)


def main() -> None:
    from moto.server import ThreadedMotoServer

    from dedup.io import storage
    from dedup.synth import planted_dataset, write_shards

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=int(os.environ.get("IMAGES", 3000)))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="100 images, one round")
    args = ap.parse_args()
    images, per_shard, rounds = args.images, 250, args.rounds
    if args.smoke:
        images, per_shard, rounds = 100, 25, 1
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    copies = {"exact": images // 10, "reencode": images // 10}
    samples = planted_dataset(images, copies, seed=3, size=(480, 360))
    write_shards(samples, str(root / "in"), per_shard=per_shard)
    shards = sorted((root / "in").glob("*.tar"))
    total = sum(p.stat().st_size for p in shards)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    storage.filesystem("s3://bench").mkdir("bench")
    t0 = time.monotonic()
    for path in shards:
        storage.put_file(str(path), f"s3://bench/in/{path.name}")
    upload = time.monotonic() - t0

    rows = []
    for attempt in range(rounds):
        local_out = root / f"local-{attempt}"
        seconds_local, local = run([str(root / "in"), "--out", str(local_out)], env)
        seconds_s3, remote = run(["s3://bench/in/", "--out", f"s3://bench/out-{attempt}"], env)
        rows.append((seconds_local, local, seconds_s3, remote))
        same = all(
            hashlib.sha256((local_out / name).read_bytes()).digest()
            == hashlib.sha256(storage.read_bytes(f"s3://bench/out-{attempt}/{name}")).digest()
            for name in os.listdir(local_out)
            if name.endswith(".tar")
        )
        if not same:
            raise SystemExit("S3 output differs from the local output")
    server.stop()
    shutil.rmtree(root, ignore_errors=True)

    print(
        f"{len(samples):,} samples in {len(shards)} shards ({sum(copies.values()):,} planted "
        f"copies), {total / 1e6:.0f} MB; upload to the server {upload:.1f} s"
    )
    print(
        "run | local s | s3 s | s3/local throughput | phases local (extract, cluster, write) "
        "| phases s3"
    )
    for k, (sl, local, ss, remote) in enumerate(rows):
        pl = ", ".join(f"{p['seconds']:.1f}" for p in local["phases"].values())
        ps = ", ".join(f"{p['seconds']:.1f}" for p in remote["phases"].values())
        print(f"{k + 1} | {sl:.1f} | {ss:.1f} | {sl / ss:.2f} | {pl} | {ps}")
    for k, (_, local, _, remote) in enumerate(rows):
        print(
            f"run {k + 1} removed: local {local['counts']['removed']:,}, "
            f"s3 {remote['counts']['removed']:,}; output shards identical"
        )


if __name__ == "__main__":
    main()
