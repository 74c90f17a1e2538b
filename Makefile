# Fresh clone: `make demo` and `make test` need only python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: golden-record golden-check install test test-fast lint format docs demo light-check airflow-check bench-calibrate calibrate calibrate-photos bench bench-scale bench-gpu gpu-wheels bench-storage bench-against bench-keep bench-transfer bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,clip]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (Ray, fault injection, schedules, S3-heavy, large
# end-to-end runs): a few minutes, for the edit-test loop. `make test` runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The layers' one-way rule (import-linter contracts in pyproject.toml) is part of lint.
lint: $(STAMP)
	$(BIN)/ruff check dedup tests benchmarks examples
	$(BIN)/ruff format --check dedup tests benchmarks examples
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix dedup tests benchmarks examples
	$(BIN)/ruff format dedup tests benchmarks examples

# The documentation site (docs/, mkdocs.yml) into site/, every link checked (--strict).
# The reference pages import dedup, so the site is built in the test venv with the docs
# extra added (CI has made it already for `make test`).
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The demo and the light check share one venv with the base install only (`pip install .`,
# no extras: no torch; about 0.9 GB), reinstalled when the package's code changes.
# `python -I` runs the installed package, not the checkout's dedup/ beside it.
DEMO_VENV := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed
DEMO_MAX_MB := 1536
$(DEMO_STAMP): pyproject.toml $(shell find dedup -name '*.py')
	test -x $(DEMO_VENV)/bin/python || $(PY) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q .
	touch $@

# Planted copies, dedup on them, and the report held against what was planted (recall per
# edit, every copy missed and why): dedup/demo.py. Offline, under two minutes from scratch.
demo: $(DEMO_STAMP)
	@if $(DEMO_VENV)/bin/python -I -c "import torch" 2>/dev/null; then \
	  echo "$(DEMO_VENV) holds torch: the base install must not"; exit 1; fi
	@size=$$(du -sm $(DEMO_VENV) | cut -f1); echo "$(DEMO_VENV): $$size MB, no torch"; \
	  test $$size -le $(DEMO_MAX_MB) || { echo "$(DEMO_VENV) is over $(DEMO_MAX_MB) MB"; exit 1; }
	rm -rf demo-data
	$(DEMO_VENV)/bin/python -I -m dedup.demo demo-data

# Defined before the first target that needs it: make expands a prerequisite when it
# reads the rule, so a later definition would leave that target with none.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

# The scripts of every bench, calibrate and golden target at a tiny size (--smoke), as
# `make test` runs them too (tests/benchmarks/test_bench_smoke.py, about two minutes).
bench-smoke: $(STAMP)
	$(BIN)/python -m pytest -q tests/benchmarks

calibrate: $(STAMP)
	$(BIN)/python benchmarks/calibrate_phash.py

# pHash distances on the real photographs bundled with the bench extra's packages, and
# the tiny-image rule's effect (README: "The pHash threshold on real photographs").
calibrate-photos: $(BENCH_STAMP)
	$(BIN)/python benchmarks/calibrate_photos.py
	$(BIN)/python benchmarks/tiny_images.py

# CPU throughput against the decode floor and imagededup; builds bench-data/ once.
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench.py

# CLIP on a GPU: decode and model ceilings, then dedup end to end against the Pillow
# path (random ViT-B-32 weights; about 6 minutes on one H200).
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py

# Wheels (Python 3.12) of what a bare GPU machine with torch lacks, for
# benchmarks/gpu_device.sh there; .whl/ is ignored by git (the device tool carries it).
gpu-wheels:
	rm -rf .whl && mkdir .whl
	for p in open_clip_torch ftfy wcwidth faiss-cpu imagehash PyWavelets blake3 braceexpand; do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $$p || exit 1; \
	done

# Local disk against a local S3-compatible server, same data, same run.
# A 24,000-image run against a 1,000,000-code index and a 10,000-image folder.
bench-against: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_against.py

# What canaries cost a run, and dedup calibrate on the edit suite's photographs.
bench-calibrate: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_calibrate.py

# Which sample of each duplicate group survives, per --keep policy: the original (or its
# lossless copy) or a padded, captioned, screenshot, watermarked, noisy or smaller copy of
# it (web-style copies of the bench extra's photographs; builds bench-data/bench-keep/ once).
bench-keep: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_keep.py

# Does dedup calibrate transfer? Its per-edit estimates on bench-keep's originals against
# a real run over bench-keep's own copies of them (held-out draw 1).
bench-transfer: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_transfer.py --seed 1

bench-storage: $(STAMP)
	$(BIN)/python benchmarks/bench_storage.py

# The partitioned global phase at 1 and 10 million pHash codes of real photographs
# (against the one-process engine it replaced), then extract and write on Ray against
# local processes on the bench set. Builds bench-data/codes/ once (minutes).
bench-scale: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_scale.py 1000000 10000000 --clip 200000
	$(BIN)/python benchmarks/bench_ray.py

clean:
	rm -rf demo-data bench-data .pytest_cache

# The light install: `pip install dedup-wds` without extras (the demo's venv) has no
# torch, and a run with the default signals works (exact,phash,views; one log line says
# why CLIP is off), where the demo names its signals.
light-check: $(DEMO_STAMP)
	rm -rf demo-data/light demo-data/light-clean
	! $(DEMO_VENV)/bin/python -I -c "import torch" 2>/dev/null
	$(DEMO_VENV)/bin/python -I -m dedup.synth demo-data/light 60 30
	$(DEMO_VENV)/bin/dedup demo-data/light --out demo-data/light-clean --json > demo-data/light.json
	$(DEMO_VENV)/bin/python -I -c "import json; s = json.load(open('demo-data/light.json')); \
	assert s['config']['signals'] == ['exact', 'phash', 'views'], s['config']['signals']; \
	assert s['counts']['removed'] > 0; print('light install: ok,', s['counts']['removed'], 'removed')"

# The example Airflow DAGs (examples/airflow/) under `airflow dags test`, with Apache
# Airflow in its own virtual environment (never in the project's dependencies).
AIRFLOW_VENV := .venv-airflow
airflow-check: $(STAMP)
	test -x $(AIRFLOW_VENV)/bin/airflow || { $(PY) -m venv $(AIRFLOW_VENV) && \
	$(AIRFLOW_VENV)/bin/python -m pip install -q apache-airflow; }
	sh examples/airflow/check.sh

# Golden outputs: a restructuring changes no output byte (benchmarks/golden.py).
golden-record: $(STAMP)
	$(BIN)/python benchmarks/golden.py record bench-data/golden.json

golden-check: $(STAMP)
	$(BIN)/python benchmarks/golden.py check bench-data/golden.json
