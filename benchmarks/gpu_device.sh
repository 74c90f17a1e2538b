#!/usr/bin/env bash
# Issue 12's GPU checks in one command, on a CUDA machine whose python3 has torch and
# torchvision but nothing can be installed from the network (the `device` tool's H200):
#   make gpu-wheels        # here, once: the other packages as wheels in .whl/ (26 MB)
#   device run: bash benchmarks/gpu_device.sh   (carry .whl; about 6 minutes)
# It runs the GPU tests, then `make bench-gpu`'s script, and copies the results to $OUT.
# GPU_TESTS (default: the two CLIP test files) names the tests to run; the exit status is
# the tests' or the benchmark's failure, whichever came first.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-bench-data}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The tests run the `dedup` console script beside python3; a bare machine has none.
bin="$(dirname "$(python3 -c 'import sys; print(sys.executable)')")"
if [ ! -x "$bin/dedup" ]; then
  printf '#!/bin/sh\nexec %s -m dedup "$@"\n' "$bin/python3" > "$bin/dedup" && chmod +x "$bin/dedup"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/signals/test_clipstage.py tests/signals/test_clip.py} \
  2>&1 | tee "$out/gpu-tests.log" | tail -15
status=$?
timeout 480 python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$out/bench-gpu.log"
bench=$?
cp bench-data/bench-gpu.json "$out/" 2>/dev/null || true
[ "$status" -ne 0 ] && exit "$status"
exit "$bench"
